"""Drive the plugin lifecycle: discover, load, enable, disable, reload, unload and run.

Every step that changes something or decides about trust emits one event. Lifecycle
operations are serialised by one lock; runs are not: a run takes the version that is live
when it starts and finishes on it, while a reload prepares the new version completely
(read once, verify, import, construct, set up) before swapping it in. The old version is
torn down only after its last in-flight run has returned.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio

from aisoc_plugind.audit import log as ev
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.manifest import Manifest, config_problem
from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.core.records import SERVING, PluginRecord, State, utcnow
from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustDecision,
    TrustMode,
    decide,
    find_signer,
    parse_signature,
    plugin_digest,
)
from aisoc_plugind.delivery import oci
from aisoc_plugind.engine.bundle import Bundle, has_manifest, read_bundle, read_manifest
from aisoc_plugind.engine.hosts.loader import ImportedBundle, import_bundle
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.errors import (
    BundleError,
    DuplicatePluginId,
    ManifestError,
    PluginDError,
    PluginLoadError,
    PluginNotFound,
    PluginResultInvalid,
    PluginRunError,
    PluginStateConflict,
    PluginTimeout,
    SignatureRefused,
)

# Exceptions a plugin may raise that must not end the daemon (sys.exit() in a plugin, ...).
PLUGIN_FAULTS = (Exception, SystemExit, KeyboardInterrupt)
MAX_ERROR_TEXT = 500
_SIGNATURE_EVENTS = {
    SignatureStatus.VERIFIED: ev.PLUGIN_SIGNATURE_VERIFIED,
    SignatureStatus.UNSIGNED: ev.PLUGIN_SIGNATURE_UNSIGNED,
    SignatureStatus.INVALID: ev.PLUGIN_SIGNATURE_INVALID,
    SignatureStatus.SKIPPED: ev.PLUGIN_SIGNATURE_SKIPPED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who asked for an operation, for the audit trail."""

    actor: str | None = None
    request_id: str | None = None

    def fields(self) -> dict[str, str]:
        """Return the audit fields that are set."""
        return {k: v for k, v in (("actor", self.actor), ("request_id", self.request_id)) if v}


SYSTEM = Caller(actor="system")


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoverResult:
    """What one discovery pass did (`POST /discover`'s body)."""

    discovered: list[str]
    failed: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"discovered": self.discovered, "failed": self.failed}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """The outcome of one successful run."""

    plugin_id: str
    result: dict[str, Any]
    duration_ms: float

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"plugin_id": self.plugin_id, "result": self.result,
                "duration_ms": self.duration_ms}


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallResult:
    """The outcome of one OCI install (`POST /install_from_oci`'s body)."""

    plugin_id: str
    oci_ref: str
    digest: str

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"plugin_id": self.plugin_id, "oci_ref": self.oci_ref, "digest": self.digest}


@dataclass(slots=True, kw_only=True)
class _Live:
    """One version of a plugin's code in memory, with its in-flight run count."""

    instance: Any
    imported: ImportedBundle
    inflight: int = 0
    retired: bool = False
    torn_down: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class _Prepared:
    """A version that was read, verified, imported and set up, ready to serve."""

    bundle: Bundle
    manifest: Manifest
    decision: TrustDecision
    live: _Live


@dataclass(slots=True, kw_only=True)
class _Slot:
    """The daemon's place for one plugin id: its record and its live code."""

    record: PluginRecord
    live: _Live | None = None
    signature: bytes | None = None  # the raw signature that verified the live version
    signature_file: bytes | None = None  # plugin.sig as read for the live version


@dataclass(slots=True)
class _Rejects:
    """Directories that failed without owning an id (bad manifest, duplicate id)."""

    by_path: dict[Path, dict[str, Any]] = field(default_factory=dict)
    records: dict[Path, PluginRecord] = field(default_factory=dict)

    def add(self, path: Path, error: PluginDError, record: PluginRecord | None) -> dict[str, Any]:
        entry = {"path": str(path), "error": error.message, "code": error.code,
                 "plugin_id": record.id if record else None}
        self.by_path[path] = entry
        if record is not None:
            self.records[path] = record
        else:
            self.records.pop(path, None)
        return entry

    def drop(self, path: Path) -> None:
        self.by_path.pop(path, None)
        self.records.pop(path, None)


class PluginManager:
    """Own every plugin's record and code; use as `async with PluginManager(...) as m`."""

    def __init__(self, settings: Settings, events: EventLog, keyring: Keyring) -> None:
        self.settings = settings
        self.events = events
        self.keyring = keyring
        self._slots: dict[str, _Slot] = {}
        self._rejects = _Rejects()
        self._lock = anyio.Lock()
        self._run_limiter = anyio.CapacityLimiter(settings.run_concurrency)
        self._idle = anyio.Event()
        self._inflight_total = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.teardown_all()

    # ---- queries -------------------------------------------------------------------------

    def get(self, plugin_id: str) -> PluginRecord:
        """Return the record of a plugin, or raise PluginNotFound."""
        return self._slot(plugin_id).record

    def records(self, *, plugin_type: str | None = None, state: str | None = None
                ) -> list[PluginRecord]:
        """Return every record (loaded ids and failed directories), filtered."""
        found = [s.record for s in self._slots.values()] + list(self._rejects.records.values())
        return sorted((r for r in found
                       if (plugin_type is None or r.plugin_type == plugin_type)
                       and (state is None or r.state.value == state)),
                      key=lambda r: (r.id, r.path))

    @property
    def inflight(self) -> int:
        """Return how many runs are executing now."""
        return self._inflight_total

    async def wait_idle(self) -> None:
        """Return once no run is executing."""
        while self._inflight_total:
            await self._idle.wait()

    def _slot(self, plugin_id: str) -> _Slot:
        slot = self._slots.get(plugin_id)
        if slot is None:
            raise PluginNotFound(f"no plugin with id {plugin_id!r}")
        return slot

    # ---- discovery -----------------------------------------------------------------------

    async def discover(self, caller: Caller = SYSTEM) -> DiscoverResult:
        """Scan `plugins.dir`; load what is new, retry what failed, flag what vanished."""
        async with self._lock:
            self._flag_missing()
            loaded: list[str] = []
            failed: list[dict[str, Any]] = []
            for path in await anyio.to_thread.run_sync(self._candidate_dirs):
                outcome = await self._load_guarded(path, caller)
                if isinstance(outcome, str):
                    loaded.append(outcome)
                elif outcome is not None:
                    failed.append(outcome)
            return DiscoverResult(discovered=loaded, failed=failed)

    async def sync_dir(self, path: Path, caller: Caller = SYSTEM) -> None:
        """Bring one plugin directory up to date after its files changed (the watcher's entry).

        A serving plugin is reloaded from it; a failed or unknown one is (re)tried; a
        directory that is gone flags the plugin that was loaded from it.
        """
        async with self._lock:
            slot = self._slot_at(path)
            if not has_manifest(path):
                self._flag_missing()
                self._rejects.drop(path)
            elif slot is not None and slot.record.state in SERVING:
                if not await self._unchanged(slot, path):
                    await self._reload_slot(slot, path, caller)
            else:
                await self._load_guarded(path, caller)

    async def _load_guarded(self, path: Path, caller: Caller) -> str | dict[str, Any] | None:
        """Load one directory; an unexpected error fails that directory, never the scan."""
        try:
            return await self._load_new(path, caller)
        except PluginDError:
            raise
        except Exception as exc:  # a bug or a parser we do not control: contain it here
            error = PluginLoadError(f"loading failed unexpectedly ({type(exc).__name__})",
                                    code="plugin_load_error")
            self._emit_failure(None, path, error, caller)
            return self._rejects.add(path, error, None)

    def serving_dirs(self) -> list[Path]:
        """Return the directories the serving plugins were loaded from."""
        return sorted(Path(s.record.path) for s in self._slots.values()
                      if s.record.state in SERVING)

    async def _unchanged(self, slot: _Slot, path: Path) -> bool:
        """Return True when `path` holds exactly the manifest, code and plugin.sig in memory.

        Only the watcher asks: a `touch`, a rename into place or a catch-up costs a read and
        a hash instead of a reload. An operator's `reload` always re-imports.
        """
        if slot.record.error is not None or Path(slot.record.path) != path:
            return False
        try:
            bundle, manifest = await self._read(path)
        except PluginDError:
            return False
        digest = plugin_digest(manifest.as_json(), bundle.sources).hex()
        return digest == slot.record.digest and bundle.signature == slot.signature_file

    def _candidate_dirs(self) -> list[Path]:
        root = self.settings.plugins_dir
        try:
            # Hidden directories are never plugins: OCI installs stage in `.staging-*`.
            dirs = sorted(p for p in root.iterdir()
                          if not p.name.startswith(".") and has_manifest(p))
        except OSError:
            return []
        serving = {Path(s.record.path) for s in self._slots.values() if s.record.state in SERVING}
        return [p for p in dirs if p not in serving]

    def _slot_at(self, path: Path) -> _Slot | None:
        return next((s for s in self._slots.values() if Path(s.record.path) == path), None)

    def _flag_missing(self) -> None:
        for slot in self._slots.values():
            gone = not Path(slot.record.path).is_dir()
            if gone and not slot.record.path_missing and slot.record.state in SERVING:
                self.events.emit(ev.PLUGIN_PATH_MISSING, level="warning",
                                 plugin_id=slot.record.id, path=slot.record.path,
                                 version=slot.record.version)
            slot.record = slot.record.with_(path_missing=gone)

    async def _load_new(self, path: Path, caller: Caller) -> str | dict[str, Any] | None:
        """Load a directory as a new plugin; return its id, a failure entry, or None."""
        try:
            bundle, manifest = await self._read(path)
        except (BundleError, ManifestError) as exc:
            self._emit_failure(None, path, exc, caller)
            return self._rejects.add(path, exc, None)
        owner = self._slots.get(manifest.id)
        if owner is not None and Path(owner.record.path) != path:
            if _keeps_id(owner.record):
                return self._other_owner(owner, path, manifest, caller)
            del self._slots[manifest.id]  # failed/unloaded and its directory is gone
        return await self._load_fresh(bundle, manifest, caller)

    def _other_owner(self, owner: _Slot, path: Path, manifest: Manifest, caller: Caller
                     ) -> dict[str, Any] | None:
        """Report `path` as a duplicate of the id's owner, unless the owner merely moved."""
        if owner.record.state in SERVING and not Path(owner.record.path).is_dir():
            return None  # the plugin moved: `reload` switches to the new directory
        error = DuplicatePluginId(
            f"duplicate plugin id {manifest.id!r}: {path} declares the id already loaded "
            f"from {owner.record.path}; the first one loaded wins")
        self.events.emit(ev.PLUGIN_DUPLICATE_ID, level="warning", plugin_id=manifest.id,
                         path=str(path), loaded_path=owner.record.path,
                         error_code=error.code, error=error.message, **caller.fields())
        return self._rejects.add(path, error, self._failed_record(manifest, path, error))

    async def _load_fresh(self, bundle: Bundle, manifest: Manifest, caller: Caller
                          ) -> str | dict[str, Any]:
        path = bundle.path
        self._rejects.drop(path)
        record = self._new_record(manifest, path)
        self._emit_state(ev.PLUGIN_DISCOVERED, record, None, caller)
        try:
            prepared = await self._prepare(bundle, manifest, caller)
        except PluginDError as exc:
            failed = record.moved_to(State.FAILED).with_(error=exc.as_dict(),
                                                         **self._sig_fields(exc))
            self._slots[manifest.id] = _Slot(record=failed)
            self._emit_failure(failed, path, exc, caller)
            return self._rejects.add(path, exc, None) | {"plugin_id": manifest.id}
        slot = _Slot(record=record)
        self._slots[manifest.id] = slot
        self._install(slot, prepared)
        slot.record = slot.record.moved_to(State.LOADED)
        self._emit_state(ev.PLUGIN_LOADED, slot.record, State.DISCOVERED, caller)
        slot.record = slot.record.moved_to(State.ENABLED)
        self._emit_state(ev.PLUGIN_ENABLED, slot.record, State.LOADED, caller)
        return manifest.id

    # ---- the load pipeline ---------------------------------------------------------------

    async def _read(self, path: Path) -> tuple[Bundle, Manifest]:
        try:
            bundle = await anyio.to_thread.run_sync(read_bundle, path)
        except OSError as exc:  # e.g. a subdirectory that cannot be listed
            raise BundleError(f"{path}: cannot read: {exc.strerror or exc}",
                              code="bundle_unreadable") from exc
        return bundle, parse_manifest(bundle.manifest_bytes, bundle.manifest_name)

    async def _prepare(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> _Prepared:
        """Verify, import, construct and set up one version; raise PluginDError on failure."""
        decision = self._require_trust(bundle, manifest, caller)
        config = self._plugin_config(manifest)
        live = await self._instantiate(bundle, manifest, config)
        try:
            await self._call_hook(live.instance, "setup", "plugin_setup_failed")
        except PluginDError:
            live.imported.release()
            raise
        return _Prepared(bundle=bundle, manifest=manifest, decision=decision, live=live)

    def _require_trust(self, bundle: Bundle, manifest: Manifest, caller: Caller
                       ) -> TrustDecision:
        """Decide (and emit) the trust decision; raise SignatureRefused when it refuses."""
        decision = self._decide(bundle, manifest, caller)
        if not decision.allowed:
            raise SignatureRefused(
                f"trust mode {self.settings.trust_mode.value} refuses a plugin whose signature "
                f"is {decision.status.value}: {decision.reason}",
                code=f"signature_{decision.status.value}")
        return decision

    def _decide(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> TrustDecision:
        digest = plugin_digest(manifest.as_json(), bundle.sources)
        decision = decide(digest=digest, signature_file=bundle.signature,
                          keys=self.keyring.keys, mode=self.settings.trust_mode)
        level = "info" if decision.status is SignatureStatus.VERIFIED else "warning"
        if decision.status is SignatureStatus.UNSIGNED and not decision.allowed:
            level = "error"
        self.events.emit(
            _SIGNATURE_EVENTS[decision.status], level=level, plugin_id=manifest.id,
            path=str(bundle.path), version=manifest.version,
            signature_status=decision.status.value, signing_key_id=decision.key_id,
            digest=decision.digest_hex, trust_mode=self.settings.trust_mode.value,
            decision="load" if decision.allowed else "refuse", reason=decision.reason,
            files=len(bundle.sources), **caller.fields())
        return decision

    def _plugin_config(self, manifest: Manifest) -> dict[str, Any]:
        config = self.settings.config_for(manifest.id)
        schema = manifest.as_json().get("config_schema")
        if not isinstance(schema, dict):
            return config
        try:
            problem = config_problem(schema, config)
        except ValueError as exc:
            raise PluginLoadError(str(exc), code="manifest_bad_config_schema") from exc
        if problem is not None:
            raise PluginLoadError(
                f'[plugin_config."{manifest.id}"] does not match config_schema: {problem}',
                code="plugin_config_invalid")
        return config

    async def _instantiate(self, bundle: Bundle, manifest: Manifest, config: dict[str, Any]
                           ) -> _Live:
        build = functools.partial(_import_and_construct, bundle, manifest, config)
        try:
            with anyio.fail_after(self.settings.run_timeout_s):
                instance, imported = await anyio.to_thread.run_sync(
                    build, abandon_on_cancel=True, limiter=self._run_limiter)
        except TimeoutError as exc:
            raise PluginLoadError(
                f"importing and constructing the plugin took longer than "
                f"{self.settings.run_timeout_s}s", code="plugin_load_timeout") from exc
        return _Live(instance=instance, imported=imported)

    async def _call_hook(self, instance: Any, name: str, code: str) -> None:
        hook = getattr(instance, name, None)
        if hook is None:
            return
        try:
            with anyio.fail_after(self.settings.run_timeout_s):
                outcome = hook()
                if inspect.isawaitable(outcome):
                    await outcome
        except TimeoutError as exc:
            raise PluginLoadError(f"{name}() did not return within "
                                  f"{self.settings.run_timeout_s}s", code=code) from exc
        except PLUGIN_FAULTS as exc:
            raise PluginLoadError(f"{name}() raised {_describe(exc)}", code=code) from exc

    def _install(self, slot: _Slot, prepared: _Prepared) -> None:
        """Make a prepared version the live one and retire the previous version."""
        old, slot.live = slot.live, prepared.live
        m, d = prepared.manifest, prepared.decision
        slot.record = slot.record.with_(
            name=m.name, version=m.version, plugin_type=m.plugin_type,
            path=str(prepared.bundle.path), manifest=m.as_json(), loaded_at=utcnow(),
            signature_status=d.status.value, signing_key_id=d.key_id, digest=d.digest_hex,
            error=None, path_missing=False)
        slot.signature = (parse_signature(prepared.bundle.signature or b"")
                          if d.status is SignatureStatus.VERIFIED else None)
        slot.signature_file = prepared.bundle.signature
        self._rejects.drop(prepared.bundle.path)
        if old is not None:
            old.retired = True

    async def _retire_if_idle(self, live: _Live | None, plugin_id: str) -> None:
        """Tear down a replaced version once nothing runs on it (whoever sees that does it)."""
        if live is not None and live.retired and live.inflight == 0:
            with anyio.CancelScope(shield=True):
                await self._teardown(live, plugin_id)

    async def _teardown(self, live: _Live, plugin_id: str | None = None) -> None:
        if live.torn_down:
            return
        live.torn_down = True
        try:
            await self._call_hook(live.instance, "teardown", "plugin_teardown_failed")
        except PluginDError as exc:
            self.events.emit(ev.PLUGIN_TEARDOWN_FAILED, level="warning", plugin_id=plugin_id,
                             error_code=exc.code, error=exc.message)
        finally:
            live.imported.release()

    # ---- operator operations -------------------------------------------------------------

    async def enable(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Accept run calls again (disabled -> enabled); enabling an enabled plugin is a no-op."""
        return await self._switch(plugin_id, State.ENABLED, ev.PLUGIN_ENABLED, caller)

    async def disable(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Block run calls but keep the code loaded (enabled -> disabled)."""
        return await self._switch(plugin_id, State.DISABLED, ev.PLUGIN_DISABLED, caller)

    async def _switch(self, plugin_id: str, to: State, event: str, caller: Caller
                      ) -> PluginRecord:
        async with self._lock:
            slot = self._slot(plugin_id)
            before = slot.record.state
            if to is State.ENABLED:
                self._check_may_enable(slot)
            if before is not to:
                slot.record = slot.record.moved_to(to)
                self._emit_state(event, slot.record, before, caller)
            return slot.record

    def _check_may_enable(self, slot: _Slot) -> None:
        """Refuse to enable code that the trust mode would not load now (a revoked key)."""
        if (self.settings.trust_mode is TrustMode.STRICT and slot.record.state in SERVING
                and slot.record.signature_status not in (SignatureStatus.VERIFIED.value, None)):
            raise PluginStateConflict(
                f"plugin {slot.record.id!r} is {slot.record.signature_status} under strict "
                "trust (its signing key is no longer trusted); restore the key and SIGHUP, "
                "or reload a version signed by a trusted key", code="plugin_untrusted")

    async def unload(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Remove the plugin from memory (teardown, free modules); files stay on disk."""
        async with self._lock:
            slot = self._slot(plugin_id)
            before = slot.record.state
            slot.record = slot.record.moved_to(State.UNLOADED).with_(loaded_at=None)
            live, slot.live = slot.live, None
            if live is not None:
                live.retired = True
                await self._retire_if_idle(live, plugin_id)
            self._emit_state(ev.PLUGIN_UNLOADED, slot.record, before, caller)
            return slot.record

    async def reload(self, plugin_id: str, caller: Caller = SYSTEM) -> PluginRecord:
        """Re-read, re-verify and re-import from disk; on failure the old version serves on.

        A failed or unloaded plugin is loaded again as new. When the plugin's directory is
        gone, the directory now holding its id is used (the seed's upgrade flow).
        """
        async with self._lock:
            slot = self._slot(plugin_id)
            path = await anyio.to_thread.run_sync(self._reload_path, slot)
            if slot.record.state not in SERVING:
                return await self._retry(slot, path, caller)
            return await self._reload_slot(slot, path, caller)

    async def _retry(self, slot: _Slot, path: Path | None, caller: Caller) -> PluginRecord:
        """Load a failed or unloaded plugin afresh, from wherever its id now lives."""
        plugin_id = slot.record.id
        if path is None:
            raise PluginLoadError(f"no directory under {self.settings.plugins_dir} holds "
                                  f"plugin {plugin_id!r}", code="plugin_dir_missing")
        del self._slots[plugin_id]  # the new attempt owns the id, wherever its directory is
        try:
            outcome = await self._load_guarded(path, caller)
        finally:
            self._slots.setdefault(plugin_id, slot)  # nothing parsed: keep the old record
        if not isinstance(outcome, str) and outcome is not None:
            raise PluginLoadError(outcome["error"], code=outcome["code"])
        return self._slots[plugin_id].record

    async def _reload_slot(self, slot: _Slot, path: Path | None, caller: Caller
                           ) -> PluginRecord:
        started = time.perf_counter()
        old_version = slot.record.version
        try:
            if path is None:
                raise PluginLoadError(f"{slot.record.path} is gone and no other directory "
                                      f"holds plugin {slot.record.id!r}",
                                      code="plugin_dir_missing")
            bundle, manifest = await self._read(path)
            if manifest.id != slot.record.id:
                raise PluginLoadError(f"{path} now declares id {manifest.id!r}, not "
                                      f"{slot.record.id!r}", code="plugin_id_changed")
            prepared = await self._prepare(bundle, manifest, caller)
        except PluginDError as exc:
            slot.record = slot.record.with_(error=exc.as_dict())
            self.events.emit(ev.PLUGIN_RELOAD_FAILED, level="error", plugin_id=slot.record.id,
                             path=str(path or slot.record.path), version=old_version,
                             error_code=exc.code, error=exc.message,
                             duration_ms=_ms(started), **caller.fields())
            raise
        old = slot.live
        self._install(slot, prepared)
        await self._retire_if_idle(old, slot.record.id)
        self.events.emit(ev.PLUGIN_RELOAD_COMPLETED, plugin_id=slot.record.id,
                         path=slot.record.path, version=slot.record.version,
                         from_version=old_version, state=slot.record.state.value,
                         signature_status=slot.record.signature_status,
                         signing_key_id=slot.record.signing_key_id,
                         duration_ms=_ms(started), **caller.fields())
        return slot.record

    def _reload_path(self, slot: _Slot) -> Path | None:
        current = Path(slot.record.path)
        if has_manifest(current) and _manifest_id(current) == slot.record.id:
            return current
        for path in sorted(self._rejects.by_path) + self._candidate_dirs():
            if has_manifest(path) and _manifest_id(path) == slot.record.id:
                return path
        return None

    async def adopt_keyring(self, keyring: Keyring, caller: Caller = SYSTEM) -> list[str]:
        """Switch to a new keyring and re-check every verified plugin that is in memory.

        A plugin no trusted key verifies any more is disabled in strict mode (marked
        `invalid` in warn mode), with an event either way; nothing is left running silently.
        Returns the ids whose trust changed.
        """
        async with self._lock:
            self.keyring = keyring
            return [slot.record.id for slot in self._slots.values()
                    if self._recheck(slot, caller)]

    def _recheck(self, slot: _Slot, caller: Caller) -> bool:
        rec = slot.record
        if rec.state not in SERVING or slot.signature is None or rec.digest is None:
            return False
        key_id = find_signer(bytes.fromhex(rec.digest), slot.signature, self.keyring.keys)
        if key_id is not None:
            if key_id != rec.signing_key_id:
                slot.record = rec.with_(signing_key_id=key_id)
            return key_id != rec.signing_key_id
        strict = self.settings.trust_mode is TrustMode.STRICT
        error = {"code": "signing_key_removed",
                 "message": f"key {rec.signing_key_id!r} that verified this plugin is no "
                            "longer trusted" + ("; disabled" if strict else "")}
        slot.record = rec.with_(signature_status=SignatureStatus.INVALID.value,
                                signing_key_id=None, error=error,
                                state=State.DISABLED if strict else rec.state)
        self.events.emit(ev.PLUGIN_SIGNATURE_INVALID, level="error", plugin_id=rec.id,
                         path=rec.path, version=rec.version, signature_status="invalid",
                         signing_key_id=rec.signing_key_id, error_code="signing_key_removed",
                         decision="disable" if strict else "keep", **caller.fields())
        if strict and rec.state is not State.DISABLED:
            self._emit_state(ev.PLUGIN_DISABLED, slot.record, rec.state, caller)
        return True

    # ---- OCI install ---------------------------------------------------------------------

    async def install_from_oci(self, oci_ref: str, caller: Caller = SYSTEM) -> InstallResult:
        """Pull a signed package, verify it in staging, move it into place, and load it.

        Nothing reaches `plugins.dir/<id>` unless the signature inside the package passes the
        trust mode; the load then verifies again what it imports. An existing directory of
        that name is never overwritten (the platform never deletes plugin files).
        """
        started = time.perf_counter()
        try:
            pulled = await anyio.to_thread.run_sync(functools.partial(
                oci.pull_package, oci_ref,
                insecure_registries=self.settings.oci_allow_insecure_registries))
            plugin_id = await self._install_layer(pulled.layer, caller)
        except PluginDError as exc:
            self.events.emit(ev.PLUGIN_INSTALL_FAILED, level="error", oci_ref=oci_ref,
                             error_code=exc.code, error=exc.message,
                             duration_ms=_ms(started), **caller.fields())
            raise
        self.events.emit(ev.PLUGIN_INSTALL_COMPLETED, plugin_id=plugin_id, oci_ref=oci_ref,
                         digest=pulled.digest, duration_ms=_ms(started), **caller.fields())
        return InstallResult(plugin_id=plugin_id, oci_ref=oci_ref, digest=pulled.digest)

    async def _install_layer(self, layer: bytes, caller: Caller) -> str:
        staging = await anyio.to_thread.run_sync(self._make_staging)
        try:
            await anyio.to_thread.run_sync(oci.extract_package, layer, staging)
            bundle, manifest = await self._read(staging)
            self._require_trust(bundle, manifest, caller)
            async with self._lock:
                target = await anyio.to_thread.run_sync(self._place, staging, manifest.id)
                await self._load_installed(target, manifest.id, caller)
            return manifest.id
        finally:
            await anyio.to_thread.run_sync(functools.partial(
                shutil.rmtree, staging, ignore_errors=True))

    def _make_staging(self) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.settings.plugins_dir))
        except OSError as exc:
            raise PluginLoadError(
                f"cannot stage an install in {self.settings.plugins_dir}: {exc.strerror} (the "
                "service needs write access to plugins.dir to install from OCI)",
                code="plugin_dir_not_writable") from exc

    def _place(self, staging: Path, plugin_id: str) -> Path:
        target = self.settings.plugins_dir / plugin_id
        if target.exists() or target.is_symlink():
            raise PluginStateConflict(
                f"{target} already exists; remove it (or install into a new directory and "
                "reload) — installed plugin files are never overwritten",
                code="plugin_dir_exists")
        staging.chmod(0o755)
        staging.rename(target)
        return target

    async def _load_installed(self, target: Path, plugin_id: str, caller: Caller) -> None:
        slot = self._slots.get(plugin_id)
        if slot is not None and slot.record.state in SERVING:
            await self._reload_slot(slot, target, caller)
            return
        if slot is not None:  # failed or unloaded elsewhere: the installed copy takes over
            del self._slots[plugin_id]
        outcome = await self._load_new(target, caller)
        if not isinstance(outcome, str) and outcome is not None:
            raise PluginLoadError(outcome["error"], code=outcome["code"])

    # ---- runs ----------------------------------------------------------------------------

    async def run(self, plugin_id: str, payload: Mapping[str, Any] | None = None,
                  context: Mapping[str, Any] | None = None, caller: Caller = SYSTEM
                  ) -> RunResult:
        """Invoke the plugin's `run` on the live version, with the per-call time limit."""
        slot = self._slot(plugin_id)
        live = self._runnable(slot)
        record = slot.record
        live.inflight += 1
        self._inflight_total += 1
        started = time.perf_counter()
        try:
            result = await self._invoke(live, dict(payload or {}), dict(context or {}))
        except PluginDError as exc:
            self.events.emit(ev.PLUGIN_RUN_FAILED, level="warning", plugin_id=plugin_id,
                             version=record.version, error_code=exc.code,
                             error=_audit_text(exc), duration_ms=_ms(started),
                             **caller.fields())
            raise
        finally:
            self._run_finished(live)
            await self._retire_if_idle(live, plugin_id)
        duration = _ms(started)
        self.events.emit(ev.PLUGIN_RUN_COMPLETED, plugin_id=plugin_id, version=record.version,
                         duration_ms=duration, **caller.fields())
        return RunResult(plugin_id=plugin_id, result=result, duration_ms=duration)

    def _runnable(self, slot: _Slot) -> _Live:
        state = slot.record.state
        if state is State.DISABLED:
            raise PluginStateConflict(f"plugin {slot.record.id!r} is disabled",
                                      code="plugin_disabled")
        if state is not State.ENABLED or slot.live is None:
            code = {State.FAILED: "plugin_failed", State.UNLOADED: "plugin_unloaded"}.get(
                state, "plugin_not_ready")
            raise PluginStateConflict(f"plugin {slot.record.id!r} is {state.value}", code=code)
        return slot.live

    def _run_finished(self, live: _Live) -> None:
        live.inflight -= 1
        self._inflight_total -= 1
        if self._inflight_total == 0:
            self._idle.set()
            self._idle = anyio.Event()

    async def _invoke(self, live: _Live, payload: dict[str, Any], context: dict[str, Any]
                      ) -> dict[str, Any]:
        run: Callable[..., Any] = live.instance.run
        try:
            with anyio.fail_after(self.settings.run_timeout_s):
                if inspect.iscoroutinefunction(run):
                    value = await run(payload, context)
                else:
                    value = await anyio.to_thread.run_sync(
                        functools.partial(run, payload, context),
                        abandon_on_cancel=True, limiter=self._run_limiter)
                    if inspect.isawaitable(value):
                        value = await value
        except TimeoutError as exc:
            raise PluginTimeout(f"run did not return within {self.settings.run_timeout_s}s"
                                ) from exc
        except PLUGIN_FAULTS as exc:
            raise PluginRunError(f"run raised {_describe(exc)}") from exc
        return _normalise(value)


    # ---- shutdown ------------------------------------------------------------------------

    async def teardown_all(self) -> None:
        """Call `teardown()` on every live plugin and free its modules."""
        for plugin_id, slot in list(self._slots.items()):
            live, slot.live = slot.live, None
            if live is not None:
                await self._teardown(live, plugin_id)

    # ---- records and events --------------------------------------------------------------

    def _new_record(self, manifest: Manifest, path: Path) -> PluginRecord:
        return PluginRecord(
            id=manifest.id, name=manifest.name, version=manifest.version,
            plugin_type=manifest.plugin_type, state=State.DISCOVERED, signature_status=None,
            signing_key_id=None, error=None, path=str(path), loaded_at=None,
            manifest=manifest.as_json())

    def _failed_record(self, manifest: Manifest, path: Path, error: PluginDError
                       ) -> PluginRecord:
        return self._new_record(manifest, path).moved_to(State.FAILED).with_(
            error=error.as_dict())

    @staticmethod
    def _sig_fields(exc: PluginDError) -> dict[str, Any]:
        if isinstance(exc, SignatureRefused):
            return {"signature_status": exc.code.removeprefix("signature_")}
        return {}

    def _emit_state(self, event: str, record: PluginRecord, before: State | None,
                    caller: Caller) -> None:
        self.events.emit(event, plugin_id=record.id, path=record.path, version=record.version,
                         from_state=before.value if before else None,
                         to_state=record.state.value, signature_status=record.signature_status,
                         signing_key_id=record.signing_key_id, **caller.fields())

    def _emit_failure(self, record: PluginRecord | None, path: Path, exc: PluginDError,
                      caller: Caller) -> None:
        self.events.emit(ev.PLUGIN_LOAD_FAILED, level="error",
                         plugin_id=record.id if record else None, path=str(path),
                         version=record.version if record else None,
                         from_state=State.DISCOVERED.value if record else None,
                         to_state=State.FAILED.value,
                         signature_status=record.signature_status if record else None,
                         error_code=exc.code, error=exc.message, **caller.fields())


def _import_and_construct(bundle: Bundle, manifest: Manifest, config: dict[str, Any]
                          ) -> tuple[Any, ImportedBundle]:
    """Import the verified bytes and build the Plugin instance (runs in a worker thread)."""
    try:
        imported = import_bundle(bundle.path, bundle.sources, manifest.entry_point)
    except PLUGIN_FAULTS as exc:
        code = "plugin_entry_missing" if isinstance(exc, ModuleNotFoundError) and \
            manifest.entry_point.removesuffix(".py").split("/")[-1] in str(exc) \
            else "plugin_import_failed"
        raise PluginLoadError(f"importing {manifest.entry_point} raised {_describe(exc)}",
                              code=code) from exc
    try:
        return _construct(imported, manifest, config), imported
    except BaseException:
        imported.release()
        raise


def _construct(imported: ImportedBundle, manifest: Manifest, config: dict[str, Any]) -> Any:
    cls: Any = getattr(imported.module, "Plugin", None)
    if not inspect.isclass(cls):
        raise PluginLoadError(f"{manifest.entry_point} defines no class Plugin",
                              code="plugin_class_missing")
    if not callable(getattr(cls, "run", None)):
        raise PluginLoadError("class Plugin has no run(payload, context) method",
                              code="plugin_class_missing")
    factory: Callable[..., Any] = cls
    try:
        return factory(config) if _takes_config(cls) else factory()
    except PLUGIN_FAULTS as exc:
        raise PluginLoadError(f"Plugin() raised {_describe(exc)}",
                              code="plugin_init_failed") from exc


def _takes_config(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


def _normalise(value: Any) -> dict[str, Any]:
    result = value if isinstance(value, dict) else {"result": value}
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PluginResultInvalid(f"the result is not JSON-serialisable: {exc}") from exc
    return result


def _audit_text(exc: PluginDError) -> str:
    """Return what a run failure may say in an event: a plugin's exception text can quote the
    payload, so only its type is kept there (the caller still gets the full message)."""
    cause = exc.__cause__
    if isinstance(exc, PluginRunError) and cause is not None:
        return f"run raised {type(cause).__name__}"
    return exc.message


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _keeps_id(record: PluginRecord) -> bool:
    """Return True when a plugin's id stays with it against another directory claiming it."""
    return record.state in SERVING or Path(record.path).is_dir()


def _manifest_id(path: Path) -> str | None:
    try:
        name, data = read_manifest(path)
        return parse_manifest(data, name).id
    except PluginDError:
        return None
