"""Read, parse, render and update the tokens file (`api.tokens_file`, TOML of hashes).

    [tokens."ops"]
    sha256 = "<64 hex>"
    permissions = ["plugins:read"]
    created = "2026-05-09T07:35:25.000000Z"
    expires = "2027-05-09T07:35:25.000000Z"      # optional

Only SHA-256 hashes of tokens are stored. Updates hold a lock on the file's directory and
replace the file atomically, so two `token` commands never lose an update; the replacement
keeps the file's mode (never group/other write), owner and group, and a new file is 0600.

The file decides who may do what, so it is read like every file that carries trust
(`files.read_trusted`): a file that group or others may write, that another unprivileged
user owns, or that is not a regular file (a FIFO never hangs the read) raises TokenFileError
`tokens_file_insecure`; links are followed only inside its directory (kubelet's `..data`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aisoc_plugind.core.clock import parse_rfc3339
from aisoc_plugind.errors import TokenFileError
from aisoc_plugind.files import FileRefused, read_trusted, replace_file

__all__ = [
    "MAX_TOKENS_FILE_BYTES",
    "NAME_RE",
    "PERMISSIONS",
    "TokenEntry",
    "load_for_update",
    "locked_dir",
    "parse_tokens",
    "read_tokens_file",
    "render_tokens",
    "write_tokens_file",
]

PERMISSIONS = ("plugins:read", "plugins:admin", "plugins:execute")
MAX_TOKENS_FILE_BYTES = 4 * 1024 * 1024
NEW_FILE_MODE = 0o600
_KEPT_MODE_BITS = 0o644  # what a rewrite keeps of the old mode: never write or execute for others
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


_HEADER = (
    "# aisoc-plugind API tokens: only SHA-256 hashes of the tokens are stored here.\n"
    "# Managed by `aisoc-plugind token create|list|revoke`; rewritten on each change.\n"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEntry:
    """One `[tokens."<name>"]` table of the tokens file."""

    name: str
    sha256: str
    permissions: tuple[str, ...]
    created: str
    expires: str = ""  # RFC 3339 UTC; empty: never

    def public(self) -> dict[str, Any]:
        """Return what may be shown: name, permissions, created, expires (never the hash)."""
        return {
            "name": self.name,
            "permissions": list(self.permissions),
            "created": self.created,
            "expires": self.expires or None,
        }

    def expired(self, now: datetime) -> bool:
        """Return True once `expires` has passed."""
        return bool(self.expires) and now >= parse_rfc3339(self.expires)


def parse_tokens(data: bytes) -> tuple[dict[str, TokenEntry], list[str]]:
    """Parse the tokens file; return the usable entries and every problem found.

    An entry with any problem is left out, so a damaged entry grants nothing.
    """
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return {}, [f"not valid TOML: {exc}"]
    problems = [f"unknown top-level key {k!r}" for k in doc if k != "tokens"]
    table = doc.get("tokens", {})
    if not isinstance(table, dict):
        return {}, [*problems, '`tokens` must be a table of [tokens."<name>"] tables']
    entries: dict[str, TokenEntry] = {}
    for name, raw in table.items():
        entry, problem = _entry(name, raw)
        if entry is not None:
            entries[name] = entry
        else:
            problems.append(f"token {name!r}: {problem}; ignored")
    return entries, problems


def _entry(name: str, raw: Any) -> tuple[TokenEntry | None, str]:
    if not NAME_RE.fullmatch(name):
        return None, "invalid name"
    if not isinstance(raw, dict):
        return None, "must be a table"
    digest, perms, created = raw.get("sha256"), raw.get("permissions"), raw.get("created", "")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        return None, "sha256 must be 64 lowercase hex characters"
    if not isinstance(perms, list) or not perms or not all(p in PERMISSIONS for p in perms):
        return None, f"permissions must be a non-empty list of {', '.join(PERMISSIONS)}"
    if not isinstance(created, str):
        return None, "created must be a string"
    expires = raw.get("expires", "")
    if not _valid_expiry(expires):
        return None, "expires must be an RFC 3339 time with a zone"
    return TokenEntry(
        name=name, sha256=digest, permissions=tuple(perms), created=created, expires=expires
    ), ""


def _valid_expiry(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return not value or bool(parse_rfc3339(value))
    except ValueError:
        return False


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for the ASCII we write.
    return json.dumps(value, ensure_ascii=True)


def render_tokens(entries: Mapping[str, TokenEntry]) -> str:
    """Return the TOML text of the tokens file (sorted by name)."""
    parts = [_HEADER]
    for name in sorted(entries):
        e = entries[name]
        perms = ", ".join(_toml_str(p) for p in e.permissions)
        parts.append(
            f"\n[tokens.{_toml_str(name)}]\nsha256 = {_toml_str(e.sha256)}\n"
            f"permissions = [{perms}]\ncreated = {_toml_str(e.created)}\n"
        )
        if e.expires:
            parts.append(f"expires = {_toml_str(e.expires)}\n")
    return "".join(parts)


def read_tokens_file(path: Path) -> tuple[dict[str, TokenEntry], list[str]]:
    """Read and parse the tokens file; a missing or unreadable file gives no tokens.

    Raises TokenFileError `tokens_file_insecure` when the file may not be trusted.
    """
    try:
        data = _read(path)
    except FileNotFoundError:
        return {}, [f"{path} does not exist; every API request will be refused"]
    except OSError as exc:
        return {}, [f"{path} cannot be read: {exc.strerror}"]
    entries, problems = parse_tokens(data)
    return entries, [f"{path}: {p}" for p in problems]


def _read(path: Path) -> bytes:
    """Return the file's bytes; raise TokenFileError when it may not be trusted."""
    try:
        return read_trusted(path, cap=MAX_TOKENS_FILE_BYTES, links_within=path.parent)
    except FileRefused as exc:
        code = "tokens_file_unreadable" if exc.reason == "too_large" else "tokens_file_insecure"
        raise TokenFileError(
            f"{path} {exc.detail}; refusing to trust it (fix the file, then SIGHUP)", code=code
        ) from exc


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file's directory: two CLIs never lose an update."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenFileError(f"{path.parent}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_for_update(path: Path) -> dict[str, TokenEntry]:
    """Return the entries of an existing file to change (none for a new one); raise
    TokenFileError when it may not be trusted or has any problem."""
    try:
        data = _read(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TokenFileError(f"{path}: {exc.strerror}") from exc
    entries, problems = parse_tokens(data)
    if problems:
        raise TokenFileError(f"{path} has problems, fix them first: " + "; ".join(problems))
    return entries


def write_tokens_file(path: Path, entries: Mapping[str, TokenEntry]) -> None:
    """Replace the file atomically (temp file + rename), keeping its mode (minus any write
    or execute bit for group and others), owner and group; a new file is 0600."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & _KEPT_MODE_BITS
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    replace_file(
        path, render_tokens(entries).encode("ascii"), mode=mode, keep_owner=True, sync_dir=True
    )
