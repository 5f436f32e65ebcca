"""Watch `plugins.dir` and bring each changed plugin directory up to date, once per edit.

What is watched and which changes count is decided in `service.watchset`: every real
directory under `plugins.dir` gets a watch of its own (no symlink is ever followed); when
directories appear or vanish the watch is started again over the new set, and the plugin
directories that gained watched directories are synced once more (their files may have
changed before the new watches existed).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from watchfiles import awatch
from watchfiles._rust_notify import WatchfilesRustInternalError

from aisoc_plugind.audit.names import WATCHER_ERROR, WATCHER_STARTED, WATCHER_STOPPED
from aisoc_plugind.engine.hosts.faults import cancelled_here, describe
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import PluginDError
from aisoc_plugind.service.watchset import (
    MAX_WATCHED_DIRS,
    ChangeFilter,
    FileChange,
    WatchSet,
    plugin_dirs,
    relevant_parts,
    root_deleted,
    sort_changes,
    watch_set,
)

if TYPE_CHECKING:
    from aisoc_plugind.engine.manager import PluginManager
    from aisoc_plugind.service.daemon import HangupHook, Service

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "QUICK_RESTARTS",
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


def next_backoff(previous: float | None) -> float:
    """Return the wait before retrying a failed watch: doubling, capped."""
    return BACKOFF_FIRST_S if previous is None else min(previous * 2, BACKOFF_MAX_S)


def quiet_window_s(debounce_ms: int, step_ms: int = STEP_MS) -> float:
    """Return how long to wait after a batch so a directory has been quiet `debounce_ms`.

    watchfiles yields a batch only after one step without new changes, so that much quiet
    has already passed when the batch arrives.
    """
    return max(debounce_ms - step_ms, 0) / 1000


class Settler:
    """Call `sync(dir)` once `dir` has been quiet for the window; coalesce bursts per dir.

    One task per busy directory: each change restarts its quiet timer (but a directory is
    synced at the latest `max_s` after its first change); changes that arrive while `sync`
    runs cause exactly one more sync afterwards. Activity (`touch`: temporary files of a
    deploy in progress) restarts the timer of a sync already asked for, and asks for none.
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
        self._syncing: set[Path] = set()

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

    def touch(self, path: Path) -> None:
        """Note deploy activity in `path`: a sync asked for (and not yet running) waits for
        quiet again; nothing is asked for. Never blocks."""
        send = self._pending.get(path)
        if send is None or path in self._syncing:
            return
        with contextlib.suppress(anyio.WouldBlock):
            send.send_nowait(None)

    async def _settle(self, path: Path, pokes: MemoryObjectReceiveStream[None]) -> None:
        with pokes:
            again = True
            while again:
                await self._wait_quiet(pokes)
                self._syncing.add(path)
                try:
                    await self._sync(path)
                finally:
                    self._syncing.discard(path)
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


@dataclass(frozen=True, slots=True)
class _Regrown:
    """The directories under `plugins.dir` changed: watch `watching` from now on, and sync
    the plugin directories in `fresh` once more (they gained directories no watch covered)."""

    watching: WatchSet
    fresh: set[Path]


def _replan(plan: _Regrown, found: WatchSet, root: Path) -> _Regrown:
    """Return the plan that watches `found`: the plugin directories holding directories
    `plan` did not watch are to be synced once more, with those `plan` still owed."""
    added = set(found.dirs) - set(plan.watching.dirs)
    return _Regrown(found, plan.fresh | found.plugin_dirs_of(added, root))


# Starts in a row that may fail because a directory vanished between the walk and the watch
# (a deploy renaming and deleting): walked again at once, without an error.
QUICK_RESTARTS = 3


class PluginWatcher:
    """Feed filesystem changes under `plugins.dir` to `manager.sync_dir`, one dir at a time."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager
        self.root = manager.settings.plugins_dir
        self.debounce_ms = manager.settings.watch_debounce_ms
        self._filter = ChangeFilter(self.root)
        self._stop = anyio.Event()
        self._delivered = False
        self._reported: set[str] = set()  # paths left out of the watch, reported once each

    def stop(self) -> None:
        """Ask the watch to end; watchfiles' thread notices within one step."""
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until stopped; a failing watch is reported and retried with backoff."""
        async with anyio.create_task_group() as tg:
            settler = Settler(tg, quiet_window_s(self.debounce_ms, STEP_MS), self._sync)
            first = await self._walk()
            # awatch registers its inotify watches synchronously in its first step, before
            # this task next yields: once `start()` returns to the caller, edits are seen.
            task_status.started()
            try:
                await self._supervise(settler, first)
            finally:
                tg.cancel_scope.cancel()
                self.manager.events.emit(WATCHER_STOPPED, path=str(self.root))

    async def _supervise(self, settler: Settler, first: WatchSet | None) -> None:
        delay: float | None = None
        walked = first
        while not self._stop.is_set():
            if walked is not None:
                await self._follow(settler, _Regrown(walked, set()))
            if self._stop.is_set():
                return
            # A session that worked for a while starts the backoff over.
            delay = next_backoff(None if self._delivered else delay)
            with anyio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return
            self._delivered = False
            await self._catch_up()
            walked = await self._walk()

    async def _follow(self, settler: Settler, plan: _Regrown) -> None:
        """Watch `plan`, and each new set of directories as they change, until stopped or
        until a session fails (reported) or the plugins dir is removed.

        Between two sessions nothing watches for a moment: after a restart the plugin
        directories that gained watches and every serving plugin's directory are synced
        once more (a serving plugin whose files did not change costs a read and a hash).
        """
        announce, quick = True, 0
        while not self._stop.is_set():
            self._delivered = False
            restarted = () if announce else self.manager.serving_dirs()
            for path in {*plan.fresh, *restarted}:
                settler.poke(path)
            outcome, failed = await self._session(settler, plan.watching, announce=announce)
            announce = False
            if outcome is not None:  # the directories changed: watch the new set right away
                plan, quick = outcome, 0
                continue
            if failed and self._vanished_at_start(failed, quick):
                walked = await self._walk()
                if walked is not None:
                    plan, quick = _replan(plan, walked, self.root), quick + 1
                    continue
            for exc in failed:
                self._error(exc)
            return

    async def _walk(self) -> WatchSet | None:
        """Walk `plugins.dir` for the directories to watch; None (reported) when the daemon
        lacks the descriptors or memory to do so."""
        try:
            return await anyio.to_thread.run_sync(watch_set, self.root)
        except OSError as exc:
            self._error(exc)
            return None

    async def _session(
        self, settler: Settler, watching: WatchSet, *, announce: bool
    ) -> tuple[_Regrown | None, list[Exception]]:
        """Run one watch session; return its outcome, or what made it fail."""
        outcome: _Regrown | None = None
        failed: list[Exception] = []
        try:
            outcome = await self._watch(settler, watching, announce=announce)
        except* Exception as group:  # awatch wraps its thread's errors in a group
            failed = list(group.exceptions)
        return outcome, failed

    def _vanished_at_start(self, failed: list[Exception], quick: int) -> bool:
        """Return True when the watch could not start only because a directory below the
        root vanished (or became unreadable) after the walk: worth a new walk at once."""
        return (
            quick < QUICK_RESTARTS
            and not self._delivered
            and all(isinstance(e, FileNotFoundError | PermissionError) for e in failed)
            and self.root.is_dir()
        )

    async def _watch(
        self, settler: Settler, watching: WatchSet, *, announce: bool
    ) -> _Regrown | None:
        """Run one watch session over `watching`: until stopped, until the plugins dir itself
        is removed (None), or until directories appear or vanish (the new set to watch)."""
        if announce:
            self.manager.events.emit(
                WATCHER_STARTED,
                path=str(self.root),
                step_ms=STEP_MS,
                debounce_ms=self.debounce_ms,
                watched_dirs=len(watching.dirs),
            )
        self._report_left_out(watching)
        # One non-recursive watch per directory (never through a symlink). rust_timeout=0:
        # the watch thread never wakes up just to time out; the stop event (checked every
        # step) is what ends it. ignore_permission_denied=False: with True, watchfiles also
        # swallows "no such directory" and would silently watch nothing.
        changes_seen = awatch(
            *watching.dirs,
            watch_filter=self._filter,
            debounce=max(self.debounce_ms, STEP_MS),
            step=STEP_MS,
            rust_timeout=0,
            stop_event=self._stop,
            recursive=False,
            ignore_permission_denied=False,
        )
        async with contextlib.aclosing(changes_seen):
            async for changes in changes_seen:
                self._delivered = True
                batch = sort_changes(changes, self.root)
                for path in batch.changed:
                    settler.poke(path)
                for path in batch.active:
                    settler.touch(path)
                if root_deleted(changes, self.root):
                    self._error(FileNotFoundError(f"{self.root} was removed"))
                    return None
                if batch.moved and batch.regrows(watching.dirs):
                    regrown = await self._regrown(watching)
                    if regrown is not None:
                        return regrown
        return None

    async def _regrown(self, watching: WatchSet) -> _Regrown | None:
        """Walk again; return the new set when it differs from what is watched (None when
        the same). A walk the daemon lacks descriptors or memory for raises OSError: the
        session ends as failed, and the catch-up after the backoff walks again."""
        found = await anyio.to_thread.run_sync(watch_set, self.root)
        if found.dirs == watching.dirs:
            return None
        return _replan(_Regrown(watching, set()), found, self.root)

    def _report_left_out(self, watching: WatchSet) -> None:
        """Say once which directories are not watched (odd names, past the limit)."""
        for path in watching.unnamable:
            if path not in self._reported:
                self._reported.add(path)
                self._problem(
                    "watch_path_invalid",
                    f"{path.encode('utf-8', 'backslashreplace').decode()}: the name is not "
                    "UTF-8; changes below it are not watched",
                )
        if watching.truncated and "<limit>" not in self._reported:
            self._reported.add("<limit>")
            self._problem(
                "watch_limit",
                f"more than {MAX_WATCHED_DIRS} directories under {self.root}: those past the "
                "limit are not watched (POST /discover or a reload still reads them)",
            )

    def _problem(self, code: str, text: str) -> None:
        self.manager.events.emit(
            WATCHER_ERROR, level="warning", path=str(self.root), error_code=code, error=text
        )

    async def _catch_up(self) -> None:
        """After a watch gap, load what appeared, retry what failed, flag what vanished, and
        reload serving plugins whose files changed meanwhile (unchanged ones cost a hash)."""
        try:
            await self.manager.discover(WATCHER)
        except PluginDError as exc:
            self._error(exc)
        except BaseException as exc:  # a bug must not end watching; it is reported instead
            if cancelled_here(exc):
                raise
            self._error(exc)
        for path in self.manager.serving_dirs():
            await self._sync(path)

    async def _sync(self, path: Path) -> None:
        try:
            await self.manager.sync_dir(path, WATCHER)
        except PluginDError:
            pass  # the manager emitted plugin.reload.failed; the old version serves on
        except BaseException as exc:  # a bug must not end watching; it is reported instead
            if cancelled_here(exc):
                raise  # the watch is stopping
            self._error(exc, path=path)

    def _error(self, exc: BaseException, *, path: Path | None = None) -> None:
        self.manager.events.emit(
            WATCHER_ERROR,
            level="error",
            path=str(path or self.root),
            error_code=_error_code(exc),
            error=describe(exc),
        )


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, PluginDError):
        return exc.code
    if isinstance(exc, FileNotFoundError):
        return "plugins_dir_missing"
    if isinstance(exc, OSError | WatchfilesRustInternalError):
        return "watch_failed"  # also watchfiles' own (no inotify instance, too many watches)
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
