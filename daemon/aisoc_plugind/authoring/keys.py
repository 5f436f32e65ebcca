"""Make and read Ed25519 signing keys: PKCS#8 private (0600) and SPKI public PEM files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing

from aisoc_plugind.authoring.layout import write_new_file
from aisoc_plugind.core.signing import (
    load_private_key,
    private_key_pem,
    public_key_pem,
)
from aisoc_plugind.errors import (
    AuthoringError,
    KeyFileError,
)

__all__ = ["PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "KeyPair", "read_private_key", "write_keypair"]

PRIVATE_KEY_FILE = "signing.key"


PUBLIC_KEY_FILE = "signing.pub"


MAX_KEY_FILE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPair:
    """The files `keygen` wrote and the raw public key."""

    private_path: Path
    public_path: Path
    public_key: bytes


def write_keypair(out_dir: Path) -> KeyPair:
    """Create an Ed25519 key pair in `out_dir`: PKCS#8 `signing.key` (0600), SPKI `signing.pub`."""
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise AuthoringError(
                f"{path} already exists; keygen never overwrites a key (choose another --out)"
            )
    key = nacl.signing.SigningKey.generate()
    write_new_file(private_path, private_key_pem(key), 0o600)
    try:
        write_new_file(public_path, public_key_pem(key.verify_key), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPair(
        private_path=private_path, public_path=public_path, public_key=bytes(key.verify_key)
    )


def read_private_key(path: Path) -> Any:
    """Load an unencrypted Ed25519 PKCS#8 PEM key file (a nacl SigningKey)."""
    with path.open("rb") as fh:
        data = fh.read(MAX_KEY_FILE_BYTES + 1)
    if b"ENCRYPTED PRIVATE KEY" in data:
        raise AuthoringError(
            f"{path}: encrypted keys are not supported; write a decrypted "
            f"copy with `openssl pkey -in {path} -out plain.key`"
        )
    try:
        return load_private_key(data)
    except KeyFileError as exc:
        raise AuthoringError(f"{path}: {exc.message}") from exc
