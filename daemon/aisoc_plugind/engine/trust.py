"""Decide whether a plugin's signature lets it load, and re-check loaded plugins on key change.

Every decision is one event (`plugin.signature.*`), whatever it decides. A plugin that no
trusted key verifies any more is disabled in strict mode (marked `invalid` in warn mode),
through the lifecycle state machine, with events either way: nothing is left running silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from aisoc_plugind.audit import names
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.core.records import SERVING, PluginRecord, State
from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustDecision,
    TrustMode,
    decide,
    find_signer,
    plugin_digest,
)
from aisoc_plugind.engine.bundle import Bundle
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import SignatureRefused

__all__ = ["SIGNATURE_EVENTS", "Recheck", "TrustGate"]

SIGNATURE_EVENTS = {
    SignatureStatus.VERIFIED: names.PLUGIN_SIGNATURE_VERIFIED,
    SignatureStatus.UNSIGNED: names.PLUGIN_SIGNATURE_UNSIGNED,
    SignatureStatus.INVALID: names.PLUGIN_SIGNATURE_INVALID,
    SignatureStatus.SKIPPED: names.PLUGIN_SIGNATURE_SKIPPED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Recheck:
    """How a loaded plugin's trust changed under a new keyring: its new record."""

    record: PluginRecord
    disabled: bool


class TrustGate:
    """Apply the trust mode to plugins with the current keyring, emitting every decision."""

    def __init__(self, settings: Settings, events: EngineEvents, keyring: Keyring) -> None:
        self.mode = settings.trust_mode
        self.events = events
        self.keyring = keyring

    def decide(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> TrustDecision:
        """Check the signature of a read bundle and emit the decision."""
        digest = plugin_digest(manifest.as_json(), bundle.sources)
        decision = decide(
            digest=digest, signature_file=bundle.signature, keys=self.keyring.keys, mode=self.mode
        )
        self.announce(decision, bundle, manifest, caller)
        return decision

    def announce(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> None:
        """Emit the event of a decision (made here or by a scan with this keyring)."""
        level = "info" if decision.status is SignatureStatus.VERIFIED else "warning"
        if decision.status is SignatureStatus.UNSIGNED and not decision.allowed:
            level = "error"
        self.events.emit(
            SIGNATURE_EVENTS[decision.status],
            level=level,
            plugin_id=manifest.id,
            path=str(bundle.path),
            version=manifest.version,
            signature_status=decision.status.value,
            signing_key_id=decision.key_id,
            digest=decision.digest_hex,
            trust_mode=self.mode.value,
            decision="load" if decision.allowed else "refuse",
            reason=decision.reason,
            files=len(bundle.sources),
            **caller.fields(),
        )

    def require(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> TrustDecision:
        """Decide (and emit); raise SignatureRefused when the trust mode refuses."""
        return self.refuse_unless_allowed(self.decide(bundle, manifest, caller))

    def admit(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> TrustDecision:
        """Emit a scan's decision; raise SignatureRefused when the trust mode refuses."""
        self.announce(decision, bundle, manifest, caller)
        return self.refuse_unless_allowed(decision)

    def refuse_unless_allowed(self, decision: TrustDecision) -> TrustDecision:
        """Return `decision`, or raise SignatureRefused when it does not allow loading."""
        if not decision.allowed:
            raise SignatureRefused(
                f"trust mode {self.mode.value} refuses a plugin whose signature "
                f"is {decision.status.value}: {decision.reason}",
                code=f"signature_{decision.status.value}",
            )
        return decision

    def may_enable(self, record: PluginRecord) -> bool:
        """Return False for code the trust mode would not load now (its key was removed)."""
        return not (
            self.mode is TrustMode.STRICT
            and record.state in SERVING
            and record.signature_status not in (SignatureStatus.VERIFIED.value, None)
        )

    def recheck(
        self, record: PluginRecord, signature: bytes | None, caller: Caller
    ) -> Recheck | None:
        """Re-verify a loaded plugin's signature with the current keyring.

        Returns None when nothing changed; otherwise the new record (another key verifies
        it now, or none does), having emitted `plugin.signature.invalid` for the latter.
        """
        if record.state not in SERVING or signature is None or record.digest is None:
            return None
        key_id = find_signer(bytes.fromhex(record.digest), signature, self.keyring.keys)
        if key_id is not None:
            if key_id == record.signing_key_id:
                return None
            return Recheck(record=record.with_(signing_key_id=key_id), disabled=False)
        strict = self.mode is TrustMode.STRICT
        error = {
            "code": "signing_key_removed",
            "message": f"key {record.signing_key_id!r} that verified this plugin is no "
            "longer trusted" + ("; disabled" if strict else ""),
        }
        changed = record.with_(
            signature_status=SignatureStatus.INVALID.value, signing_key_id=None, error=error
        )
        disable = strict and record.state is State.ENABLED
        if disable:
            changed = changed.moved_to(State.DISABLED)
        self.events.emit(
            names.PLUGIN_SIGNATURE_INVALID,
            level="error",
            plugin_id=record.id,
            path=record.path,
            version=record.version,
            signature_status="invalid",
            signing_key_id=record.signing_key_id,
            error_code="signing_key_removed",
            decision="disable" if strict else "keep",
            **caller.fields(),
        )
        return Recheck(record=changed, disabled=disable)
