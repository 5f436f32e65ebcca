"""The revocation list: parsing (tables of good and bad files) and what it revokes."""

from __future__ import annotations

import nacl.signing
import pytest

from aisoc_plugind.core.revocation import (
    EMPTY,
    RevocationList,
    RevokedBy,
    apply_revocation,
    parse_revocations,
    revoked_by,
)
from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustMode,
    decide,
    encode_signature,
    sign_digest,
)
from aisoc_plugind.errors import RevocationFileError

DIGEST = bytes(range(32))
OLD, NEW = nacl.signing.SigningKey(b"o" * 32), nacl.signing.SigningKey(b"n" * 32)
KEYS = {"old": OLD.verify_key, "new": NEW.verify_key}

GOOD = [
    (b"", EMPTY),
    (b"keys = []\ndigests = []\n", EMPTY),
    (b'keys = ["old"]\n', RevocationList(keys=frozenset({"old"}))),
    (
        b'digests = ["' + b"AB" * 32 + b'"]\n',
        RevocationList(digests=frozenset({"ab" * 32})),  # hex is compared in lowercase
    ),
]

BAD = [
    (b"keys = [", "revoked_file_unparseable"),
    (b"\xff\xfe", "revoked_file_unparseable"),
    (b'keys = "old"', "revoked_file_invalid"),
    (b"keys = [1]", "revoked_file_invalid"),
    (b'digests = ["abc"]', "revoked_file_invalid"),
    (b'digests = ["sha256:' + b"a" * 64 + b'"]', "revoked_file_invalid"),
    (b'key = ["old"]', "revoked_file_invalid"),  # a typo revokes nothing silently: refused
    (b'keys = [""]', "revoked_file_invalid"),
    (b"[keys]\nold = true", "revoked_file_invalid"),
]


@pytest.mark.parametrize(("data", "expected"), GOOD)
def test_good_files_parse(data: bytes, expected: RevocationList) -> None:
    """Both arrays are optional; an empty file revokes nothing."""
    assert parse_revocations(data) == expected


@pytest.mark.parametrize(("data", "code"), BAD)
def test_bad_files_are_refused_whole_with_a_code(data: bytes, code: str) -> None:
    """Anything but two arrays of the right strings is refused as a whole."""
    with pytest.raises(RevocationFileError) as caught:
        parse_revocations(data)
    assert caught.value.code == code


def _signed(key: nacl.signing.SigningKey) -> bytes:
    return encode_signature(sign_digest(DIGEST, key))


@pytest.mark.parametrize(
    ("signer", "revoked", "expected"),
    [
        (OLD, RevocationList(keys=frozenset({"old"})), (RevokedBy.KEY, "old")),
        (OLD, RevocationList(keys=frozenset({"new"})), None),
        (OLD, RevocationList(digests=frozenset({DIGEST.hex()})), (RevokedBy.DIGEST, None)),
        (None, RevocationList(digests=frozenset({DIGEST.hex()})), (RevokedBy.DIGEST, None)),
        (None, RevocationList(keys=frozenset({"old"})), None),
        (OLD, EMPTY, None),
    ],
)
def test_revoked_by(
    signer: nacl.signing.SigningKey | None,
    revoked: RevocationList,
    expected: tuple[RevokedBy, str | None] | None,
) -> None:
    """A listed digest, or a signature only revoked keys verify, revokes a plugin."""
    signature = sign_digest(DIGEST, signer) if signer else None
    found = revoked_by(digest_hex=DIGEST.hex(), signature=signature, revoked=revoked, keys=KEYS)
    assert found == expected


@pytest.mark.parametrize("mode", [TrustMode.STRICT, TrustMode.WARN])
def test_signed_only_by_a_revoked_key_is_refused_in_strict_and_warn(mode: TrustMode) -> None:
    """The decision (made without the revoked key) becomes a `revoked` refusal."""
    revoked = RevocationList(keys=frozenset({"old"}))
    kept, _ = revoked.split(KEYS)
    sig = _signed(OLD)
    decision = decide(digest=DIGEST, signature_file=sig, keys=kept, mode=mode)
    assert decision.status is SignatureStatus.INVALID
    found = apply_revocation(decision, signature_file=sig, revoked=revoked, keys=KEYS, mode=mode)
    assert (found.status, found.allowed, found.key_id) == (SignatureStatus.REVOKED, False, "old")


def test_a_key_that_is_not_revoked_still_verifies() -> None:
    """Revoking one key leaves plugins that another trusted key verifies alone."""
    revoked = RevocationList(keys=frozenset({"old"}))
    sig = _signed(NEW)
    decision = decide(
        digest=DIGEST, signature_file=sig, keys=revoked.split(KEYS)[0], mode=TrustMode.STRICT
    )
    found = apply_revocation(
        decision, signature_file=sig, revoked=revoked, keys=KEYS, mode=TrustMode.STRICT
    )
    assert found is decision


@pytest.mark.parametrize("mode", [TrustMode.STRICT, TrustMode.WARN])
def test_a_revoked_digest_is_refused_even_unsigned(mode: TrustMode) -> None:
    """A digest on the list is refused whatever signs it (unsigned in warn mode too)."""
    revoked = RevocationList(digests=frozenset({DIGEST.hex()}))
    decision = decide(digest=DIGEST, signature_file=None, keys=KEYS, mode=mode)
    found = apply_revocation(decision, signature_file=None, revoked=revoked, keys=KEYS, mode=mode)
    assert (found.status, found.allowed) == (SignatureStatus.REVOKED, False)


def test_disabled_mode_revokes_nothing() -> None:
    """`disabled` checks no signature, so the revocation list does not apply."""
    revoked = RevocationList(digests=frozenset({DIGEST.hex()}))
    decision = decide(digest=DIGEST, signature_file=None, keys=KEYS, mode=TrustMode.DISABLED)
    found = apply_revocation(
        decision, signature_file=None, revoked=revoked, keys=KEYS, mode=TrustMode.DISABLED
    )
    assert found is decision
