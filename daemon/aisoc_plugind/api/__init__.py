"""Serve the control API over aiohttp: routes, guards, tokens, errors as HTTP, metrics.

The only package that imports aiohttp's web server. Imports `engine` and below.
"""

__all__: list[str] = []
