"""Sign a plugin as the daemon will verify it, and verify it as a strict daemon would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisoc_plugind.authoring.validate import validate_plugin
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.core.signing import (
    TrustDecision,
    TrustMode,
    decide,
    encode_signature,
    plugin_digest,
    sign_digest,
)
from aisoc_plugind.engine.bundle import (
    read_bundle,
)
from aisoc_plugind.engine.keyring import SkippedKey, load_keyring
from aisoc_plugind.errors import (
    AuthoringError,
)

__all__ = ["Signed", "Verification", "sign_plugin", "verify_plugin"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Signed:
    """A signature made over a plugin, ready to be written as `plugin.sig`."""

    manifest: Manifest
    files: tuple[str, ...]
    digest: bytes
    signature_file: bytes
    public_key: bytes


def sign_plugin(plugin_dir: Path, key: Any) -> Signed:
    """Validate the plugin, then sign the digest the daemon will compute for it."""
    bundle, manifest = validate_plugin(plugin_dir).signed_parts()
    digest = plugin_digest(manifest.as_json(), bundle.sources)
    raw = sign_digest(digest, key)
    key.verify_key.verify(digest, raw)  # never write a signature that does not verify
    return Signed(
        manifest=manifest,
        files=tuple(bundle.sources),
        digest=digest,
        signature_file=encode_signature(raw),
        public_key=bytes(key.verify_key),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """The strict-mode trust decision for a plugin, with what was checked."""

    manifest: Manifest
    decision: TrustDecision
    files: tuple[str, ...]
    key_ids: tuple[str, ...]
    skipped_keys: tuple[SkippedKey, ...]


def verify_plugin(plugin_dir: Path, keys_dir: Path) -> Verification:
    """Decide, as the daemon does in strict mode, whether a trusted key verifies the plugin."""
    if not keys_dir.is_dir():
        raise AuthoringError(f"{keys_dir}: no such keys directory")
    keyring = load_keyring(keys_dir)
    bundle = read_bundle(plugin_dir)
    manifest = manifest_mod.parse(bundle.manifest_bytes, bundle.manifest_name)
    digest = plugin_digest(manifest.as_json(), bundle.sources)
    decision = decide(
        digest=digest, signature_file=bundle.signature, keys=keyring.keys, mode=TrustMode.STRICT
    )
    return Verification(
        manifest=manifest,
        decision=decision,
        files=tuple(bundle.sources),
        key_ids=tuple(sorted(keyring.keys)),
        skipped_keys=keyring.skipped,
    )
