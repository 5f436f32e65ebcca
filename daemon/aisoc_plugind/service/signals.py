"""Hold SIGTERM, SIGINT and SIGHUP from process start until the service listens for them.

Left to Python's defaults, SIGTERM and SIGHUP end the process and SIGINT raises
KeyboardInterrupt wherever the main thread is: while modules are imported, the config is read
or the first discovery runs. `hold()` (called first thing by `aisoc-plugind run`, before the
heavy imports) records them instead. The service's signal receiver replays what was recorded
(`take()`) as soon as it listens, and `hold()` is in force again once it stops listening, so
a signal in the last steps of the exit is harmless too. What no Python code can cover is the
interpreter's own start, the few milliseconds before the entry point's first line.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = ["HELD", "Held", "held", "hold", "restore", "take"]

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True, slots=True)
class Held:
    """One signal that arrived while held: which, and when (`time.monotonic()`)."""

    signum: int
    at: float


@dataclass
class _State:
    pending: list[Held] = field(default_factory=list)
    active: bool = False  # hold() was called in this process (and not undone)


_STATE = _State()


def _record(signum: int, frame: FrameType | None) -> None:
    """The held signals' handler: note the signal, do nothing else (no I/O in a handler)."""
    _STATE.pending.append(Held(signum, time.monotonic()))


def hold() -> Mapping[int, Handler]:
    """Record the held signals from now on instead of acting on them; return the handlers
    they had (for `restore`). Does nothing outside the main thread (signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Handler] = {int(signum): signal.getsignal(signum) for signum in HELD}
    for signum in HELD:
        signal.signal(signum, _record)
    _STATE.active = True
    return previous


def restore(previous: Mapping[int, Handler]) -> None:
    """Put back the handlers `hold()` returned."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if previous and all(handler is not _record for handler in previous.values()):
        _STATE.active = False


def held() -> bool:
    """Return True when `hold()` is in force for this process (the daemon's entry point)."""
    return _STATE.active


def take() -> list[Held]:
    """Return the signals recorded so far, oldest first, and forget them."""
    taken = list(_STATE.pending)
    del _STATE.pending[: len(taken)]
    return taken
