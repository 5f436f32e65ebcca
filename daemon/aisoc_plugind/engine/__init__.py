"""Run the plugin lifecycle: read, trust, load in a host, swap, run, install.

`engine.bundle` is the only reader of plugin directories; `engine.hosts` is the only caller of
plugin code. Imports `audit`, `config`, `core`; never `delivery` (fetching packages comes in
through a Protocol) and never aiohttp.
"""

__all__: list[str] = []
