"""Run `python -m daemon` as `aisoc-plugind`."""

from daemon.cli import main

main()
