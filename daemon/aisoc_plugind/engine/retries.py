"""Try again, with backoff, the loads that failed for want of a resource the daemon itself lacked.

A load that fails because the daemon ran out of descriptors (EMFILE, ENFILE), memory (ENOMEM,
MemoryError) or processes (EAGAIN on fork) says nothing about the plugin: once the pressure
ends, the same directory loads. Such a failure is recorded as usual (`plugin.load.failed` or
`plugin.reload.failed`, the old version serving on), then `plugin.load.retrying` announces the
next attempt, after 0.5 s doubling to 30 s, at most `ATTEMPTS` times. A load that fails for
any other reason, or succeeds, ends the series. Failures of plugin code (an import that raises
MemoryError) are the plugin's own and are never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aisoc_plugind.audit import names
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import PluginDError

__all__ = [
    "ATTEMPTS",
    "RETRY",
    "TRANSIENT_ERRNOS",
    "LoadRetries",
    "retry_delay",
    "transient",
]

ATTEMPTS = 8
FIRST_S = 0.5
MAX_S = 30.0
RETRY = Caller(actor="system")
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS}
)
# Codes of failures in the daemon's own work (reading the directory, starting a host, a bug
# path); a plugin's import or setup errors have codes of their own and are never transient.
_OWN_CODES = frozenset({"bundle_unreadable", "host_start_failed", "plugin_load_error"})
# The same, said in text only (a scan worker process or the zygote reported it).
_TEXT = re.compile(
    r"\[Errno (?P<errno>\d+)\]|"
    + "|".join(re.escape(os.strerror(e)) for e in sorted(TRANSIENT_ERRNOS))
    + r"|MemoryError"
)


def transient(error: PluginDError) -> bool:
    """Return True when `error` is the daemon's own lack of a resource, worth another try."""
    if error.code not in _OWN_CODES:
        return False
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError):
            return True
        if isinstance(cause, OSError) and cause.errno in TRANSIENT_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return _says_transient(error.message)


def _says_transient(text: str) -> bool:
    for found in _TEXT.finditer(text):
        number = found.group("errno")
        if number is None or int(number) in TRANSIENT_ERRNOS:
            return True
    return False


def retry_delay(attempt: int) -> float:
    """Return the wait before attempt `attempt` (1-based): 0.5 s doubling, capped at 30 s."""
    return float(min(FIRST_S * 2 ** (attempt - 1), MAX_S))


Sync = Callable[[Path, Caller], Awaitable[None]]


class LoadRetries:
    """Schedule the retries of loads that failed transiently (see the module docstring).

    `note` is told how every load of a directory ended; `sync(path, caller)` (the manager's
    `sync_dir`) is what a retry calls, and it reports its own outcome through `note` again.
    """

    def __init__(self, events: EngineEvents, sync: Sync, *, attempts: int = ATTEMPTS) -> None:
        self._events = events
        self._sync = sync
        self._max = attempts
        self._attempts: dict[Path, int] = {}
        self._tasks: dict[Path, asyncio.Task[None]] = {}

    def pending(self, path: Path) -> bool:
        """Return True while a retry of `path` is scheduled."""
        return path in self._tasks

    def note(self, path: Path, error: PluginDError | None, plugin_id: str | None = None) -> None:
        """Record how a load of `path` ended; after a transient failure, schedule the next
        attempt (unless one is scheduled, or the attempts are used up)."""
        if error is None or not transient(error):
            self._attempts.pop(path, None)
            return
        attempt = self._attempts.get(path, 0) + 1
        if attempt > self._max:
            self._attempts.pop(path, None)  # given up: the failure stands
            return
        self._attempts[path] = attempt
        if path in self._tasks:
            return
        delay = retry_delay(attempt)
        self._events.emit(
            names.PLUGIN_LOAD_RETRYING,
            level="warning",
            plugin_id=plugin_id,
            path=str(path),
            attempt=attempt,
            max_attempts=self._max,
            delay_s=delay,
            error_code=error.code,
            error=error.message,
        )
        self._tasks[path] = asyncio.ensure_future(self._retry(path, delay))

    async def _retry(self, path: Path, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._tasks.pop(path, None)
        with contextlib.suppress(PluginDError):  # reported by the load (and noted by `note`)
            await self._sync(path, RETRY)

    async def aclose(self) -> None:
        """Cancel every scheduled retry."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
