"""Run `python -m aisoc_plugind` as `aisoc-plugind`."""

from aisoc_plugind.cli.entry import plugind

plugind()
