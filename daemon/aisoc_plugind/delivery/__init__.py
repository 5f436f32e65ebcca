"""Move plugin packages: the package format, OCI references, the registry client, pull/push.

Imports `core`; never `engine` (it is wired to the engine by the service).
"""

__all__: list[str] = []
