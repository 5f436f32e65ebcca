"""Keep the cyclic garbage collector off while many long-lived objects are built at once.

Loading a thousand plugins builds modules, classes and functions that live as long as the
plugin, and the collector, triggered by every 700 new objects, walks the ever larger set of
them again and again: profiled in a plugin host, it was about half of a bulk load's time.
`BULK_LOAD` is counted: the collector is off while at least one bulk load is under way and
back on (if it was on) when the last one ends; the first automatic collection after that
walks what was built once. Use it only around work of bounded length (a discovery, a
load), from one thread: a pause is a little more memory held until it ends.
"""

from __future__ import annotations

import gc
from types import TracebackType

__all__ = ["BULK_LOAD", "GcPause"]


class GcPause:
    """A counted pause of the cyclic garbage collector (a context manager, also `async
    with` for a coroutine that holds it across awaits)."""

    def __init__(self) -> None:
        self._depth = 0
        self._was_enabled = False

    @property
    def active(self) -> bool:
        """Return True while at least one holder is inside."""
        return self._depth > 0

    def __enter__(self) -> None:
        if self._depth == 0:
            self._was_enabled = gc.isenabled()
            gc.disable()
        self._depth += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0 and self._was_enabled:
            gc.enable()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


BULK_LOAD = GcPause()
