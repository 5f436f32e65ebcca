"""Tell what plugin code raised from the daemon's own cancellation, and describe it safely.

Plugin code may raise anything: `SystemExit`, `KeyboardInterrupt`, `GeneratorExit`, its own
`BaseException` subclasses, and `asyncio.CancelledError` too. Each is that plugin's fault and
ends in a coded error; the one exception that may cross a plugin boundary is the cancellation
of the running task by the daemon itself (a cancel scope, a time limit, shutdown), and that is
told apart by the task's pending cancellation requests, never by the exception's type.
Describing an exception runs plugin code too (`__str__`), so it is done defensively, redacted
and bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aisoc_plugind.core.redact import NO_REDACTION, SCAN_CAP, Redactor

__all__ = ["MAX_ERROR_TEXT", "Raised", "cancelled_here", "captured", "describe", "type_name"]

MAX_ERROR_TEXT = 500
_MAX_NAME = 64
# `type.__name__` read through `type` itself: a metaclass cannot make it run code or lie.
_NAME_OF: Callable[[type], str] = type.__dict__["__name__"].__get__

T = TypeVar("T")


def cancelled_here(exc: BaseException) -> bool:
    """Return True when `exc` is the cancellation of the running task (someone asked for
    it: `Task.cancelling()`), not a CancelledError that plugin code raised itself."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread: nothing of ours to cancel
        return False
    return task is not None and task.cancelling() > 0


def type_name(exc: BaseException) -> str:
    """Return the name of the exception's class (`Exception` when it is no plain name)."""
    name = _NAME_OF(type(exc))
    return name if name.isidentifier() and len(name) <= _MAX_NAME else "Exception"


def describe(
    exc: BaseException, redactor: Redactor = NO_REDACTION, limit: int = MAX_ERROR_TEXT
) -> str:
    """Return `Type: text` of what plugin code raised, redacted, then cut at `limit`."""
    name = type_name(exc)
    text = _text_of(exc)
    return redactor.clip(f"{name}: {text}" if text else name, limit)


def _text_of(exc: BaseException) -> str:
    """Return `str(exc)` (up to what a redactor scans); a `__str__` that raises or returns
    something odd gives a placeholder, never an error."""
    try:
        text: Any = str(exc)
        # A str subclass could override slicing: read it as a plain str.
        return str.__getitem__(text, slice(0, SCAN_CAP + 1))
    except BaseException:  # whatever the plugin's __str__ raises
        return "<unprintable>"


@dataclass(frozen=True, slots=True)
class Raised:
    """What a call into plugin code raised, carried back as a value (see `captured`)."""

    exc: BaseException


class _Captured(Generic[T]):
    __slots__ = ("_call",)

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call

    def __call__(self) -> T | Raised:
        try:
            return self._call()
        except BaseException as exc:  # handed back to the caller as a value
            return Raised(exc)


def captured(call: Callable[[], T]) -> Callable[[], T | Raised]:
    """Wrap a call for a worker thread: whatever it raises comes back as `Raised`, so
    nothing plugin code raises (a CancelledError either) surfaces in the awaiting task as
    if it were that task's own."""
    return _Captured(call)
