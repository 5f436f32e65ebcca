"""Compose the daemon: audit sink, keys, manager, control API, watcher, signals, sd_notify.

One task group owns every task. SIGTERM/SIGINT stop the daemon (drain in-flight runs up to
`daemon.shutdown_grace_s`, tear every plugin down, flush the audit file); SIGHUP reopens the
audit file, re-reads tokens, trusted keys and the revocation list, and re-checks loaded
plugins against them. The revocation list is also read at start, before discovery, and
whenever its file changes (`service.revocations`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
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
from aisoc_plugind.errors import AuditUnavailable, PluginDError
from aisoc_plugind.service.revocations import RevocationWatch
from aisoc_plugind.service.sdnotify import Notifier
from aisoc_plugind.service.wiring import make_manager

__all__ = ["Component", "HangupHook", "Service"]

# A component (control API, watcher, sd_notify) runs inside the service as an async context
# manager; what it yields is an optional callback for SIGHUP.
HangupHook = Callable[[], Awaitable[None]]
Component = Callable[["Service", PluginManager], AbstractAsyncContextManager[HangupHook | None]]


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
        self._stop = anyio.Event()
        self._hangup_hooks: list[HangupHook] = []
        self._revocations: RevocationWatch | None = None
        self.stop_reason = "requested"

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the service to shut down gracefully."""
        self.stop_reason = reason
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start everything, serve until stopped, then shut down in order."""
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
        for warning in preflight(self.settings):
            self.events.emit(
                ev.CONFIG_WARNING, level="warning", error_code=warning.code, error=warning.message
            )
        keyring = self._load_keys()
        try:
            async with (
                make_manager(self.settings, self.events, keyring) as manager,
                anyio.create_task_group() as tg,
            ):
                self.manager = manager
                self._revocations = RevocationWatch(manager)
                await self._revocations.load(force=True)  # before anything is discovered
                await tg.start(self._revocations.run)
                tg.start_soon(self._signals)
                async with self._components(manager):
                    await self._discover(manager)
                    self._mark_ready()
                    task_status.started()
                    await self._stop.wait()
                    self.events.emit(
                        ev.DAEMON_STOPPING, reason=self.stop_reason, inflight=manager.inflight
                    )
                    # Leaving this block stops the components in reverse order: the API
                    # stops accepting and lets in-flight requests finish.
                await self._drain(manager)
                tg.cancel_scope.cancel()
        finally:
            self.events.emit(ev.DAEMON_STOPPED, reason=self.stop_reason)
            uninstall_logging()
            with anyio.CancelScope(shield=True):
                await self.events.aclose()

    async def _discover(self, manager: PluginManager) -> None:
        """Load what is on disk; while the audit file fails, nothing loads (and says so)."""
        # Each load wrote plugin.change.aborted; the recovery hook discovers again.
        with contextlib.suppress(AuditUnavailable):
            await manager.discover()

    async def _audit_recovered(self) -> None:
        """Once the audit file works again: load what could not load, catch up reloads."""
        manager = self.manager
        if manager is None or not self.ready.is_set():
            return
        with contextlib.suppress(PluginDError):
            await manager.discover()
        for path in manager.serving_dirs():
            with contextlib.suppress(PluginDError):
                await manager.sync_dir(path)

    def _mark_ready(self) -> None:
        assert self.manager is not None
        records = self.manager.records()
        self.events.emit(
            ev.DAEMON_READY,
            plugins=len(records),
            failed=sum(r.state.value == "failed" for r in records),
            keys=len(self.manager.keyring.keys),
        )
        self.ready.set()

    @asynccontextmanager
    async def _components(self, manager: PluginManager) -> AsyncIterator[None]:
        """Start the parts that serve (API, watcher) and stop them in reverse order."""
        async with AsyncExitStack() as stack:
            for start in self.components:
                hook = await stack.enter_async_context(start(self, manager))
                if hook is not None:
                    self._hangup_hooks.append(hook)
            yield

    async def _drain(self, manager: PluginManager) -> None:
        """Let runs still in flight (not started over HTTP) finish, up to the grace period."""
        with anyio.move_on_after(self.settings.shutdown_grace_s) as scope:
            await manager.wait_idle()
        if scope.cancelled_caught:
            self.events.emit(
                ev.DAEMON_STOPPING,
                level="warning",
                reason="drain_deadline",
                inflight=manager.inflight,
            )

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

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    await self.hangup()
                else:
                    self.request_stop(signal.Signals(signum).name)

    async def hangup(self) -> None:
        """Reopen the audit file, re-read keys and re-check plugins, run component hooks.

        sd_notify gets RELOADING=1 before the work; the sd_notify component's hook answers
        READY=1 after it, even if part of the reload failed.
        """
        Notifier.from_environ().reloading()
        self.events.emit(ev.DAEMON_RELOADING)
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
