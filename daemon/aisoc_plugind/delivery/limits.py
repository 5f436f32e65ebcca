"""Bound what one pull, push or extraction may cost: bytes, entries, path shape and time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aisoc_plugind.errors import PluginDError

__all__ = ["CHUNK", "DEFAULT_LIMITS", "MIB", "Deadline", "Limits", "brief"]

MIB = 1024 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps on what one pull or extraction may cost (bytes, entries, path shape, time)."""

    manifest_bytes: int = 4 * MIB
    layer_bytes: int = 64 * MIB
    extracted_bytes: int = 64 * MIB
    file_bytes: int = 32 * MIB
    entries: int = 5000
    path_length: int = 512
    depth: int = 32
    deadline_s: float = 120.0


DEFAULT_LIMITS = Limits()


class Deadline:
    """A point in monotonic time after which `left()` raises the error it was given."""

    __slots__ = ("_at", "_error")

    def __init__(self, seconds: float, error: Callable[[], PluginDError]) -> None:
        self._at = time.monotonic() + seconds
        self._error = error

    def left(self) -> float:
        """Return the seconds left; raise the error once none are."""
        remaining = self._at - time.monotonic()
        if remaining <= 0:
            raise self._error()
        return remaining


def brief(exc: BaseException) -> str:
    """Return an exception's text on one line of at most 300 characters (for messages)."""
    return " ".join(str(exc).split())[:300]
