"""The repository's copy of the signature vectors still matches the format of INTERFACE §4.

This checks the copy with an implementation written from the specification alone (hashlib,
json and the `cryptography` package), not with the daemon's own signing code, so a drift in
either the copy or the daemon shows up as a disagreement somewhere in the suite.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.conftest import REPO, UNTRUSTED_PUB, VECTOR_PUB, VECTORS

SHARED_VECTORS = REPO.parent / "shared" / "vectors"
CASES = json.loads((VECTORS / "vectors.json").read_text())["plugins"]


def _spec_canonical(plugin_dir: Path) -> bytes:
    """Build the canonical bytes exactly as INTERFACE §4 words it."""
    yaml_file, json_file = plugin_dir / "plugin.yaml", plugin_dir / "aisoc-plugin.json"
    if yaml_file.exists():
        manifest: dict[str, Any] = yaml.safe_load(yaml_file.read_text("utf-8"))
    else:
        manifest = json.loads(json_file.read_text("utf-8"))
    manifest = {k: v for k, v in manifest.items() if k not in ("signature", "trust")}
    files = {
        p.relative_to(plugin_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(plugin_dir.rglob("*.py"))
        if p.is_file() and not p.is_symlink()
    }
    doc = {"manifest": manifest, "files": files}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _public_key(path: Path) -> Ed25519PublicKey:
    key = load_pem_public_key(path.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


@pytest.mark.parametrize("name", sorted(CASES))
def test_copy_reproduces_canonical_form_and_digest(name: str) -> None:
    """The copied plugin files give the recorded canonical JSON and SHA-256 digest."""
    canonical = _spec_canonical(VECTORS / "plugins" / name)
    assert canonical.decode("utf-8") == CASES[name]["canonical_json"]
    assert hashlib.sha256(canonical).hexdigest() == CASES[name]["digest_sha256_hex"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_copy_signature_verifies_under_the_vector_key_only(name: str) -> None:
    """plugin.sig is the Ed25519 signature of the digest: the signer's key accepts it, the
    untrusted key refuses it."""
    digest = bytes.fromhex(CASES[name]["digest_sha256_hex"])
    sig_text = (VECTORS / "plugins" / name / "plugin.sig").read_text().strip()
    assert sig_text == CASES[name]["plugin_sig"]
    signature = bytes.fromhex(sig_text)
    _public_key(VECTOR_PUB).verify(signature, digest)
    with pytest.raises(InvalidSignature):
        _public_key(UNTRUSTED_PUB).verify(signature, digest)


def test_copy_is_identical_to_the_shared_vectors_when_present() -> None:
    """Beside the team's shared folder, the copy has the same files with the same bytes."""
    if not SHARED_VECTORS.is_dir():
        pytest.skip(f"no shared vectors at {SHARED_VECTORS} to compare with (a plain clone)")
    diffs: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        diffs.extend(f"{prefix}{n}" for n in cmp.left_only + cmp.right_only + cmp.diff_files)
        for sub, child in cmp.subdirs.items():
            walk(child, f"{prefix}{sub}/")

    walk(filecmp.dircmp(VECTORS, SHARED_VECTORS, ignore=["__pycache__"]), "")
    assert diffs == []
