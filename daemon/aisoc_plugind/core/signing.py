"""Compute the canonical plugin digest, sign and verify it, and handle Ed25519 PEM keys.

Pure: no file or network I/O. The format is AiSOC's `plugin.sig` (INTERFACE §4):

    canonical = json.dumps({"manifest": m, "files": f}, sort_keys=True, separators=(",", ":"))
    digest    = SHA-256(canonical as UTF-8)               # 32 raw bytes
    plugin.sig = hex(Ed25519-sign(digest))               # 128 lowercase hex characters
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nacl.exceptions
import nacl.signing

from aisoc_plugind.errors import KeyFileError

__all__ = [
    "MAX_SIGNATURE_FILE_BYTES",
    "UNSIGNED_MANIFEST_KEYS",
    "SignatureStatus",
    "TrustDecision",
    "TrustMode",
    "canonical_bytes",
    "decide",
    "encode_signature",
    "file_hashes",
    "find_signer",
    "load_private_key",
    "load_public_key",
    "manifest_part",
    "parse_signature",
    "plugin_digest",
    "private_key_pem",
    "public_key_pem",
    "sign_digest",
]

# Keys the digest leaves out of the manifest part.
UNSIGNED_MANIFEST_KEYS = frozenset({"signature", "trust"})

# DER prefixes of the only key shapes we accept: Ed25519 (OID 1.3.101.112) SPKI and PKCS#8.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z ]+)-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END \1-----", re.DOTALL
)
_HEX_SIG_RE = re.compile(rb"[0-9a-fA-F]{128}")
MAX_SIGNATURE_FILE_BYTES = 1024


class SignatureStatus(StrEnum):
    """What the signature check found (INTERFACE §5)."""

    VERIFIED = "verified"
    UNSIGNED = "unsigned"
    INVALID = "invalid"
    SKIPPED = "skipped"
    REVOKED = "revoked"  # the revocation list refuses it (INTERFACE §10)


class TrustMode(StrEnum):
    """How the daemon treats signature failures (INTERFACE §5)."""

    STRICT = "strict"
    WARN = "warn"
    DISABLED = "disabled"


def manifest_part(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Return the manifest mapping as signed: without top-level `signature` and `trust`."""
    return {k: v for k, v in manifest.items() if k not in UNSIGNED_MANIFEST_KEYS}


def file_hashes(sources: Mapping[str, bytes]) -> dict[str, str]:
    """Return `{posix relative path: lowercase sha256 hex}` for the given file contents."""
    return {path: hashlib.sha256(data).hexdigest() for path, data in sources.items()}


def canonical_bytes(manifest: Mapping[str, Any], hashes: Mapping[str, str]) -> bytes:
    """Return the canonical JSON encoding that the digest is taken over."""
    doc = {"manifest": manifest_part(manifest), "files": dict(hashes)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def plugin_digest(manifest: Mapping[str, Any], sources: Mapping[str, bytes]) -> bytes:
    """Return the 32-byte SHA-256 digest a plugin signature covers."""
    return hashlib.sha256(canonical_bytes(manifest, file_hashes(sources))).digest()


def parse_signature(raw: bytes) -> bytes:
    """Decode `plugin.sig`: 128 hex characters (whitespace around allowed) or 64 raw bytes.

    Raises ValueError with a human reason when the encoding is neither.
    """
    if len(raw) == 64 and not _HEX_SIG_RE.fullmatch(raw.strip() or b"-"):
        return raw
    text = raw.strip()
    if _HEX_SIG_RE.fullmatch(text):
        return bytes.fromhex(text.decode("ascii"))
    raise ValueError(
        f"plugin.sig must be 128 hex characters or 64 raw bytes, found {len(raw)} bytes"
    )


def encode_signature(signature: bytes) -> bytes:
    """Encode a raw 64-byte signature as `plugin.sig` content (128 lowercase hex)."""
    return signature.hex().encode("ascii")


def _pem_der(data: bytes, label: bytes) -> bytes:
    match = _PEM_RE.search(data)
    if match is None:
        raise KeyFileError("not a PEM file", code="key_not_pem")
    if match.group(1) != label:
        found = match.group(1).decode("ascii", "replace")
        raise KeyFileError(
            f"expected a {label.decode()} PEM block, found {found}", code="key_wrong_type"
        )
    try:
        return base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except binascii.Error as exc:
        raise KeyFileError("PEM body is not valid base64", code="key_not_pem") from exc


def load_public_key(pem: bytes) -> nacl.signing.VerifyKey:
    """Parse an Ed25519 SubjectPublicKeyInfo PEM; anything else raises KeyFileError."""
    der = _pem_der(pem, b"PUBLIC KEY")
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise KeyFileError("not an Ed25519 public key (SPKI)", code="key_not_ed25519")
    return nacl.signing.VerifyKey(der[len(_SPKI_PREFIX) :])


def load_private_key(pem: bytes) -> nacl.signing.SigningKey:
    """Parse an unencrypted Ed25519 PKCS#8 PEM private key."""
    der = _pem_der(pem, b"PRIVATE KEY")
    if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
        raise KeyFileError("not an unencrypted Ed25519 PKCS#8 private key", code="key_not_ed25519")
    seed = der[len(_PKCS8_PREFIX) :]
    return nacl.signing.SigningKey(seed)


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    text = "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
    return (text + "\n").encode("ascii")


def public_key_pem(key: nacl.signing.VerifyKey) -> bytes:
    """Encode a verify key as SPKI PEM (what OpenSSL writes for `-pubout`)."""
    return _pem("PUBLIC KEY", _SPKI_PREFIX + bytes(key))


def private_key_pem(key: nacl.signing.SigningKey) -> bytes:
    """Encode a signing key as unencrypted PKCS#8 PEM (what OpenSSL writes for genpkey)."""
    return _pem("PRIVATE KEY", _PKCS8_PREFIX + bytes(key))


def sign_digest(digest: bytes, key: nacl.signing.SigningKey) -> bytes:
    """Return the raw 64-byte Ed25519 signature over the digest."""
    return key.sign(digest).signature


def find_signer(
    digest: bytes, signature: bytes, keys: Mapping[str, nacl.signing.VerifyKey]
) -> str | None:
    """Return the id of the first key (sorted by id) that verifies the signature, else None."""
    for key_id in sorted(keys):
        try:
            keys[key_id].verify(digest, signature)
        except nacl.exceptions.BadSignatureError:
            continue
        return key_id
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustDecision:
    """The outcome of checking one plugin's signature under a trust mode."""

    status: SignatureStatus
    key_id: str | None
    allowed: bool
    reason: str
    digest_hex: str


def decide(
    *,
    digest: bytes,
    signature_file: bytes | None,
    keys: Mapping[str, nacl.signing.VerifyKey],
    mode: TrustMode,
) -> TrustDecision:
    """Apply the trust-mode table of INTERFACE §5 to one plugin; never raises."""
    if mode is TrustMode.DISABLED:
        return TrustDecision(
            status=SignatureStatus.SKIPPED,
            key_id=None,
            allowed=True,
            reason="trust mode is disabled: signature not checked",
            digest_hex=digest.hex(),
        )
    status, key_id, reason = _check(digest, signature_file, keys)
    allowed = status is SignatureStatus.VERIFIED or mode is TrustMode.WARN
    return TrustDecision(
        status=status, key_id=key_id, allowed=allowed, reason=reason, digest_hex=digest.hex()
    )


def _check(
    digest: bytes, signature_file: bytes | None, keys: Mapping[str, nacl.signing.VerifyKey]
) -> tuple[SignatureStatus, str | None, str]:
    if signature_file is None:
        return SignatureStatus.UNSIGNED, None, "no plugin.sig file"
    try:
        signature = parse_signature(signature_file)
    except ValueError as exc:
        return SignatureStatus.INVALID, None, str(exc)
    if not keys:
        return SignatureStatus.INVALID, None, "no trusted keys are loaded"
    key_id = find_signer(digest, signature, keys)
    if key_id is None:
        return (
            SignatureStatus.INVALID,
            None,
            f"signature matches none of the {len(keys)} trusted key(s); the manifest, "
            "a *.py file or plugin.sig changed, or the signer's key is not trusted",
        )
    return SignatureStatus.VERIFIED, key_id, f"verified by key {key_id}"
