"""Run `python -m aisoc_plugind` as `aisoc-plugind`."""

from aisoc_plugind.cli.main import main

main()
