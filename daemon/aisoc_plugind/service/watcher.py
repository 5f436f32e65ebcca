"""Watch `plugins.dir` and bring each changed plugin directory up to date, once per edit."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from watchfiles import Change, awatch

from aisoc_plugind.audit.names import WATCHER_ERROR, WATCHER_STARTED, WATCHER_STOPPED
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import PluginDError

if TYPE_CHECKING:
    from aisoc_plugind.engine.manager import PluginManager
    from aisoc_plugind.service.daemon import HangupHook, Service

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "SETTLE_MAX_S",
    "STEP_MS",
    "WATCHER",
    "ChangeFilter",
    "FileChange",
    "PluginWatcher",
    "Settler",
    "next_backoff",
    "plugin_dirs",
    "quiet_window_s",
    "relevant_parts",
    "root_deleted",
    "watcher_component",
]

WATCHER = Caller(actor="watcher")

# watchfiles' Rust loop wakes every STEP_MS to look at what inotify queued, and yields a batch
# once one step passes with nothing new: the step is both the idle wake-up period and the
# floor of the detection latency (see docs/service.md, "How the watcher behaves").
STEP_MS = 10
# A directory that never goes quiet (something rewrites a file in it all the time) is still
# synced this long after its first change, so that it cannot starve.
SETTLE_MAX_S = 2.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0

# Directory names below which nothing is plugin content.
_IGNORED_DIRS = frozenset({"__pycache__", ".git"})
# Editor and temp files: vim swap/backup and its `4913` write probe, emacs lock and
# autosave files, compiled bytecode, `*.tmp` of atomic writers.
_IGNORED_NAME = re.compile(r"\.sw[px]$|~$|^\.#|^#.*#$|^4913$|\.pyc$|\.tmp$")

FileChange = tuple[Change, str]


def relevant_parts(path: str, root: str) -> tuple[str, ...] | None:
    """Return `path`'s components under `root` when a change there may matter, else None.

    Both arguments are absolute. Top-level hidden names (`.staging-*` of OCI installs,
    `.git`) are never plugins; editor and temp files and bytecode never trigger work.
    """
    if not path.startswith(root + "/"):
        return None
    parts = PurePosixPath(path[len(root) + 1 :]).parts
    if not parts or parts[0].startswith(".") or _IGNORED_DIRS.intersection(parts[:-1]):
        return None
    name = parts[-1]
    if name in _IGNORED_DIRS or _IGNORED_NAME.search(name):
        return None
    return parts


def plugin_dirs(changes: Iterable[FileChange], root: Path) -> set[Path]:
    """Group changes by plugin directory: `root / <first component>` of each relevant path."""
    base = _absolute(root)
    found: set[Path] = set()
    for _, path in changes:
        parts = relevant_parts(path, base)
        if parts is not None:
            found.add(root / parts[0])
    return found


def root_deleted(changes: Iterable[FileChange], root: Path) -> bool:
    """Return True when the batch says the watched directory itself went away."""
    return (Change.deleted, _absolute(root)) in set(changes)


def next_backoff(previous: float | None) -> float:
    """Return the wait before retrying a failed watch: doubling, capped."""
    return BACKOFF_FIRST_S if previous is None else min(previous * 2, BACKOFF_MAX_S)


def quiet_window_s(debounce_ms: int, step_ms: int = STEP_MS) -> float:
    """Return how long to wait after a batch so a directory has been quiet `debounce_ms`.

    watchfiles yields a batch only after one step without new changes, so that much quiet
    has already passed when the batch arrives.
    """
    return max(debounce_ms - step_ms, 0) / 1000


def _absolute(root: Path) -> str:
    return str(root.absolute()).rstrip("/") or "/"


class ChangeFilter:
    """`awatch` filter: pass changes under a plugin directory, and the root itself."""

    def __init__(self, root: Path) -> None:
        self._root = _absolute(root)

    def __call__(self, change: Change, path: str) -> bool:
        """Return True when the change may need work."""
        return path == self._root or relevant_parts(path, self._root) is not None


class Settler:
    """Call `sync(dir)` once `dir` has been quiet for the window; coalesce bursts per dir.

    One task per busy directory: each change restarts its quiet timer (but a directory is
    synced at the latest `max_s` after its first change); changes that arrive while `sync`
    runs cause exactly one more sync afterwards.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        quiet_s: float,
        sync: Callable[[Path], Awaitable[None]],
        *,
        max_s: float = SETTLE_MAX_S,
    ) -> None:
        self._tg = tg
        self._quiet_s = quiet_s
        self._max_s = max_s
        self._sync = sync
        self._pending: dict[Path, MemoryObjectSendStream[None]] = {}

    def poke(self, path: Path) -> None:
        """Note a change to `path`; never blocks."""
        send = self._pending.get(path)
        if send is None:
            send, receive = anyio.create_memory_object_stream[None](1)
            self._pending[path] = send
            self._tg.start_soon(self._settle, path, receive, name=f"settle {path}")
            return
        with contextlib.suppress(anyio.WouldBlock):  # full: a change is already noted
            send.send_nowait(None)

    async def _settle(self, path: Path, pokes: MemoryObjectReceiveStream[None]) -> None:
        with pokes:
            again = True
            while again:
                await self._wait_quiet(pokes)
                await self._sync(path)
                again = _take(pokes)
        # No checkpoint since the last look at `pokes`: no change can be lost here.
        self._pending.pop(path).close()

    async def _wait_quiet(self, pokes: MemoryObjectReceiveStream[None]) -> None:
        with anyio.move_on_after(self._max_s):
            poked = True
            while poked:
                with anyio.move_on_after(self._quiet_s) as scope:
                    await pokes.receive()
                poked = not scope.cancelled_caught


def _take(pokes: MemoryObjectReceiveStream[None]) -> bool:
    try:
        pokes.receive_nowait()
    except anyio.WouldBlock:
        return False
    return True


class PluginWatcher:
    """Feed filesystem changes under `plugins.dir` to `manager.sync_dir`, one dir at a time."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager
        self.root = manager.settings.plugins_dir
        self.debounce_ms = manager.settings.watch_debounce_ms
        self._filter = ChangeFilter(self.root)
        self._stop = anyio.Event()
        self._delivered = False

    def stop(self) -> None:
        """Ask the watch to end; watchfiles' thread notices within one step."""
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until stopped; a failing watch is reported and retried with backoff."""
        async with anyio.create_task_group() as tg:
            settler = Settler(tg, quiet_window_s(self.debounce_ms, STEP_MS), self._sync)
            # awatch registers its inotify watches synchronously in its first step, before
            # this task next yields: once `start()` returns to the caller, edits are seen.
            task_status.started()
            try:
                await self._supervise(settler)
            finally:
                tg.cancel_scope.cancel()
                self.manager.events.emit(WATCHER_STOPPED, path=str(self.root))

    async def _supervise(self, settler: Settler) -> None:
        delay: float | None = None
        first = True
        while not self._stop.is_set():
            if not first:
                await self._catch_up()
            first = False
            self._delivered = False
            try:
                await self._watch(settler)
            except* Exception as group:  # awatch wraps its thread's errors in a group
                for exc in group.exceptions:
                    self._error(exc)
            # A session that worked for a while starts the backoff over.
            delay = next_backoff(None if self._delivered else delay)
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def _watch(self, settler: Settler) -> None:
        """Run one watch session, until stopped or until the plugins dir itself is removed."""
        self.manager.events.emit(
            WATCHER_STARTED, path=str(self.root), step_ms=STEP_MS, debounce_ms=self.debounce_ms
        )
        # rust_timeout=0: the watch thread never wakes up just to time out; the stop event
        # (checked every step) is what ends it. ignore_permission_denied=False: with True,
        # watchfiles also swallows "no such directory" and would silently watch nothing.
        async for changes in awatch(
            self.root,
            watch_filter=self._filter,
            debounce=max(self.debounce_ms, STEP_MS),
            step=STEP_MS,
            rust_timeout=0,
            stop_event=self._stop,
            ignore_permission_denied=False,
        ):
            self._delivered = True
            for path in plugin_dirs(changes, self.root):
                settler.poke(path)
            if root_deleted(changes, self.root):
                self._error(FileNotFoundError(f"{self.root} was removed"))
                return

    async def _catch_up(self) -> None:
        """After a watch gap, load what appeared, retry what failed, flag what vanished, and
        reload serving plugins whose files changed meanwhile (unchanged ones cost a hash)."""
        try:
            await self.manager.discover(WATCHER)
        except PluginDError as exc:
            self._error(exc)
        for path in self.manager.serving_dirs():
            await self._sync(path)

    async def _sync(self, path: Path) -> None:
        try:
            await self.manager.sync_dir(path, WATCHER)
        except PluginDError:
            pass  # the manager emitted plugin.reload.failed; the old version serves on
        except Exception as exc:  # a bug must not end watching; it is reported instead
            self._error(exc, path=path)

    def _error(self, exc: BaseException, *, path: Path | None = None) -> None:
        self.manager.events.emit(
            WATCHER_ERROR,
            level="error",
            path=str(path or self.root),
            error_code=_error_code(exc),
            error=f"{type(exc).__name__}: {exc}",
        )


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, PluginDError):
        return exc.code
    if isinstance(exc, FileNotFoundError):
        return "plugins_dir_missing"
    if isinstance(exc, OSError):
        return "watch_failed"
    return "watcher_internal_error"


@asynccontextmanager
async def _watching(manager: PluginManager) -> AsyncIterator[HangupHook | None]:
    watcher = PluginWatcher(manager)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        try:
            yield None
        finally:
            watcher.stop()
            tg.cancel_scope.cancel()


@asynccontextmanager
async def _disabled() -> AsyncIterator[HangupHook | None]:
    yield None


def watcher_component(
    service: Service, manager: PluginManager
) -> AbstractAsyncContextManager[HangupHook | None]:
    """Service component: watch `plugins.dir` unless `plugins.watch = false`; no SIGHUP hook."""
    return _watching(manager) if manager.settings.watch else _disabled()
