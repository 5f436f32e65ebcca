"""Compute the audit hash chain and sign or check its checkpoints (pure; no I/O).

Every audit line carries `"prev"`: the lowercase SHA-256 hex of the previous line's bytes
without its newline; the first line ever written has 64 zeros. A checkpoint signs the chain
head with an Ed25519 key kept for the audit file only: the signed message is a fixed domain
prefix plus the 32 raw bytes of the head, so a checkpoint signature can never pass for a
plugin signature (those sign a bare 32-byte digest), even if someone trusted one key for both.
"""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.signing

__all__ = [
    "CHECKPOINT_DOMAIN",
    "GENESIS",
    "checkpoint_message",
    "is_hash",
    "key_id",
    "line_hash",
    "sign_checkpoint",
    "verify_checkpoint",
]

GENESIS = "0" * 64
CHECKPOINT_DOMAIN = b"aisoc-plugind audit checkpoint v1\x00"
_HEX = frozenset("0123456789abcdef")


def line_hash(line: bytes) -> str:
    """Return the chain hash of one line (its bytes without the trailing newline)."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def is_hash(value: object) -> bool:
    """Return True for a 64-character lowercase hex string."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def checkpoint_message(chain_hash: str) -> bytes:
    """Return the bytes a checkpoint signature covers: the domain prefix and the head."""
    return CHECKPOINT_DOMAIN + bytes.fromhex(chain_hash)


def sign_checkpoint(key: nacl.signing.SigningKey, chain_hash: str) -> str:
    """Return the hex Ed25519 signature of a chain head."""
    return key.sign(checkpoint_message(chain_hash)).signature.hex()


def verify_checkpoint(key: nacl.signing.VerifyKey, chain_hash: str, signature: str) -> bool:
    """Return True when `signature` (hex) signs `chain_hash` under `key`."""
    try:
        key.verify(checkpoint_message(chain_hash), bytes.fromhex(signature))
    except (ValueError, nacl.exceptions.BadSignatureError):
        return False
    return True


def key_id(key: nacl.signing.VerifyKey) -> str:
    """Return a short id of a public key: the first 16 hex of SHA-256 of its raw bytes."""
    return hashlib.sha256(bytes(key)).hexdigest()[:16]
