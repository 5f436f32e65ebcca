"""Drive the plugin lifecycle: discover, load, enable, disable, reload, unload, install, run.

The manager composes the engine's parts (table, trust gate, preparer, host, run tracker,
staging) and owns the one lock that serialises lifecycle operations. Runs do not take it: a
run takes the version that is live when it starts and finishes on it, while a reload
prepares the new version completely before swapping it in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio

from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.gcpause import BULK_LOAD
from aisoc_plugind.core.records import SERVING, PluginRecord, State
from aisoc_plugind.core.redact import Redactor
from aisoc_plugind.core.revocation import RevocationList
from aisoc_plugind.core.signing import TrustMode, plugin_digest
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.hosts import HostInfo, PluginHost
from aisoc_plugind.engine.hosts.inprocess import InProcessHost
from aisoc_plugind.engine.install import PackageFetcher, Staging
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.engine.loading import Preparer
from aisoc_plugind.engine.loads import LoadBatch, Loads
from aisoc_plugind.engine.results import (
    SYSTEM,
    Caller,
    DiscoverResult,
    InstallResult,
    Loaded,
    Rejected,
    RunResult,
)
from aisoc_plugind.engine.retries import LoadRetries, transient
from aisoc_plugind.engine.revocations import RevocationOutcome, Revoker
from aisoc_plugind.engine.runs import RunTracker, elapsed_ms
from aisoc_plugind.engine.scan import Scanned
from aisoc_plugind.engine.scanpool import Session
from aisoc_plugind.engine.shutdown import ShutdownPlan
from aisoc_plugind.engine.table import Live, PluginTable, Slot
from aisoc_plugind.engine.trust import Recheck, TrustGate, raw_signature
from aisoc_plugind.errors import OciError, PluginDError

__all__ = ["PluginManager"]


class PluginManager:
    """Own every plugin's record and code; use as `async with PluginManager(...) as m`."""

    def __init__(
        self,
        settings: Settings,
        events: EventLog,
        keyring: Keyring,
        *,
        host: PluginHost | None = None,
        fetch: PackageFetcher | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        # Every plugin's configuration values, taken out of whatever text leaves the engine.
        self.redactor = Redactor.of_configs(settings.plugin_config)
        self._events = EngineEvents(events, self.redactor)
        self._table = PluginTable()
        self._trust = TrustGate(settings, self._events, keyring)
        self._host = host or InProcessHost(
            timeout_s=settings.run_timeout_s,
            concurrency=settings.run_concurrency,
            max_result_bytes=settings.max_result_bytes,
        )
        self._runs = RunTracker(self._events)
        self._loads = Loads(
            self._table,
            Preparer(settings, self._trust, self._host),
            self._events,
            self._runs,
            settings.plugins_dir,
        )
        self._staging = Staging(settings.plugins_dir, fetch) if fetch is not None else None
        self._revoker = Revoker(self._table, self._trust, self._loads, self._events)
        self._lock = anyio.Lock()
        self._lost: set[asyncio.Task[None]] = set()
        self._host.set_on_failed(self._host_lost)
        # Loads that failed for want of descriptors, memory or processes are tried again.
        self._retries = LoadRetries(self._events, self.sync_dir)
        self._plan: ShutdownPlan | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Tear every plugin down (all at once) until the shutdown plan's teardown deadline,
        then stop the hosts (killed when the plan's end passes); without a plan, the whole
        close takes at most `daemon.shutdown_grace_s` from now."""
        plan = self.shutdown_plan()
        with anyio.CancelScope(shield=True):
            await self._retries.aclose()
            with plan.scope(plan.teardown_until):
                await self.teardown_all()
            with plan.scope(plan.end):
                await self._host.aclose()

    @property
    def keyring(self) -> Keyring:
        """Return the trusted keys in use."""
        return self._trust.keyring

    # Queries.

    def get(self, plugin_id: str) -> PluginRecord:
        """Return the record of a plugin, or raise PluginNotFound."""
        return self._table.get(plugin_id).record

    def records(
        self, *, plugin_type: str | None = None, state: str | None = None
    ) -> list[PluginRecord]:
        """Return every record (loaded ids and failed directories), filtered."""
        return self._table.records(plugin_type=plugin_type, state=state)

    def host_of(self, plugin_id: str) -> HostInfo | None:
        """Return where the plugin's live code runs now, or None when nothing is loaded."""
        live = self._table.get(plugin_id).live
        return live.plugin.host if live is not None else None

    def _host_lost(self, plugin_ids: list[str], error: PluginDError) -> None:
        """The host layer lost these plugins for good (a crash loop): mark them failed."""
        task = asyncio.ensure_future(self._fail_lost(plugin_ids, error))
        self._lost.add(task)
        task.add_done_callback(self._lost.discard)

    async def _fail_lost(self, plugin_ids: list[str], error: PluginDError) -> None:
        async with self._lock:
            for plugin_id in plugin_ids:
                slot = self._table.slots.get(plugin_id)
                if slot is None or slot.record.state not in SERVING:
                    continue
                before = slot.record.state
                failed = slot.record.moved_to(State.FAILED).with_(error=error.as_dict())
                self._events.emit(
                    names.PLUGIN_LOAD_FAILED,
                    level="error",
                    plugin_id=plugin_id,
                    path=failed.path,
                    version=failed.version,
                    from_state=before.value,
                    to_state=State.FAILED.value,
                    error_code=error.code,
                    error=error.message,
                )
                slot.record = failed  # the code is gone with its host: applied regardless
                live, slot.live = slot.live, None
                if live is not None:
                    live.retired = True
                    live.torn_down = True

    def serving_dirs(self) -> list[Path]:
        """Return the directories the serving plugins were loaded from."""
        return self._table.serving_dirs()

    @property
    def inflight(self) -> int:
        """Return how many runs are executing now."""
        return self._runs.inflight

    async def wait_idle(self) -> None:
        """Return once no run is executing."""
        await self._runs.wait_idle()

    def begin_shutdown(self, plan: ShutdownPlan) -> None:
        """Refuse new runs (`daemon_stopping`); `drain()` and closing follow `plan`."""
        if self._plan is None:
            self._plan = plan
        self._runs.refuse()

    def shutdown_plan(self) -> ShutdownPlan:
        """Return the plan of the shutdown under way (one starting now if none was begun)."""
        if self._plan is None:
            self.begin_shutdown(
                ShutdownPlan.starting(
                    grace_s=self.settings.shutdown_grace_s,
                    run_timeout_s=self.settings.run_timeout_s,
                )
            )
        assert self._plan is not None
        return self._plan

    async def drain(self) -> int:
        """Let the runs in flight finish until the plan's drain deadline, then cut the rest
        (each ends in `daemon_stopping`, answered and audited) and give them until the
        teardown deadline to unwind; return how many were cut."""
        plan = self.shutdown_plan()
        with plan.scope(plan.drain_until):
            await self._runs.wait_idle()
        cut = self._runs.cut()
        if cut:
            with plan.scope(plan.teardown_until):
                await self._runs.wait_idle()
        return cut

    async def settled(self) -> None:
        """Return once the lifecycle operation in progress (if any) has finished.

        A change's event is written before the change is applied; awaiting this after
        seeing the event guarantees the change is visible (or was aborted).
        """
        async with self._lock:
            pass

    # Discovery and reloads.

    async def discover(self, caller: Caller = SYSTEM) -> DiscoverResult:
        """Scan `plugins.dir`; load what is new, retry what failed, flag what vanished."""
        async with self._lock, BULK_LOAD:  # (see core.gcpause)
            self._loads.flag_missing()
            self._host.warm_up()
            loaded: list[str] = []
            failed: list[Rejected] = []
            batch = LoadBatch()  # every new plugin of the scan commits with one fsync
            paths = await anyio.to_thread.run_sync(self._loads.candidates)
            async with self._loads.preparer.session(paths) as session:
                async for items in self._scanned(session):
                    for outcome in await self._loads.load_scanned(items, caller, batch):
                        if isinstance(outcome, Loaded):
                            loaded.append(outcome.plugin_id)
                        elif isinstance(outcome, Rejected):
                            failed.append(outcome)
                            self._retries.note(outcome.path, outcome.error, outcome.plugin_id)
            await self._loads.settle(batch, caller)
            await self._events.commit()  # the failures' events too, before the answer
            return DiscoverResult(discovered=loaded, failed=failed)

    async def _retry_failed(self, caller: Caller) -> None:
        """Try again every directory that failed (a trusted key came back or changed)."""
        async with self._lock:
            failed = {
                Path(s.record.path)
                for s in self._table.slots.values()
                if s.record.state is State.FAILED
            }
            paths = sorted(failed | set(self._table.rejected_dirs()))
            batch = LoadBatch()
            async with self._loads.preparer.session(paths) as session:
                async for items in self._scanned(session):
                    present = [i for i in items if i.error is None or i.bundle is not None]
                    await self._loads.load_scanned(present, caller, batch)
            await self._loads.settle(batch, caller)

    async def _scanned(self, session: Session) -> AsyncIterator[list[Scanned]]:
        """Yield a discovery's scan results chunk by chunk, or all at once for a host that
        loads better together (a host process per group, which must know every plugin
        directory of its group when it starts)."""
        together: list[Scanned] = []
        # In warn mode a verified directory must win its id over an unverified one wherever
        # the scan found them (`verified_first` orders the directories of one list).
        at_once = self._host.loads_together or self._trust.mode is TrustMode.WARN
        while (chunk := await session.next_chunk()) is not None:
            if not at_once:
                yield chunk
            else:
                together.extend(chunk)
        if together:
            yield together

    async def sync_dir(self, path: Path, caller: Caller = SYSTEM) -> None:
        """Bring one plugin directory up to date after its files changed (the watcher's entry).

        A serving plugin is reloaded from it; a failed or unknown one is (re)tried; a
        directory that is gone flags the plugin that was loaded from it.
        """
        async with self._lock:
            slot = self._table.slot_at(path)
            if self._loads.gone(path):
                return
            if slot is not None and slot.record.state in SERVING:
                if not await self._unchanged(slot, path):
                    await self._reload_noted(slot, path, caller)
            else:
                batch = LoadBatch()
                outcome = await self._loads.load_guarded(path, caller, batch)
                await self._loads.settle(batch, caller)
                rejected = outcome if isinstance(outcome, Rejected) else None
                self._retries.note(
                    path,
                    rejected.error if rejected else None,
                    rejected.plugin_id if rejected else None,
                )

    async def _reload_noted(self, slot: Slot, path: Path, caller: Caller) -> None:
        """Reload a serving plugin from `path`; a transient failure is tried again later."""
        try:
            await self._loads.reload(slot, path, caller)
        except PluginDError as exc:
            self._retries.note(path, exc, slot.record.id)
            raise
        self._retries.note(path, None)

    async def _unchanged(self, slot: Slot, path: Path) -> bool:
        """Return True when `path` holds exactly the manifest, code and plugin.sig in memory.

        Only the watcher asks: a `touch`, a rename into place or a catch-up costs a read and
        a hash instead of a reload. An operator's `reload` always re-imports.
        """
        if slot.record.error is not None or Path(slot.record.path) != path:
            return False
        try:
            bundle, manifest = await self._loads.preparer.read(path)
        except PluginDError as exc:
            if transient(exc):  # cannot tell now (no descriptor, no memory): look again later
                self._retries.note(path, exc, slot.record.id)
                return True
            return False
        digest = plugin_digest(manifest.as_json(), bundle.sources).hex()
        return digest == slot.record.digest and bundle.signature == slot.signature_file

    async def reload(
        self, plugin_id: str, caller: Caller = SYSTEM, *, allow_downgrade: bool = False
    ) -> PluginRecord:
        """Re-read, re-verify and re-import from disk; on failure the old version serves on.

        A failed or unloaded plugin is loaded again as new. When the plugin's directory is
        gone, the directory now holding its id is used (the seed's upgrade flow). A lower
        version is refused (VersionDowngrade) unless `allow_downgrade` (the seed's rollback).
        """
        async with self._lock:
            slot = self._table.get(plugin_id)
            path = await anyio.to_thread.run_sync(self._loads.reload_path, slot)
            if slot.record.state not in SERVING:
                return await self._loads.retry(slot, path, caller)
            return await self._loads.reload(slot, path, caller, allow_downgrade=allow_downgrade)

    # Operator switches.

    async def enable(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Accept run calls again (disabled -> enabled); enabling an enabled plugin is a no-op."""
        return await self._switch(plugin_id, State.ENABLED, names.PLUGIN_ENABLED, caller)

    async def disable(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Block run calls but keep the code loaded (enabled -> disabled)."""
        return await self._switch(plugin_id, State.DISABLED, names.PLUGIN_DISABLED, caller)

    async def _switch(self, plugin_id: str, to: State, event: str, caller: Caller) -> PluginRecord:
        async with self._lock:
            slot = self._table.get(plugin_id)
            before = slot.record.state
            if to is State.ENABLED:
                self._trust.check_enable(slot.record)  # plugin_untrusted / plugin_revoked
            if before is not to:
                changed = slot.record.moved_to(to)
                seq = self._events.state(event, changed, before, caller)
                await self._events.require(seq, plugin_id=plugin_id, event=event, caller=caller)
                slot.record = changed
            slot.trust_disabled = False  # the operator decided: a returning key changes nothing
            return slot.record

    async def unload(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Remove the plugin from memory (teardown, free modules); files stay on disk."""
        async with self._lock:
            slot = self._table.get(plugin_id)
            before = slot.record.state
            unloaded = slot.record.moved_to(State.UNLOADED).with_(loaded_at=None)
            seq = self._events.state(names.PLUGIN_UNLOADED, unloaded, before, caller)
            await self._events.require(
                seq, plugin_id=plugin_id, event=names.PLUGIN_UNLOADED, caller=caller
            )
            slot.record = unloaded
            live, slot.live = slot.live, None
            if live is not None:
                live.retired = True
                await self._runs.retire_if_idle(live, plugin_id)
            return slot.record

    async def adopt_keyring(self, keyring: Keyring, caller: Caller = SYSTEM) -> list[str]:
        """Switch to a new keyring and re-check every verified plugin that is in memory.

        Returns the ids whose trust changed.
        """
        async with self._lock:
            gained = _gained(self._trust.keyring, keyring)
            self._trust.keyring = keyring
            changed: list[str] = []
            for slot in self._table.slots.values():
                signature = slot.signature or raw_signature(slot.signature_file)
                found = self._trust.recheck(slot.record, signature, caller)
                if found is not None:
                    self._apply_recheck(slot, found, caller)
                    changed.append(slot.record.id)
            changed += self._revoker.sweep(caller)
        if gained:  # failures for want of this key are worth another try
            await self._retry_failed(caller)
        return changed

    def _apply_recheck(self, slot: Slot, found: Recheck, caller: Caller) -> None:
        """Take a re-checked record; a plugin its key's removal disabled is enabled again
        when the key is back (one the operator disabled stays disabled)."""
        before = slot.record.state
        slot.record = found.record
        if found.disabled:
            slot.trust_disabled = True
            self._events.state(names.PLUGIN_DISABLED, slot.record, before, caller)
        elif found.restored and slot.trust_disabled:
            slot.trust_disabled = False
            if before is State.DISABLED:
                slot.record = slot.record.moved_to(State.ENABLED)
                self._events.state(names.PLUGIN_ENABLED, slot.record, before, caller)

    @property
    def revoked(self) -> RevocationList:
        """Return the revocation list in force."""
        return self._trust.revoked

    async def adopt_revocations(
        self, revoked: RevocationList, caller: Caller = SYSTEM
    ) -> RevocationOutcome:
        """Switch to a new revocation list: disable the loaded plugins it revokes (with
        `plugin.revoked`), reload and re-enable those it no longer revokes."""
        async with self._lock:
            return await self._revoker.adopt(revoked, caller)

    # OCI install.

    async def install_from_oci(
        self, oci_ref: str, caller: Caller = SYSTEM, *, replace: bool = False
    ) -> InstallResult:
        """Pull a signed package, verify it in staging, move it into place, and load it.

        Nothing reaches `plugins.dir/<id>` unless the signature inside the package passes the
        trust mode; the load then verifies again what it imports. An existing directory of
        that name is never overwritten (the platform never deletes plugin files). With
        `replace`, an installed id is upgraded through a reload: its directory moves to
        `.previous/<id>@<version>/` once the new version is set up, and stays where it was
        (the old version serving) when the new one fails.
        """
        started = time.perf_counter()
        try:
            plugin_id, digest = await self._install(oci_ref, caller, replace=replace)
        except PluginDError as exc:
            self._events.redacted(exc)
            self._events.emit(
                names.PLUGIN_INSTALL_FAILED,
                level="error",
                oci_ref=oci_ref,
                error_code=exc.code,
                error=exc.message,
                duration_ms=elapsed_ms(started),
                **caller.fields(),
            )
            raise
        seq = self._events.emit(
            names.PLUGIN_INSTALL_COMPLETED,
            plugin_id=plugin_id,
            oci_ref=oci_ref,
            digest=digest,
            duration_ms=elapsed_ms(started),
            **caller.fields(),
        )
        await self._events.commit(seq)
        return InstallResult(plugin_id=plugin_id, oci_ref=oci_ref, digest=digest)

    async def _install(self, oci_ref: str, caller: Caller, *, replace: bool) -> tuple[str, str]:
        if self._staging is None:
            raise OciError(
                "installing plugins from OCI registries is not available in this daemon",
                code="oci_not_configured",
            )
        async with self._staging.fetched(oci_ref) as fetched:
            bundle, manifest = await self._loads.preparer.read(fetched.path)
            self._trust.require(bundle, manifest, caller)
            if not fetched.pinned:
                self._events.emit(
                    names.PLUGIN_INSTALL_UNPINNED,
                    level="warning",
                    plugin_id=manifest.id,
                    oci_ref=oci_ref,
                    digest=fetched.digest,
                    **caller.fields(),
                )
            async with self._lock:
                if replace:
                    await self._replace(fetched.path, manifest.id, caller)
                else:
                    target = await anyio.to_thread.run_sync(
                        self._staging.place, fetched.path, manifest.id
                    )
                    await self._loads.load_installed(target, manifest.id, caller)
        return manifest.id, fetched.digest

    async def _replace(self, staging: Path, plugin_id: str, caller: Caller) -> None:
        """Swap the verified files in for the id's directory and load them (a reload when
        the id serves); when that fails, swap back: the old version serves from where it was."""
        assert self._staging is not None
        slot = self._table.slots.get(plugin_id)
        current = Path(slot.record.path) if slot is not None else None
        version = slot.record.version if slot is not None else "unknown"
        swap = await anyio.to_thread.run_sync(
            self._staging.swap, staging, plugin_id, current, version
        )
        try:
            await self._loads.load_installed(swap.target, plugin_id, caller)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._staging.swap_back, swap)
            raise

    # Runs and shutdown.

    async def run(
        self,
        plugin_id: str,
        payload: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        caller: Caller = SYSTEM,
    ) -> RunResult:
        """Invoke the plugin's `run` on the live version, with the per-call time limit."""
        return await self._runs.run(self._table.get(plugin_id), payload, context, caller)

    async def teardown_all(self) -> None:
        """Call `teardown()` on every live plugin, all at once, and free its modules.

        A teardown still running when this is cancelled (the shutdown's deadline) is reported
        as `plugin.teardown.failed`; its host is ended by the host layer's close.
        """
        lives: list[tuple[str, Live]] = []
        for plugin_id, slot in list(self._table.slots.items()):
            live, slot.live = slot.live, None
            if live is not None:
                lives.append((plugin_id, live))
        pending = {plugin_id for plugin_id, _ in lives}

        async def one(plugin_id: str, live: Live) -> None:
            await self._runs.teardown(live, plugin_id)
            pending.discard(plugin_id)

        try:
            async with anyio.create_task_group() as tg:
                for plugin_id, live in lives:
                    tg.start_soon(one, plugin_id, live)
        finally:
            for plugin_id in sorted(pending):
                self._events.emit(
                    names.PLUGIN_TEARDOWN_FAILED,
                    level="warning",
                    plugin_id=plugin_id,
                    error_code="plugin_teardown_failed",
                    error="teardown() had not returned when the shutdown deadline passed",
                )


def _gained(before: Keyring, after: Keyring) -> bool:
    """Return True when `after` trusts a key (id and key bytes) that `before` did not."""
    old = before.fingerprints()
    return any(old.get(key_id) != value for key_id, value in after.fingerprints().items())
