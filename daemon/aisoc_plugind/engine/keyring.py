"""Load the trusted Ed25519 public keys from `trust.keys_dir`; key id = file stem.

A malformed, non-Ed25519 or unreadable key file is skipped and reported to the caller (which
emits an event); it never stops the daemon. A key decides what code runs, so a key file is
read like every file that carries trust (`files.read_trusted`): a file that group or others
may write or that another unprivileged user owns is skipped (`key_file_insecure`), and so is
anything but a regular file (`key_file_not_regular`: a FIFO never hangs the read). A symlink
is followed only when every link on the way resolves inside the keys dir (kubelet's `..data`
layout of a mounted Secret); any other is skipped (`key_symlink`). A keys dir that group or
others may write (without the sticky bit) or that another user owns gives no key at all
(`keys_dir_insecure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import nacl.signing

from aisoc_plugind.core.signing import load_public_key
from aisoc_plugind.errors import KeyFileError
from aisoc_plugind.files import FileRefused, read_trusted, trust_problem

__all__ = ["KEY_SUFFIXES", "Keyring", "SkippedKey", "load_keyring"]

KEY_SUFFIXES = (".pem", ".pub")
MAX_KEY_FILE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedKey:
    """A key file that could not be used, and why."""

    path: Path
    code: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Keyring:
    """The trusted keys by id, plus the files that were skipped."""

    keys: Mapping[str, nacl.signing.VerifyKey] = field(default_factory=lambda: MappingProxyType({}))
    skipped: tuple[SkippedKey, ...] = ()
    directory: Path | None = None

    def fingerprints(self) -> dict[str, str]:
        """Return `{key id: hex of the raw public key}`, to compare two keyrings."""
        return {k: bytes(v).hex() for k, v in self.keys.items()}


def load_keyring(directory: Path) -> Keyring:
    """Read every `*.pem` / `*.pub` in `directory`; a missing directory gives no keys."""
    try:
        refused = trust_problem(directory.stat())
        names = sorted(p.name for p in directory.iterdir() if p.suffix in KEY_SUFFIXES)
    except FileNotFoundError:
        return Keyring(directory=directory)
    except OSError as exc:
        return _no_keys(directory, "keys_dir_unreadable", exc.strerror or str(exc))
    if refused is not None:
        return _no_keys(directory, "keys_dir_insecure", f"{refused.detail}; no key is trusted")
    keys: dict[str, nacl.signing.VerifyKey] = {}
    skipped: list[SkippedKey] = []
    for name in names:
        path = directory / name
        if Path(name).stem in keys:
            skipped.append(
                SkippedKey(
                    path=path,
                    code="key_duplicate_id",
                    message=f"key id {Path(name).stem!r} is already taken",
                )
            )
            continue
        try:
            keys[Path(name).stem] = load_public_key(_read_key_file(path))
        except KeyFileError as exc:
            skipped.append(SkippedKey(path=path, code=exc.code, message=exc.message))
    return Keyring(keys=MappingProxyType(keys), skipped=tuple(skipped), directory=directory)


def _no_keys(directory: Path, code: str, message: str) -> Keyring:
    return Keyring(
        directory=directory, skipped=(SkippedKey(path=directory, code=code, message=message),)
    )


_REFUSED_CODES = {
    "symlink": "key_symlink",
    "not_regular": "key_file_not_regular",
    "unsafe_mode": "key_file_insecure",
    "unsafe_owner": "key_file_insecure",
}


def _read_key_file(path: Path) -> bytes:
    try:
        return read_trusted(path, cap=MAX_KEY_FILE_BYTES, links_within=path.parent)
    except FileRefused as exc:
        code = _REFUSED_CODES.get(exc.reason, "key_unreadable")
        raise KeyFileError(f"{path.name} {exc.detail}", code=code) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot open: {exc.strerror}", code="key_unreadable") from exc
