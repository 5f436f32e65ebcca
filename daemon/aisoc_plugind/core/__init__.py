"""Decide, purely: manifests, signatures, records and their state machine, the plugin contract.

Imports nothing of the daemon but `errors`; no I/O, and no aiohttp, anyio, watchfiles or
structlog.
"""

__all__: list[str] = []
