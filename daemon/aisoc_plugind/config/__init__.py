"""Resolve the settings once (environment, file, defaults) and find risky ones (preflight).

Imports `core`; no aiohttp, anyio, watchfiles or structlog.
"""

__all__: list[str] = []
