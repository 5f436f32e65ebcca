"""Compose the daemon: audit sink, keys, manager, control API, watcher, signals, sd_notify.

One task group owns every task. Before it touches anything the daemon takes its instance lock
(`service.instance`): a second daemon on the same configuration stops with `already_running`.
A start that fails (the API's address is taken, a file it needs is refused, ...) ends in
`daemon.stopped` with `reason: start_failed` and the error's code, and `failure` says why.

Signals are handled from the moment the service runs; those that arrived earlier were held
since the process started (`service.signals`) and are replayed. SIGTERM/SIGINT stop the
daemon at any point, startup included (the discovery under way is cancelled). The whole
shutdown fits in `daemon.shutdown_grace_s` (`engine.shutdown`): the API stops accepting, runs
in flight drain and are cut at the drain deadline (503 `daemon_stopping`, audited), every
plugin's teardown runs at once, hosts are killed when the deadline passes, and the audit
file is flushed last. A second stop signal changes nothing: the deadline holds anyway.

SIGHUP reopens the audit file, re-reads tokens, trusted keys and the revocation list, and
re-checks loaded plugins against them; one that arrives before the daemon is ready is
replayed once it is (`daemon.reloading` with `reason: signal_during_startup`), one that
arrives while it stops is ignored. The revocation list is also read at start, before
discovery, and whenever its file changes (`service.revocations`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, contextmanager
from typing import TextIO

import anyio
import anyio.abc

from aisoc_plugind import __version__
from aisoc_plugind.audit import names as ev
from aisoc_plugind.audit import stdlog
from aisoc_plugind.audit.log import EventLog, log_options
from aisoc_plugind.config.preflight import preflight
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.engine.hosts.sandbox import make_non_dumpable
from aisoc_plugind.engine.keyring import Keyring, load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.engine.results import SYSTEM
from aisoc_plugind.engine.shutdown import ShutdownPlan
from aisoc_plugind.errors import AuditUnavailable, PluginDError
from aisoc_plugind.service import signals
from aisoc_plugind.service.instance import InstanceLock
from aisoc_plugind.service.revocations import RevocationWatch
from aisoc_plugind.service.sdnotify import Notifier
from aisoc_plugind.service.wiring import make_manager

__all__ = ["Component", "HangupHook", "Service"]

# A component (control API, watcher, sd_notify) runs inside the service as an async context
# manager; what it yields is an optional callback for SIGHUP.
HangupHook = Callable[[], Awaitable[None]]
Component = Callable[["Service", PluginManager], AbstractAsyncContextManager[HangupHook | None]]


# The audit file's last flush gets at least this long, even when the deadline was used up.
FLUSH_MIN_S = 0.5


class Service:
    """The running daemon; `run()` returns when a stop signal has been handled."""

    def __init__(
        self,
        settings: Settings,
        *,
        components: Sequence[Component] = (),
        stream: TextIO | None = None,
    ) -> None:
        self.settings = settings
        self.components = tuple(components)
        self.events = EventLog(log_options(settings), stream=stream)
        self.manager: PluginManager | None = None
        self.ready = anyio.Event()
        self.stop_reason = "requested"
        self.failure: PluginDError | None = None  # why the daemon could not start or run
        self._stop = anyio.Event()
        self._stop_at: float | None = None
        self._starting: anyio.CancelScope | None = None  # the startup; a stop cancels it
        self._plan: ShutdownPlan | None = None
        self._work: anyio.abc.TaskGroup | None = None
        self._hangup_hooks: list[HangupHook] = []
        self._hangup_pending = False  # a SIGHUP before ready: replayed once ready
        self._hanging = False
        self._hangup_again = False
        self._revocations: RevocationWatch | None = None

    def request_stop(self, reason: str = "requested", *, at: float | None = None) -> None:
        """Ask the service to shut down gracefully; the first request's reason and time
        (`time.monotonic()`, default now) count, later ones change nothing."""
        if self._stop.is_set():
            return
        self.stop_reason = reason
        self._stop_at = time.monotonic() if at is None else at
        self._stop.set()
        if self._starting is not None:
            self._starting.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start everything, serve until stopped, then shut down in order.

        Raises AlreadyRunning, before touching any file, when another daemon holds this
        configuration's instance lock. A start or run that fails is not raised: it ends in
        `daemon.stopped` (level error, its code) and in `failure`.
        """
        lock = InstanceLock.acquire(self.settings.audit_path)
        try:
            async with anyio.create_task_group() as outer:
                await outer.start(self._signals)
                try:
                    await self._lifetime(lock, task_status)
                finally:
                    outer.cancel_scope.cancel()
        finally:
            lock.release()

    async def _lifetime(self, lock: InstanceLock, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Open the audit trail, serve, and close it: daemon.started ... daemon.stopped."""
        self.events.start()
        if self.settings.isolation_mode == "process":
            make_non_dumpable()  # hosts (same user) cannot ptrace us or read our memory
        uninstall_logging = stdlog.install(self.events, self.settings.log_level)
        self.events.on_recovered(self._audit_recovered)
        self.events.emit(
            ev.DAEMON_STARTED,
            version=__version__,
            pid=os.getpid(),
            trust_mode=self.settings.trust_mode.value,
            plugins_dir=str(self.settings.plugins_dir),
            config_file=str(self.settings.config_file or ""),
            environment=self.settings.environment,
        )
        self._warn(lock)
        try:
            await self._serve(task_status)
        except Exception as exc:
            if not self._failed(exc):
                raise  # a bug: recorded, then shown with its traceback
        finally:
            self._emit_stopped()
            uninstall_logging()
            await self._flush()

    def _warn(self, lock: InstanceLock) -> None:
        for warning in preflight(self.settings):
            self.events.emit(
                ev.CONFIG_WARNING, level="warning", error_code=warning.code, error=warning.message
            )
        if lock.problem is not None:
            self.events.emit(
                ev.CONFIG_WARNING,
                level="warning",
                error_code="instance_lock_unavailable",
                error=f"the instance lock cannot be taken ({lock.problem}): a second daemon "
                "on this configuration would not be refused before it starts",
            )

    async def _serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        keyring = self._load_keys()
        async with (
            make_manager(self.settings, self.events, keyring) as manager,
            anyio.create_task_group() as tg,
        ):
            self.manager, self._work = manager, tg
            async with AsyncExitStack() as components:
                await self._start(manager, tg, components)
                if not self._stop.is_set():
                    self._mark_ready()
                    task_status.started()
                    self._replay_hangup(tg)
                    await self._stop.wait()
                self._begin_shutdown(manager)
                # Leaving this block stops the components in reverse order: the API stops
                # accepting, lets the runs in flight drain (`drained`) and answers them.
            await self.drained()  # runs not started over HTTP
            tg.cancel_scope.cancel()
        # Leaving the manager tore every plugin down and stopped the hosts, by the plan.
        self._work = None

    async def _start(
        self, manager: PluginManager, tg: anyio.abc.TaskGroup, components: AsyncExitStack
    ) -> None:
        """Read the revocation list, start the components, discover; a failure is recorded
        (and stops the daemon) rather than raised. A stop request cancels the slow steps
        and skips the rest."""
        try:
            self._revocations = RevocationWatch(manager)
            with self._startup_step():
                await self._revocations.load(force=True)  # before anything is discovered
            if self._stop.is_set():
                return
            await tg.start(self._revocations.run)
            for start in self.components:  # fast, and their scopes must outlive this call
                if self._stop.is_set():
                    return
                hook = await components.enter_async_context(start(self, manager))
                if hook is not None:
                    self._hangup_hooks.append(hook)
            with self._startup_step():
                await self._discover(manager)
        except (PluginDError, OSError) as exc:
            self._failed(exc)

    @contextmanager
    def _startup_step(self) -> Iterator[None]:
        """Run a startup step in a scope that a stop request cancels (at once when the stop
        came first)."""
        with anyio.CancelScope() as scope:
            self._starting = scope
            if self._stop.is_set():
                scope.cancel()
            try:
                yield
            finally:
                self._starting = None

    def _failed(self, exc: BaseException) -> bool:
        """Record why the daemon cannot go on and ask it to stop; return True when `exc` is
        an expected failure (coded, or an OS error), False for a bug."""
        error, expected = _failure(exc)
        if self.failure is None:
            self.failure = error
        self.request_stop("start_failed" if not self.ready.is_set() else "failed")
        return expected

    def _begin_shutdown(self, manager: PluginManager) -> None:
        """Start the shutdown's clock (at the stop request) and refuse new runs."""
        if self._plan is not None:
            return
        self._plan = ShutdownPlan.starting(
            grace_s=self.settings.shutdown_grace_s,
            run_timeout_s=self.settings.run_timeout_s,
            now=self._stop_at,
        )
        self.events.emit(
            ev.DAEMON_STOPPING,
            reason=self.stop_reason,
            inflight=manager.inflight,
            grace_s=self.settings.shutdown_grace_s,
        )
        manager.begin_shutdown(self._plan)

    async def drained(self) -> None:
        """Return once the runs in flight have ended: finished, or cut at the shutdown's
        drain deadline (they answer `daemon_stopping`). The API calls it once it stopped
        accepting connections, before it closes the ones still open."""
        manager = self.manager
        if manager is None:
            return
        cut = await manager.drain()
        if cut:
            self.events.emit(
                ev.DAEMON_STOPPING, level="warning", reason="drain_deadline", inflight=cut
            )

    def _emit_stopped(self) -> None:
        failure = self.failure
        took = (
            None if self._stop_at is None else round((time.monotonic() - self._stop_at) * 1000, 3)
        )
        self.events.emit(
            ev.DAEMON_STOPPED,
            level="error" if failure is not None else "info",
            reason=self.stop_reason,
            error_code=failure.code if failure is not None else None,
            error=failure.message if failure is not None else None,
            duration_ms=took,
        )

    async def _flush(self) -> None:
        """Write, fsync and close the audit file: until the plan's end (at least a moment),
        never past it for good (a writer stuck on a dead disk is left behind)."""
        plan = self._plan
        budget = self.settings.shutdown_grace_s if plan is None else plan.remaining(plan.end)
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(FLUSH_MIN_S, budget)):
            await anyio.to_thread.run_sync(self.events.close, abandon_on_cancel=True)

    async def _discover(self, manager: PluginManager) -> None:
        """Load what is on disk; while the audit file fails, nothing loads (and says so)."""
        # Each load wrote plugin.change.aborted; the recovery hook discovers again.
        with contextlib.suppress(AuditUnavailable):
            await manager.discover()

    async def _audit_recovered(self) -> None:
        """Once the audit file works again: load what could not load, catch up reloads."""
        manager = self.manager
        if manager is None or not self.ready.is_set() or self._stop.is_set():
            return
        with contextlib.suppress(PluginDError):
            await manager.discover()
        for path in manager.serving_dirs():
            with contextlib.suppress(PluginDError):
                await manager.sync_dir(path)

    def _mark_ready(self) -> None:
        assert self.manager is not None
        # What start-up built lives as long as the daemon: the collector's full passes skip
        # it from now on (each took ~30 ms on a 2-CPU VM, the p99 of /run). Cycles among
        # those objects that are dropped later (a replaced plugin version loaded at start,
        # in-process) are never collected: bounded by what start-up built, once.
        gc.collect()
        gc.freeze()
        records = self.manager.records()
        self.events.emit(
            ev.DAEMON_READY,
            plugins=len(records),
            failed=sum(r.state.value == "failed" for r in records),
            keys=len(self.manager.keyring.keys),
        )
        self.ready.set()

    def _load_keys(self) -> Keyring:
        keyring = load_keyring(self.settings.keys_dir)
        for skipped in keyring.skipped:
            self.events.emit(
                ev.KEY_SKIPPED,
                level="warning",
                path=str(skipped.path),
                error_code=skipped.code,
                error=skipped.message,
            )
        return keyring

    # Signals.

    async def _signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Handle SIGTERM/SIGINT (stop) and SIGHUP (reload) for the service's whole life,
        first those held since the process started."""
        try:
            with anyio.open_signal_receiver(*signals.HELD) as received:
                task_status.started()
                for early in signals.take():
                    self._on_signal(early.signum, early.at)
                async for signum in received:
                    self._on_signal(signum, time.monotonic())
        finally:
            if signals.held():
                signals.hold()  # until the process exits: a late signal is harmless too

    def _on_signal(self, signum: int, at: float) -> None:
        if signum == signal.SIGHUP:
            self._hangup_requested()
        else:
            self.request_stop(signal.Signals(signum).name, at=at)

    def _hangup_requested(self) -> None:
        if self._stop.is_set():
            return  # stopping: there is nothing left to reload
        work = self._work
        if work is None or not self.ready.is_set():
            self._hangup_pending = True  # replayed once the daemon is ready
            return
        work.start_soon(self._hangup_task, None)

    def _replay_hangup(self, tg: anyio.abc.TaskGroup) -> None:
        if self._hangup_pending:
            self._hangup_pending = False
            tg.start_soon(self._hangup_task, "signal_during_startup")

    async def _hangup_task(self, reason: str | None) -> None:
        """Run one reload at a time; SIGHUPs during one make exactly one more after it."""
        if self._hanging:
            self._hangup_again = True
            return
        self._hanging = True
        try:
            await self.hangup(reason=reason)
            while self._hangup_again:
                self._hangup_again = False
                await self.hangup()
        finally:
            self._hanging = False

    async def hangup(self, *, reason: str | None = None) -> None:
        """Reopen the audit file, re-read keys and re-check plugins, run component hooks.

        sd_notify gets RELOADING=1 before the work; the sd_notify component's hook answers
        READY=1 after it, even if part of the reload failed.
        """
        Notifier.from_environ().reloading()
        self.events.emit(ev.DAEMON_RELOADING, reason=reason)
        try:
            await self._reload_audit_and_keys()
        finally:
            for hook in self._hangup_hooks:
                await hook()

    async def _reload_audit_and_keys(self) -> None:
        self.events.reopen()  # the writer reopens and writes audit.reopened, or keeps failing
        assert self.manager is not None
        before = self.manager.keyring.fingerprints()
        keyring = self._load_keys()
        changed = await self.manager.adopt_keyring(keyring, SYSTEM)
        if self._revocations is not None:
            await self._revocations.load(force=True)
        after = keyring.fingerprints()
        if before != after or changed:
            self.events.emit(
                ev.KEYS_CHANGED,
                keys=sorted(after),
                added=sorted(set(after) - set(before)),
                removed=sorted(set(before) - set(after)),
                plugins_affected=changed,
            )


def _failure(exc: BaseException) -> tuple[PluginDError, bool]:
    """Return the error that ends the daemon, found in `exc` (an exception group too), and
    whether it was expected (a coded error, an OS error) rather than a bug."""
    if isinstance(exc, BaseExceptionGroup):
        found = [_failure(inner) for inner in exc.exceptions]
        expected = [f for f in found if f[1]]
        return (expected or found)[0] if found else (_internal(exc), False)
    if isinstance(exc, PluginDError):
        return exc, True
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return PluginDError(f"{where}{exc.strerror or exc}", code="os_error"), True
    return _internal(exc), False


def _internal(exc: BaseException) -> PluginDError:
    return PluginDError(f"internal error ({type(exc).__name__}); see the daemon's stderr")
