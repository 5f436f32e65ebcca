"""Parse the revocation list and decide what it revokes (pure; INTERFACE §10).

`trust.revoked_file` is TOML with two optional arrays and nothing else:

    keys = ["old-signer"]                 # key ids (file stems in trust.keys_dir)
    digests = ["9b74c989…"]               # canonical plugin digests, 64 hex characters

A plugin is revoked when its digest is listed, or when it is signed and no trusted key that is
not revoked verifies it while a revoked one does ("signed only by revoked keys"). `strict` and
`warn` refuse revoked plugins; `disabled` checks no signature and so revokes nothing.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import nacl.signing

from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustDecision,
    TrustMode,
    find_signer,
    parse_signature,
)
from aisoc_plugind.errors import RevocationFileError

__all__ = [
    "EMPTY",
    "RevocationList",
    "RevokedBy",
    "apply_revocation",
    "parse_revocations",
    "revoked_by",
]

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[^\x00-\x1f/]{1,255}")


class RevokedBy(StrEnum):
    """Why a plugin is revoked (the `reason` of `plugin.revoked`)."""

    DIGEST = "digest_revoked"
    KEY = "key_revoked"


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationList:
    """The revoked key ids and canonical digests (lowercase hex)."""

    keys: frozenset[str] = field(default_factory=frozenset)
    digests: frozenset[str] = field(default_factory=frozenset)

    def split(
        self, keys: Mapping[str, nacl.signing.VerifyKey]
    ) -> tuple[dict[str, nacl.signing.VerifyKey], dict[str, nacl.signing.VerifyKey]]:
        """Split trusted keys into (still trusted, revoked)."""
        kept = {k: v for k, v in keys.items() if k not in self.keys}
        return kept, {k: v for k, v in keys.items() if k in self.keys}


EMPTY = RevocationList()


def parse_revocations(data: bytes) -> RevocationList:
    """Parse the revocation file's bytes; raise RevocationFileError (nothing is half-read)."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RevocationFileError(
            f"not valid UTF-8 TOML: {exc}", code="revoked_file_unparseable"
        ) from exc
    unknown = sorted(set(doc) - {"keys", "digests"})
    if unknown:
        raise RevocationFileError(
            f"unknown key(s) {', '.join(map(repr, unknown))}; only `keys` and `digests`",
            code="revoked_file_invalid",
        )
    keys = _strings(doc.get("keys", []), "keys", _KEY_ID_RE, "key ids")
    digests = _strings(doc.get("digests", []), "digests", _DIGEST_RE, "64 hex characters")
    return RevocationList(keys=keys, digests=frozenset(d.lower() for d in digests))


def _strings(value: Any, name: str, pattern: re.Pattern[str], what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RevocationFileError(
            f"`{name}` must be an array of strings", code="revoked_file_invalid"
        )
    bad = [v for v in value if not pattern.fullmatch(v.lower() if name == "digests" else v)]
    if bad:
        raise RevocationFileError(
            f"`{name}` holds {len(bad)} value(s) that are not {what}: {bad[0][:80]!r}",
            code="revoked_file_invalid",
        )
    return frozenset(value)


def revoked_by(
    *,
    digest_hex: str | None,
    signature: bytes | None,
    revoked: RevocationList,
    keys: Mapping[str, nacl.signing.VerifyKey],
) -> tuple[RevokedBy, str | None] | None:
    """Return why a plugin is revoked (and the revoked key that signed it), or None.

    `keys` are all trusted keys, revoked or not; `signature` is the raw 64 bytes, if any.
    """
    if digest_hex is not None and digest_hex in revoked.digests:
        return RevokedBy.DIGEST, None
    if signature is None or digest_hex is None or not revoked.keys:
        return None
    kept, gone = revoked.split(keys)
    digest = bytes.fromhex(digest_hex)
    if find_signer(digest, signature, kept) is not None:
        return None
    key_id = find_signer(digest, signature, gone)
    return (RevokedBy.KEY, key_id) if key_id is not None else None


def apply_revocation(
    decision: TrustDecision,
    *,
    signature_file: bytes | None,
    revoked: RevocationList,
    keys: Mapping[str, nacl.signing.VerifyKey],
    mode: TrustMode,
) -> TrustDecision:
    """Turn a trust decision into a refusal (`revoked`) when the revocation list says so.

    `decision` was made with the keys that are not revoked; `keys` are all trusted keys.
    """
    if mode is TrustMode.DISABLED or decision.status is SignatureStatus.SKIPPED:
        return decision
    if decision.digest_hex in revoked.digests:
        why, key_id = RevokedBy.DIGEST, None
    elif decision.status is SignatureStatus.VERIFIED or not revoked.keys:
        return decision  # a key that is not revoked verifies it (or none is revoked)
    else:
        signature = _raw_signature(signature_file)
        _, gone = revoked.split(keys)
        key_id = (
            find_signer(bytes.fromhex(decision.digest_hex), signature, gone) if signature else None
        )
        if key_id is None:
            return decision
        why = RevokedBy.KEY
    reason = (
        f"digest {decision.digest_hex} is revoked"
        if why is RevokedBy.DIGEST
        else f"signed only by revoked key {key_id}"
    )
    return TrustDecision(
        status=SignatureStatus.REVOKED,
        key_id=key_id or decision.key_id,
        allowed=False,
        reason=reason,
        digest_hex=decision.digest_hex,
    )


def _raw_signature(signature_file: bytes | None) -> bytes | None:
    if signature_file is None:
        return None
    try:
        return parse_signature(signature_file)
    except ValueError:
        return None
