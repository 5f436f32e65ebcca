"""Record what happens: event names in one module, the event log, the audit file.

Imports `config` and `core`.
"""

__all__: list[str] = []
