"""Apply a revocation list to the plugins in memory: disable what it revokes, restore the rest.

A serving plugin that the list revokes (its digest, or every trusted key that verifies it) is
disabled at once with `plugin.revoked` and marked `signature_status: "revoked"`; the change is
applied even while the audit file fails, because it only takes trust away. When its entry is
removed again, the plugin is re-read, re-verified and reloaded from disk through the normal
reload path, and enabled again if the revocation had disabled it. A plugin refused at load
time because it was revoked is loaded again once entries were removed. Callers hold the
manager's lifecycle lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from aisoc_plugind.audit import names
from aisoc_plugind.core.records import SERVING, State
from aisoc_plugind.core.revocation import RevocationList, RevokedBy
from aisoc_plugind.core.signing import SignatureStatus
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.loads import Loads
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.engine.table import PluginTable, Slot
from aisoc_plugind.engine.trust import TrustGate, raw_signature
from aisoc_plugind.errors import PluginDError

__all__ = ["RevocationOutcome", "Revoker"]

_REVOKED = SignatureStatus.REVOKED.value


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationOutcome:
    """What adopting a revocation list did: the ids disabled and the ids restored."""

    revoked: list[str]
    restored: list[str]


class Revoker:
    """Keep the plugins in memory in line with the revocation list in force."""

    def __init__(
        self, table: PluginTable, trust: TrustGate, loads: Loads, events: EngineEvents
    ) -> None:
        self.table = table
        self.trust = trust
        self.loads = loads
        self.events = events
        self._was_enabled: set[str] = set()  # ids a revocation moved from enabled to disabled

    async def adopt(self, revoked: RevocationList, caller: Caller) -> RevocationOutcome:
        """Switch to `revoked`; disable what it revokes, restore what it no longer does."""
        before = self.trust.revoked
        self.trust.revoked = revoked
        lifted = bool(before.keys - revoked.keys or before.digests - revoked.digests)
        disabled = self.sweep(caller)
        restored = await self._restore(caller, retry_failed=lifted)
        return RevocationOutcome(revoked=disabled, restored=restored)

    def sweep(self, caller: Caller) -> list[str]:
        """Disable every serving plugin the list in force revokes; return their ids."""
        found: list[str] = []
        for slot in self.table.slots.values():
            if slot.record.state not in SERVING or slot.record.signature_status == _REVOKED:
                continue
            why = self.trust.revocation_of(slot.record, _signature(slot))
            if why is not None:
                self._disable(slot, why, caller)
                found.append(slot.record.id)
        return found

    def _disable(self, slot: Slot, why: tuple[RevokedBy, str | None], caller: Caller) -> None:
        reason, key_id = why
        record, before = slot.record, slot.record.state
        message = (
            f"digest {record.digest} is revoked"
            if reason is RevokedBy.DIGEST
            else f"key {key_id!r}, the only trusted key that verifies it, is revoked"
        )
        changed = record.with_(
            signature_status=_REVOKED,
            error={"code": "signature_revoked", "message": f"{message}; disabled"},
        )
        if before is State.ENABLED:
            changed = changed.moved_to(State.DISABLED)
            self._was_enabled.add(record.id)
        self.events.emit(
            names.PLUGIN_REVOKED,
            level="error",
            plugin_id=record.id,
            path=record.path,
            version=record.version,
            from_state=before.value,
            to_state=changed.state.value,
            signature_status=_REVOKED,
            signing_key_id=key_id or record.signing_key_id,
            digest=record.digest,
            reason=reason.value,
            decision="disable",
            error_code="signature_revoked",
            error=message,
            **caller.fields(),
        )
        slot.record = changed  # applied regardless of the audit file: it only takes trust away

    async def _restore(self, caller: Caller, *, retry_failed: bool) -> list[str]:
        restored: list[str] = []
        for slot in list(self.table.slots.values()):
            record = slot.record
            if record.signature_status != _REVOKED:
                continue
            if record.state in SERVING and self.trust.revocation_of(record, _signature(slot)):
                continue
            if record.state not in SERVING and not (retry_failed and record.state is State.FAILED):
                continue
            if await self._load_again(slot, caller):
                restored.append(record.id)
        return restored

    async def _load_again(self, slot: Slot, caller: Caller) -> bool:
        """Reload a revoked plugin from disk (or load a refused one afresh); True on success."""
        plugin_id = slot.record.id
        path = await anyio.to_thread.run_sync(self.loads.reload_path, slot)
        try:
            if slot.record.state not in SERVING:
                await self.loads.retry(slot, path, caller)
                return True
            await self.loads.reload(slot, path, caller)
            if plugin_id in self._was_enabled and slot.record.state is State.DISABLED:
                await self._enable(slot, caller)
        except PluginDError:
            return False  # its events say why; it stays as it is
        self._was_enabled.discard(plugin_id)
        return True

    async def _enable(self, slot: Slot, caller: Caller) -> None:
        changed = slot.record.moved_to(State.ENABLED)
        seq = self.events.state(names.PLUGIN_ENABLED, changed, State.DISABLED, caller)
        await self.events.require(
            seq, plugin_id=changed.id, event=names.PLUGIN_ENABLED, caller=caller
        )
        slot.record = changed


def _signature(slot: Slot) -> bytes | None:
    """Return the raw signature of the live version (the one that verified it, if any)."""
    return slot.signature or raw_signature(slot.signature_file)
