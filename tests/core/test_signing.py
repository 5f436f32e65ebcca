"""Signature format of INTERFACE §4, checked against ../shared/vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from aisoc_plugind.core import manifest, signing
from aisoc_plugind.core.signing import SignatureStatus, TrustMode, decide
from aisoc_plugind.engine.bundle import read_bundle
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.errors import KeyFileError
from tests.conftest import UNTRUSTED_PUB, VECTOR_KEY, VECTOR_PUB, VECTORS

VECTOR_DOC = json.loads((VECTORS / "vectors.json").read_text())
NAMES = sorted(VECTOR_DOC["plugins"])


def _digest(name: str) -> tuple[bytes, bytes | None]:
    bundle = read_bundle(VECTORS / "plugins" / name)
    parsed = manifest.parse(bundle.manifest_bytes, bundle.manifest_name)
    return signing.plugin_digest(parsed.as_json(), bundle.sources), bundle.signature


@pytest.mark.parametrize("name", NAMES)
def test_canonical_json_matches_vector(name: str) -> None:
    """The canonical encoding is byte-identical to the vector's."""
    bundle = read_bundle(VECTORS / "plugins" / name)
    parsed = manifest.parse(bundle.manifest_bytes, bundle.manifest_name)
    canonical = signing.canonical_bytes(parsed.as_json(), signing.file_hashes(bundle.sources))
    assert canonical.decode() == VECTOR_DOC["plugins"][name]["canonical_json"]


@pytest.mark.parametrize("name", NAMES)
def test_digest_matches_vector(name: str) -> None:
    """The SHA-256 digest equals the vector's."""
    assert _digest(name)[0].hex() == VECTOR_DOC["plugins"][name]["digest_sha256_hex"]


@pytest.mark.parametrize("name", NAMES)
def test_vector_signature_verifies_with_vector_key(name: str) -> None:
    """Each vector plugin is verified by the vector signer's public key."""
    digest, sig = _digest(name)
    keys = {"vector-signer": signing.load_public_key(VECTOR_PUB.read_bytes())}
    decision = decide(digest=digest, signature_file=sig, keys=keys, mode=TrustMode.STRICT)
    assert (decision.status, decision.key_id, decision.allowed) == (
        SignatureStatus.VERIFIED,
        "vector-signer",
        True,
    )


@pytest.mark.parametrize("name", NAMES)
def test_vector_signature_rejected_by_untrusted_key(name: str) -> None:
    """The untrusted key does not verify the vectors; strict refuses them."""
    digest, sig = _digest(name)
    keys = {"untrusted-signer": signing.load_public_key(UNTRUSTED_PUB.read_bytes())}
    decision = decide(digest=digest, signature_file=sig, keys=keys, mode=TrustMode.STRICT)
    assert (decision.status, decision.allowed) == (SignatureStatus.INVALID, False)


@pytest.mark.parametrize("name", NAMES)
def test_signing_reproduces_vector_signature(name: str) -> None:
    """Ed25519 is deterministic: signing the digest gives the vector's plugin.sig."""
    key = signing.load_private_key(VECTOR_KEY.read_bytes())
    assert bytes(key).hex() == VECTOR_DOC["key_seed_hex"]
    sig = signing.encode_signature(signing.sign_digest(_digest(name)[0], key))
    assert sig.decode() == VECTOR_DOC["plugins"][name]["plugin_sig"]


def test_raw_64_byte_signature_is_accepted() -> None:
    """plugin.sig may hold the 64 raw bytes instead of hex."""
    digest, sig = _digest("legacy-connector")
    assert sig is not None
    raw = bytes.fromhex(sig.decode())
    keys = {"v": signing.load_public_key(VECTOR_PUB.read_bytes())}
    assert (
        decide(digest=digest, signature_file=raw, keys=keys, mode=TrustMode.STRICT).status
        is SignatureStatus.VERIFIED
    )


@pytest.mark.parametrize("content", [b"", b"zz" * 64, b"ab" * 63, b"ab" * 65, b"\x00" * 63])
def test_badly_encoded_signature_is_invalid(content: bytes) -> None:
    """A plugin.sig that is neither 128 hex chars nor 64 bytes is `invalid`, not a crash."""
    digest, _ = _digest("legacy-connector")
    keys = {"v": signing.load_public_key(VECTOR_PUB.read_bytes())}
    decision = decide(digest=digest, signature_file=content, keys=keys, mode=TrustMode.STRICT)
    assert decision.status is SignatureStatus.INVALID
    assert not decision.allowed


def test_signature_over_other_digest_is_invalid() -> None:
    """One plugin's signature does not verify another plugin."""
    digest, _ = _digest("legacy-connector")
    _, other_sig = _digest("geoip-enricher")
    keys = {"v": signing.load_public_key(VECTOR_PUB.read_bytes())}
    assert (
        decide(digest=digest, signature_file=other_sig, keys=keys, mode=TrustMode.WARN).status
        is SignatureStatus.INVALID
    )


def test_no_keys_means_invalid_not_verified() -> None:
    """An empty keyring never verifies anything (fail closed)."""
    digest, sig = _digest("legacy-connector")
    decision = decide(digest=digest, signature_file=sig, keys={}, mode=TrustMode.STRICT)
    assert decision.status is SignatureStatus.INVALID


def test_disabled_mode_skips_check() -> None:
    """Trust mode `disabled` loads without checking: status `skipped`."""
    digest, _ = _digest("legacy-connector")
    decision = decide(digest=digest, signature_file=None, keys={}, mode=TrustMode.DISABLED)
    assert (decision.status, decision.allowed) == (SignatureStatus.SKIPPED, True)


def test_key_pems_round_trip_byte_for_byte() -> None:
    """Our PEM encoders write exactly what OpenSSL wrote for the vector key pair."""
    priv = signing.load_private_key(VECTOR_KEY.read_bytes())
    assert signing.private_key_pem(priv) == VECTOR_KEY.read_bytes()
    assert signing.public_key_pem(priv.verify_key) == VECTOR_PUB.read_bytes()


def test_public_key_readable_by_cryptography() -> None:
    """The SPKI PEM we write loads in `cryptography` as an Ed25519 key."""
    priv = signing.load_private_key(VECTOR_KEY.read_bytes())
    loaded = serialization.load_pem_public_key(signing.public_key_pem(priv.verify_key))
    assert isinstance(loaded, ed25519.Ed25519PublicKey)


def _foreign_keys() -> dict[str, bytes]:
    x = x25519.X25519PrivateKey.generate().public_key()
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return {
        "x25519": x.public_bytes(*spki),
        "p256": p256.public_bytes(*spki),
        "garbage": b"not a key at all\n",
        "private": VECTOR_KEY.read_bytes(),
        "bad_base64": b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
    }


@pytest.mark.parametrize("kind", sorted(_foreign_keys()))
def test_non_ed25519_or_malformed_key_is_refused(kind: str) -> None:
    """Only Ed25519 SPKI public keys load; everything else is a KeyFileError with a code."""
    with pytest.raises(KeyFileError) as info:
        signing.load_public_key(_foreign_keys()[kind])
    assert info.value.code.startswith("key_")


def test_keyring_skips_bad_files_and_keeps_good_ones(tmp_path: Path) -> None:
    """A keys dir with junk in it still yields the good key, and lists what it skipped
    (a link out of the keys dir among them)."""
    (tmp_path / "outside.pem").write_bytes(VECTOR_PUB.read_bytes())
    tmp_path = tmp_path / "keys"
    tmp_path.mkdir()
    (tmp_path / "good.pem").write_bytes(VECTOR_PUB.read_bytes())
    for name, data in _foreign_keys().items():
        (tmp_path / f"{name}.pub").write_bytes(data)
    (tmp_path / "readme.txt").write_text("ignored: not a key suffix")
    (tmp_path / "link.pem").symlink_to(tmp_path.parent / "outside.pem")
    ring = load_keyring(tmp_path)
    assert list(ring.keys) == ["good"]
    assert {s.path.name for s in ring.skipped} == {f"{n}.pub" for n in _foreign_keys()} | {
        "link.pem"
    }


def test_keyring_of_missing_dir_is_empty(tmp_path: Path) -> None:
    """A keys dir that does not exist gives no keys, not an exception."""
    assert dict(load_keyring(tmp_path / "nope").keys) == {}


def test_key_id_collision_is_reported(tmp_path: Path) -> None:
    """`a.pem` and `a.pub` would share key id `a`: the second is skipped, not silently used."""
    (tmp_path / "a.pem").write_bytes(VECTOR_PUB.read_bytes())
    (tmp_path / "a.pub").write_bytes(UNTRUSTED_PUB.read_bytes())
    ring = load_keyring(tmp_path)
    assert list(ring.keys) == ["a"]
    assert [s.code for s in ring.skipped] == ["key_duplicate_id"]
