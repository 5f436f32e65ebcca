"""Decide whether a plugin's signature lets it load, and re-check loaded plugins on key change.

Every decision is one event (`plugin.signature.*`, or `plugin.revoked` for a plugin the
revocation list refuses), whatever it decides, written when it is made, before any plugin code
runs: `verified`, `invalid` (with `decision: "load"` or `"refuse"`), `skipped`, `revoked`. The
one exception is `plugin.signature.unsigned`, which means that an unsigned plugin *loaded*
(INTERFACE §7, warn mode): it is written once the host has loaded it (`loaded`), and an
unsigned plugin that is refused (strict) or fails to load shows only in `plugin.load.failed`
(`signature_status: "unsigned"`). A plugin that no trusted key verifies any more
is disabled in strict mode (marked `invalid` in warn mode), through the lifecycle state
machine, with events either way: nothing is left running silently. Signatures are checked
with the trusted keys that are not revoked (`keys`); the revocation list then turns a plugin
signed only by revoked keys, or whose digest is revoked, into a `revoked` refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import nacl.signing

from aisoc_plugind.audit import names
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.core.records import SERVING, PluginRecord, State
from aisoc_plugind.core.revocation import (
    EMPTY,
    RevocationList,
    RevokedBy,
    apply_revocation,
    revoked_by,
)
from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustDecision,
    TrustMode,
    decide,
    find_signer,
    parse_signature,
    plugin_digest,
)
from aisoc_plugind.engine.bundle import Bundle
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import PluginStateConflict, SignatureRefused

__all__ = ["SIGNATURE_EVENTS", "Recheck", "TrustGate", "raw_signature"]

SIGNATURE_EVENTS = {
    SignatureStatus.VERIFIED: names.PLUGIN_SIGNATURE_VERIFIED,
    SignatureStatus.UNSIGNED: names.PLUGIN_SIGNATURE_UNSIGNED,
    SignatureStatus.INVALID: names.PLUGIN_SIGNATURE_INVALID,
    SignatureStatus.SKIPPED: names.PLUGIN_SIGNATURE_SKIPPED,
    SignatureStatus.REVOKED: names.PLUGIN_REVOKED,
}


# Refusals that are errors (not warnings) in the event log.
_LOUD_REFUSALS = frozenset({SignatureStatus.UNSIGNED, SignatureStatus.REVOKED})


def raw_signature(signature_file: bytes | None) -> bytes | None:
    """Return the raw signature in a `plugin.sig`, or None when there is none or it is bad."""
    if signature_file is None:
        return None
    try:
        return parse_signature(signature_file)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Recheck:
    """How a loaded plugin's trust changed under a new keyring: its new record."""

    record: PluginRecord
    disabled: bool
    restored: bool = False  # a trusted key verifies it again (after `signing_key_removed`)


class TrustGate:
    """Apply the trust mode to plugins with the current keyring, emitting every decision."""

    def __init__(self, settings: Settings, events: EngineEvents, keyring: Keyring) -> None:
        self.mode = settings.trust_mode
        self.events = events
        self._keyring = keyring
        self._revoked = EMPTY
        self.keys: Mapping[str, nacl.signing.VerifyKey] = dict(keyring.keys)

    @property
    def keyring(self) -> Keyring:
        """Return every trusted key, revoked or not."""
        return self._keyring

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self.keys = self._revoked.split(keyring.keys)[0]

    @property
    def revoked(self) -> RevocationList:
        """Return the revocation list in force."""
        return self._revoked

    @revoked.setter
    def revoked(self, revoked: RevocationList) -> None:
        self._revoked = revoked
        self.keys = revoked.split(self._keyring.keys)[0]

    def decide(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> TrustDecision:
        """Check the signature of a read bundle and emit the decision (see the module
        docstring for when an unsigned one is announced)."""
        digest = plugin_digest(manifest.as_json(), bundle.sources)
        decision = decide(
            digest=digest, signature_file=bundle.signature, keys=self.keys, mode=self.mode
        )
        decision = self.revise(decision, bundle)
        self._announce_decision(decision, bundle, manifest, caller)
        return decision

    def revise(self, decision: TrustDecision, bundle: Bundle) -> TrustDecision:
        """Apply the revocation list to a decision made with the keys that are not revoked."""
        return apply_revocation(
            decision,
            signature_file=bundle.signature,
            revoked=self._revoked,
            keys=self._keyring.keys,
            mode=self.mode,
        )

    def announce(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> None:
        """Emit the event of a decision (made here or by a scan with this keyring)."""
        level = "info" if decision.status is SignatureStatus.VERIFIED else "warning"
        if not decision.allowed and decision.status in _LOUD_REFUSALS:
            level = "error"
        revoked = decision.status is SignatureStatus.REVOKED
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
            reason=self._revoked_why(decision).value if revoked else decision.reason,
            **({"error_code": "signature_revoked", "error": decision.reason} if revoked else {}),
            files=len(bundle.sources),
            **caller.fields(),
        )

    def _announce_decision(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> None:
        """Emit a decision as it is made, unless its event means "it loaded" (unsigned)."""
        if decision.status is not SignatureStatus.UNSIGNED:
            self.announce(decision, bundle, manifest, caller)

    def loaded(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> None:
        """Emit what a decision says once its plugin has loaded: `plugin.signature.unsigned`
        for an unsigned plugin (warn mode); nothing for the others (announced already)."""
        if decision.status is SignatureStatus.UNSIGNED and decision.allowed:
            self.announce(decision, bundle, manifest, caller)

    def _revoked_why(self, decision: TrustDecision) -> RevokedBy:
        return RevokedBy.DIGEST if decision.digest_hex in self._revoked.digests else RevokedBy.KEY

    def require(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> TrustDecision:
        """Decide (and emit); raise SignatureRefused when the trust mode refuses."""
        return self.refuse_unless_allowed(self.decide(bundle, manifest, caller))

    def admit(
        self, decision: TrustDecision, bundle: Bundle, manifest: Manifest, caller: Caller
    ) -> TrustDecision:
        """Emit a scan's decision (an unsigned one waits for `loaded`); raise
        SignatureRefused when the trust mode refuses."""
        decision = self.revise(decision, bundle)
        self._announce_decision(decision, bundle, manifest, caller)
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

    def check_enable(self, record: PluginRecord) -> None:
        """Raise PluginStateConflict when the trust mode would not load this code now."""
        if record.signature_status == SignatureStatus.REVOKED.value:
            raise PluginStateConflict(
                f"plugin {record.id!r} is revoked (trust.revoked_file); remove its key or "
                "digest from the revocation list to restore it",
                code="plugin_revoked",
            )
        if not self.may_enable(record):
            raise PluginStateConflict(
                f"plugin {record.id!r} is {record.signature_status} under strict "
                "trust (its signing key is no longer trusted); restore the key and "
                "SIGHUP, or reload a version signed by a trusted key",
                code="plugin_untrusted",
            )

    def revocation_of(
        self, record: PluginRecord, signature: bytes | None
    ) -> tuple[RevokedBy, str | None] | None:
        """Return why a loaded plugin is revoked now (and the revoked key), or None."""
        if self.mode is TrustMode.DISABLED:
            return None
        return revoked_by(
            digest_hex=record.digest,
            signature=signature,
            revoked=self._revoked,
            keys=self._keyring.keys,
        )

    def recheck(
        self, record: PluginRecord, signature: bytes | None, caller: Caller
    ) -> Recheck | None:
        """Re-verify a loaded plugin's signature with the current keyring.

        Returns None when nothing changed; otherwise the new record: another key verifies
        it now, a trusted key verifies it again (`restored`, with `plugin.signature.verified`
        `decision: "restore"`), or none does any more (with `plugin.signature.invalid`).
        """
        if record.state not in SERVING or signature is None or record.digest is None:
            return None
        if self.mode is TrustMode.DISABLED:
            return None  # signatures are not looked at
        if record.signature_status == SignatureStatus.REVOKED.value:
            return None  # the revocation list decides about it (see `revocation_of`)
        key_id = find_signer(bytes.fromhex(record.digest), signature, self.keys)
        if key_id is None and self.revocation_of(record, signature) is not None:
            return None  # revoked, not removed: the manager's revocation sweep disables it
        if key_id is not None:
            return self._verified_again(record, key_id, caller)
        if record.signature_status != SignatureStatus.VERIFIED.value:
            return None  # no trusted key verified it before either: nothing changed
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

    def _verified_again(self, record: PluginRecord, key_id: str, caller: Caller) -> Recheck | None:
        if record.signature_status == SignatureStatus.VERIFIED.value:
            if key_id == record.signing_key_id:
                return None
            return Recheck(record=record.with_(signing_key_id=key_id), disabled=False)
        error = record.error
        if error is not None and error.get("code") == "signing_key_removed":
            error = None
        restored = record.with_(
            signature_status=SignatureStatus.VERIFIED.value, signing_key_id=key_id, error=error
        )
        self.events.emit(
            names.PLUGIN_SIGNATURE_VERIFIED,
            plugin_id=record.id,
            path=record.path,
            version=record.version,
            signature_status=SignatureStatus.VERIFIED.value,
            signing_key_id=key_id,
            digest=record.digest,
            trust_mode=self.mode.value,
            decision="restore",
            **caller.fields(),
        )
        return Recheck(record=restored, disabled=False, restored=True)
