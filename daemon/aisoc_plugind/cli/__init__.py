"""Parse argv for `aisoc` and `aisoc-plugind`: the only place that prints for users and exits.

Imports everything below it.
"""

__all__: list[str] = []
