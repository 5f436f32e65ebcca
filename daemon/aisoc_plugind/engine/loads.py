"""Load plugin directories into slots, and reload serving plugins without a gap in service.

The old version keeps serving until the new one is fully set up. No reload lowers a version
(semantic-versioning order, `core.versions`) unless the caller passes `allow_downgrade` (the
operator's explicit word); then `plugin.version.downgraded` says so. Callers hold the manager's
lifecycle lock; nothing here takes it.

Who owns an id: a serving plugin keeps it against any other directory (the first loaded
wins); a directory that failed (refused by the trust mode, or any other load error) never
holds it against a directory that loads. Among the directories of one scan that claim one id,
a verified one is tried first. A record's `manifest` is the signed manifest part of the
version the trust mode admitted (no `signature`/`trust` keys), and empty for a directory it
never admitted.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from aisoc_plugind.audit import names
from aisoc_plugind.core.clock import utcnow
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.core.records import SERVING, PluginRecord, State
from aisoc_plugind.core.signing import SignatureStatus, manifest_part, parse_signature
from aisoc_plugind.core.versions import VersionChange, change, needs_operator
from aisoc_plugind.engine.bundle import has_manifest
from aisoc_plugind.engine.directories import candidate_dirs, find_plugin_dir
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.hosts import LoadRequest
from aisoc_plugind.engine.hosts.faults import cancelled_here, type_name
from aisoc_plugind.engine.loading import Prepared, Preparer
from aisoc_plugind.engine.results import Caller, Deferred, Loaded, LoadOutcome, Rejected
from aisoc_plugind.engine.runs import RunTracker, elapsed_ms
from aisoc_plugind.engine.scan import Scanned
from aisoc_plugind.engine.table import Live, PluginTable, Slot
from aisoc_plugind.errors import (
    AuditUnavailable,
    DuplicatePluginId,
    PluginDError,
    PluginLoadError,
    SignatureRefused,
    VersionDowngrade,
)

__all__ = ["LoadBatch", "Loads", "installed", "verified_first"]


@dataclass(slots=True, kw_only=True)
class _Pending:
    """A fresh load whose events are emitted; its slot joins the table once they are written."""

    slot: Slot
    prepared: Prepared
    record: PluginRecord
    seq: int


@dataclass(slots=True)
class LoadBatch:
    """Fresh loads prepared together and committed with one durable write (one fsync)."""

    pending: dict[str, _Pending] = field(default_factory=dict)
    reserved: dict[str, Slot] = field(default_factory=dict)  # admitted, being loaded

    def owner(self, plugin_id: str) -> Slot | None:
        """Return the slot that holds `plugin_id` in this batch (loaded or being loaded)."""
        found = self.pending.get(plugin_id)
        return found.slot if found is not None else self.reserved.get(plugin_id)


@dataclass(slots=True, kw_only=True)
class _Fresh:
    """A new plugin admitted (trusted, configured): its record and what the host loads."""

    slot: Slot
    record: PluginRecord
    scanned: Scanned
    request: LoadRequest


class Loads:
    """The load and reload flows of the plugin lifecycle."""

    def __init__(
        self,
        table: PluginTable,
        preparer: Preparer,
        events: EngineEvents,
        runs: RunTracker,
        plugins_dir: Path,
    ) -> None:
        self.table = table
        self.preparer = preparer
        self.events = events
        self.runs = runs
        self.plugins_dir = plugins_dir

    def candidates(self) -> list[Path]:
        """Return the plugin directories no serving plugin was loaded from."""
        return candidate_dirs(self.plugins_dir, self.table.serving_dirs())

    async def load_guarded(self, path: Path, caller: Caller, batch: LoadBatch) -> LoadOutcome:
        """Load one directory; an unexpected error fails that directory, never the caller."""
        scanned = await self.preparer.scan(path)
        return (await self.load_scanned([scanned], caller, batch))[0]

    async def load_new(self, path: Path, caller: Caller, batch: LoadBatch) -> LoadOutcome:
        """Load a directory as a new plugin; a success joins `batch` (see `settle`)."""
        return await self.load_guarded(path, caller, batch)

    async def load_scanned(
        self, items: list[Scanned], caller: Caller, batch: LoadBatch
    ) -> list[LoadOutcome]:
        """Load scanned directories as new plugins; successes join `batch` (see `settle`).

        Per directory, in order: `plugin.discovered` and the trust decision; then the host
        loads every admitted one together; then `plugin.loaded` and `plugin.enabled` (or
        `plugin.load.failed`). An unexpected error fails that directory, never the others.
        A directory claiming an id that another one of `items` is being loaded under waits
        for the outcome: it is a duplicate if that one loaded, and takes the id if it failed.
        """
        items = verified_first(items)
        outcomes: list[LoadOutcome | None] = [None] * len(items)
        todo = list(enumerate(items))
        while todo:
            todo = await self._load_round(todo, outcomes, caller, batch)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _load_round(
        self,
        todo: list[tuple[int, Scanned]],
        outcomes: list[LoadOutcome | None],
        caller: Caller,
        batch: LoadBatch,
    ) -> list[tuple[int, Scanned]]:
        """Admit and load what can be decided now; return the directories that must wait."""
        fresh: list[tuple[int, _Fresh]] = []
        waiting: list[tuple[int, Scanned]] = []
        for index, scanned in todo:
            if scanned.manifest is not None and scanned.manifest.id in batch.reserved:
                waiting.append((index, scanned))
                continue
            admitted = self._admit_guarded(scanned, caller, batch)
            if isinstance(admitted, _Fresh):
                fresh.append((index, admitted))
            else:
                outcomes[index] = admitted
        try:
            results = await self.preparer.load_many([(f.scanned, f.request) for _, f in fresh])
        except PluginDError:
            raise
        except BaseException as exc:  # the host failed as a whole: each of these fails
            if cancelled_here(exc):
                raise
            results = [_unexpected_error(exc) for _ in fresh]
        for (index, admitted), result in zip(fresh, results, strict=True):
            outcomes[index] = self._loaded(admitted, result, caller, batch)
        return waiting

    def _admit_guarded(
        self, scanned: Scanned, caller: Caller, batch: LoadBatch
    ) -> LoadOutcome | _Fresh:
        try:
            return self._admit(scanned, caller, batch)
        except PluginDError:
            raise
        except BaseException as exc:  # a bug or a parser we do not control: contain it
            if cancelled_here(exc):
                raise
            return self._unexpected(scanned.path, exc, caller)

    def _unexpected(self, path: Path, exc: BaseException, caller: Caller) -> Rejected:
        error = _unexpected_error(exc)
        self.events.load_failed(None, path, error, caller)
        return self.table.reject(path, error)

    def _admit(self, scanned: Scanned, caller: Caller, batch: LoadBatch) -> LoadOutcome | _Fresh:
        """Sort out errors and duplicates, write `plugin.discovered` and the trust decision."""
        path, manifest = scanned.path, scanned.manifest
        if scanned.error is not None:
            self.events.redacted(scanned.error)
            self.events.load_failed(None, path, scanned.error, caller)
            return self.table.reject(path, scanned.error)
        assert manifest is not None
        owner = batch.owner(manifest.id) or self.table.slots.get(manifest.id)
        if owner is not None and Path(owner.record.path) != path:
            if _keeps_id(owner.record):
                return self._other_owner(owner, path, manifest, caller)
            self._give_up_id(owner)
        self.table.clear(path)
        record = _new_record(manifest, path)
        self.events.state(names.PLUGIN_DISCOVERED, record, None, caller)
        try:
            request = self.preparer.admit(scanned, caller)
        except PluginDError as exc:
            return self._failed(record, exc, caller)
        record = record.with_(manifest=manifest_part(manifest.plain))  # admitted: shown
        slot = Slot(record=record)
        batch.reserved[manifest.id] = slot
        return _Fresh(slot=slot, record=record, scanned=scanned, request=request)

    def _give_up_id(self, owner: Slot) -> None:
        """Take the id from a failed (or unloaded, gone) record: a failed directory that is
        still there stays listed among the failures."""
        record = owner.record
        del self.table.slots[record.id]
        if record.state is State.FAILED and record.error is not None:
            error = PluginLoadError(record.error["message"], code=record.error["code"])
            self.table.reject(Path(record.path), error, record=record)

    def _failed(self, record: PluginRecord, exc: PluginDError, caller: Caller) -> Rejected:
        self.events.redacted(exc)
        path = Path(record.path)
        failed = record.moved_to(State.FAILED).with_(error=exc.as_dict(), **_signature_fields(exc))
        self.table.slots[record.id] = Slot(record=failed)
        self.events.load_failed(failed, path, exc, caller)
        return self.table.reject(path, exc, plugin_id=record.id)

    def _loaded(
        self, fresh: _Fresh, result: Prepared | PluginDError, caller: Caller, batch: LoadBatch
    ) -> LoadOutcome:
        record = fresh.record
        batch.reserved.pop(record.id, None)
        if isinstance(result, PluginDError):
            return self._failed(_checked(record, fresh.scanned), result, caller)
        self.preparer.trust.loaded(result.decision, result.bundle, result.manifest, caller)
        loaded = installed(record, result).moved_to(State.LOADED)
        self.events.state(names.PLUGIN_LOADED, loaded, State.DISCOVERED, caller)
        enabled = loaded.moved_to(State.ENABLED)
        seq = self.events.state(names.PLUGIN_ENABLED, enabled, State.LOADED, caller)
        batch.pending[record.id] = _Pending(
            slot=fresh.slot, prepared=result, record=enabled, seq=seq
        )
        return Loaded(plugin_id=record.id)

    def _other_owner(
        self, owner: Slot, path: Path, manifest: Manifest, caller: Caller
    ) -> LoadOutcome:
        """Report `path` as a duplicate of the id's owner, unless the owner merely moved."""
        if owner.record.state in SERVING and not Path(owner.record.path).is_dir():
            return Deferred(path=path, plugin_id=manifest.id)
        error = DuplicatePluginId(
            f"duplicate plugin id {manifest.id!r}: {path} declares the id already loaded "
            f"from {owner.record.path}; the first one loaded wins"
        )
        self.events.emit(
            names.PLUGIN_DUPLICATE_ID,
            level="warning",
            plugin_id=manifest.id,
            path=str(path),
            loaded_path=owner.record.path,
            error_code=error.code,
            error=error.message,
            **caller.fields(),
        )
        failed = _new_record(manifest, path).moved_to(State.FAILED).with_(error=error.as_dict())
        return self.table.reject(path, error, record=failed)

    async def settle(self, batch: LoadBatch, caller: Caller) -> None:
        """Put the batch's plugins in the table once their events are durable.

        When they cannot be made durable, every prepared version is torn down, each load gets
        `plugin.change.aborted`, and AuditUnavailable is raised: nothing of the batch serves.
        """
        if not batch.pending:
            return
        last = max(batch.pending.values(), key=lambda p: p.seq)
        try:
            await self.events.require(
                last.seq, plugin_id=last.record.id, event=names.PLUGIN_ENABLED, caller=caller
            )
        except AuditUnavailable:
            await self._abort(batch, last, caller)
            raise
        for pending in batch.pending.values():
            self.table.slots[pending.record.id] = pending.slot
            self.swap_in(pending.slot, pending.prepared, pending.record)
        batch.pending.clear()

    async def _abort(self, batch: LoadBatch, reported: _Pending, caller: Caller) -> None:
        for pending in batch.pending.values():
            if pending is not reported:
                self.events.emit(
                    names.PLUGIN_CHANGE_ABORTED,
                    level="error",
                    plugin_id=pending.record.id,
                    aborted_event=names.PLUGIN_ENABLED,
                    aborted_seq=pending.seq,
                    error_code="audit_unavailable",
                    **caller.fields(),
                )
            with contextlib.suppress(PluginDError):
                await pending.prepared.plugin.teardown()
        batch.pending.clear()

    async def retry(self, slot: Slot, path: Path | None, caller: Caller) -> PluginRecord:
        """Load a failed or unloaded plugin afresh, from wherever its id now lives."""
        plugin_id = slot.record.id
        if path is None:
            raise PluginLoadError(
                f"no directory under {self.plugins_dir} holds plugin {plugin_id!r}",
                code="plugin_dir_missing",
            )
        del self.table.slots[plugin_id]  # the new attempt owns the id, wherever it lives
        batch = LoadBatch()
        try:
            outcome = await self.load_guarded(path, caller, batch)
            await self.settle(batch, caller)
        finally:
            self.table.slots.setdefault(plugin_id, slot)  # nothing loaded: keep the record
        if isinstance(outcome, Rejected):
            raise outcome.error
        return self.table.slots[plugin_id].record

    async def reload(
        self, slot: Slot, path: Path | None, caller: Caller, *, allow_downgrade: bool = False
    ) -> PluginRecord:
        """Replace a serving plugin's code with what `path` holds now; on failure the old
        version keeps serving, the record shows the error and the error is raised.

        A lower (or incomparable) version is refused with VersionDowngrade unless
        `allow_downgrade`."""
        started = time.perf_counter()
        old_version = slot.record.version
        try:
            prepared = await self._prepare_reload(slot, path, caller, allow_downgrade)
        except BaseException as exc:
            if cancelled_here(exc):
                raise
            error = self.events.redacted(
                exc if isinstance(exc, PluginDError) else _unexpected_error(exc)
            )
            slot.record = slot.record.with_(error=error.as_dict())
            self.events.emit(
                names.PLUGIN_RELOAD_FAILED,
                level="error",
                plugin_id=slot.record.id,
                path=str(path or slot.record.path),
                version=old_version,
                error_code=error.code,
                error=error.message,
                duration_ms=elapsed_ms(started),
                **caller.fields(),
            )
            if error is exc:
                raise
            raise error from exc
        self.preparer.trust.loaded(prepared.decision, prepared.bundle, prepared.manifest, caller)
        record = installed(slot.record, prepared)
        self._note_downgrade(record, old_version, caller)
        seq = self.events.emit(
            names.PLUGIN_RELOAD_COMPLETED,
            plugin_id=record.id,
            path=record.path,
            version=record.version,
            from_version=old_version,
            state=record.state.value,
            signature_status=record.signature_status,
            signing_key_id=record.signing_key_id,
            duration_ms=elapsed_ms(started),
            **caller.fields(),
        )
        try:
            await self.events.require(
                seq, plugin_id=record.id, event=names.PLUGIN_RELOAD_COMPLETED, caller=caller
            )
        except AuditUnavailable:
            with contextlib.suppress(PluginDError):
                await prepared.plugin.teardown()
            raise
        old = slot.live
        self.swap_in(slot, prepared, record)
        await self.runs.retire_if_idle(old, slot.record.id)
        return record

    def _note_downgrade(self, record: PluginRecord, old_version: str, caller: Caller) -> None:
        """Emit `plugin.version.downgraded` when an allowed reload lowers the version."""
        found = change(old_version, record.version)
        if needs_operator(found):
            self.events.emit(
                names.PLUGIN_VERSION_DOWNGRADED,
                level="warning",
                plugin_id=record.id,
                path=record.path,
                version=record.version,
                from_version=old_version,
                change=found.value,
                **caller.fields(),
            )

    async def _prepare_reload(
        self, slot: Slot, path: Path | None, caller: Caller, allow_downgrade: bool = False
    ) -> Prepared:
        if path is None:
            raise PluginLoadError(
                f"{slot.record.path} is gone and no other directory "
                f"holds plugin {slot.record.id!r}",
                code="plugin_dir_missing",
            )
        scanned = await self.preparer.scan(path)
        if scanned.error is not None:
            raise scanned.error
        if scanned.manifest is not None and scanned.manifest.id != slot.record.id:
            raise PluginLoadError(
                f"{path} now declares id {scanned.manifest.id!r}, not {slot.record.id!r}",
                code="plugin_id_changed",
            )
        if scanned.manifest is not None and not allow_downgrade:
            _refuse_downgrade(slot.record, scanned.manifest.version)
        return await self.preparer.prepare(scanned, caller)

    async def load_installed(self, target: Path, plugin_id: str, caller: Caller) -> None:
        """Load a freshly installed directory: reload a serving plugin of that id from it,
        or load it as new (a failed or unloaded record of the id gives way)."""
        slot = self.table.slots.get(plugin_id)
        if slot is not None and slot.record.state in SERVING:
            await self.reload(slot, target, caller)
            return
        if slot is not None:
            del self.table.slots[plugin_id]
        batch = LoadBatch()
        outcome = await self.load_new(target, caller, batch)
        if isinstance(outcome, Rejected):
            raise outcome.error
        await self.settle(batch, caller)

    def swap_in(self, slot: Slot, prepared: Prepared, record: PluginRecord) -> None:
        """Make a prepared version (and its record) the live one; retire the previous one."""
        old, slot.live = slot.live, Live(plugin=prepared.plugin)
        slot.record = record
        d = prepared.decision
        slot.signature = (
            parse_signature(prepared.bundle.signature or b"")
            if d.status is SignatureStatus.VERIFIED
            else None
        )
        slot.signature_file = prepared.bundle.signature
        self.table.clear(prepared.bundle.path)
        if old is not None:
            old.retired = True

    def reload_path(self, slot: Slot) -> Path | None:
        """Return the directory that holds the slot's id now (blocking: run in a thread)."""
        others = self.table.rejected_dirs() + self.candidates()
        return find_plugin_dir(slot.record.id, Path(slot.record.path), others)

    def flag_missing(self) -> None:
        """Flag serving plugins whose directory vanished (once, with an event)."""
        for slot in self.table.slots.values():
            gone = not Path(slot.record.path).is_dir()
            if gone and not slot.record.path_missing and slot.record.state in SERVING:
                self.events.emit(
                    names.PLUGIN_PATH_MISSING,
                    level="warning",
                    plugin_id=slot.record.id,
                    path=slot.record.path,
                    version=slot.record.version,
                )
            slot.record = slot.record.with_(path_missing=gone)

    def gone(self, path: Path) -> bool:
        """Return True when `path` no longer holds a plugin (forgetting its failure)."""
        if has_manifest(path):
            return False
        self.flag_missing()
        self.table.clear(path)
        return True


def installed(record: PluginRecord, prepared: Prepared) -> PluginRecord:
    """Return `record` as it reads once `prepared` serves (its state unchanged)."""
    m, d = prepared.manifest, prepared.decision
    return record.with_(
        name=m.name,
        version=m.version,
        plugin_type=m.plugin_type,
        path=str(prepared.bundle.path),
        manifest=manifest_part(m.plain),
        loaded_at=utcnow(),
        signature_status=d.status.value,
        signing_key_id=d.key_id,
        digest=d.digest_hex,
        error=None,
        path_missing=False,
    )


def _refuse_downgrade(record: PluginRecord, candidate: str) -> None:
    """Raise VersionDowngrade when `candidate` would lower (or lose the order of) the version."""
    found = change(record.version, candidate)
    if not needs_operator(found):
        return
    how = (
        "is lower than"
        if found is VersionChange.DOWNGRADE
        else "cannot be ordered against (not semantic versioning)"
    )
    raise VersionDowngrade(
        f"version {candidate!r} on disk {how} the serving version {record.version!r}; "
        "only the operator may make this change (reload with allow_downgrade)"
    )


def _new_record(manifest: Manifest, path: Path) -> PluginRecord:
    return PluginRecord(
        id=manifest.id,
        name=manifest.name,
        version=manifest.version,
        plugin_type=manifest.plugin_type,
        state=State.DISCOVERED,
        signature_status=None,
        signing_key_id=None,
        error=None,
        path=str(path),
        loaded_at=None,
        manifest={},  # nothing of a manifest is shown before the trust mode admits it
    )


def _unexpected_error(exc: BaseException) -> PluginLoadError:
    return PluginLoadError(
        f"loading failed unexpectedly ({type_name(exc)})", code="plugin_load_error"
    )


def _checked(record: PluginRecord, scanned: Scanned) -> PluginRecord:
    """Return `record` with the signature status its scan found (a load that failed after
    the trust decision still says what that decision was)."""
    decision = scanned.decision
    if decision is None:
        return record
    return record.with_(signature_status=decision.status.value, signing_key_id=decision.key_id)


def _signature_fields(exc: PluginDError) -> dict[str, str]:
    if isinstance(exc, SignatureRefused):
        return {"signature_status": exc.code.removeprefix("signature_")}
    return {}


def _keeps_id(record: PluginRecord) -> bool:
    """Return True when a plugin's id stays with it against another directory claiming it:
    a serving one, or one being loaded or unloaded whose directory is there; never a failed
    one (an unsigned directory must not squat the id of a signed plugin)."""
    if record.state in SERVING:
        return True
    return record.state is not State.FAILED and Path(record.path).is_dir()


def verified_first(items: list[Scanned]) -> list[Scanned]:
    """Order the directories that claim one id so that verified ones come first (stable);
    every other directory keeps its place."""
    places: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.manifest is not None:
            places.setdefault(item.manifest.id, []).append(index)
    ordered = list(items)
    for indices in places.values():
        if len(indices) > 1:
            ranked = sorted((items[i] for i in indices), key=_unverified)
            for index, item in zip(indices, ranked, strict=True):
                ordered[index] = item
    return ordered


def _unverified(item: Scanned) -> bool:
    decision = item.decision
    return decision is None or decision.status is not SignatureStatus.VERIFIED
