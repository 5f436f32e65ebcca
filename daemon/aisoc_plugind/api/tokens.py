"""Authenticate control-API bearer tokens: the token format and the daemon's view of the file.

A token is `aisoc_pd_` + 43 url-safe characters (256 random bits) + 8 hex characters of
CRC-32 over the rest, so secret scanners can recognise it and typos are caught without a
lookup. `TokenStore` checks the file's identity (device, inode, size, mtime, ctime) before an
authentication whenever inotify says its directory changed (without inotify: before every
one), and at least once a second, and re-reads it when it changed; a change made before a
request is seen by that request. The daemon's SIGHUP hook forces a re-read. A file that
cannot be read or parsed grants nothing (fail closed). A file that may not be trusted
(writable by group or others, owned by another unprivileged user, not a regular file) is
refused: the tokens read before stay in force and `refused` says why (at start the daemon
then does not start at all).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.api.filewatch import ChangeFlag
from aisoc_plugind.api.tokens_file import PERMISSIONS, TokenEntry, read_tokens_file
from aisoc_plugind.core.clock import parse_rfc3339
from aisoc_plugind.errors import TokenFileError

__all__ = [
    "ADMIN",
    "EXECUTE",
    "PERMISSIONS",
    "READ",
    "Principal",
    "TokenStore",
    "bearer_token",
    "denial_reason",
    "new_token",
    "token_hash",
    "well_formed",
]

READ, ADMIN, EXECUTE = PERMISSIONS
TOKEN_PREFIX = "aisoc_pd_"  # noqa: S105 (a public prefix for secret scanners)


_TOKEN_RE = re.compile(r"^aisoc_pd_[A-Za-z0-9_-]{43}[0-9a-f]{8}$")


_MAX_HEADER = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated caller: the token's name and what it may do."""

    name: str
    permissions: frozenset[str]

    def allows(self, permission: str) -> bool:
        """Return True when the token holds exactly this permission (none implies another)."""
        return permission in self.permissions


def _checksum(body: str) -> str:
    return f"{zlib.crc32(body.encode('ascii')):08x}"


def new_token() -> str:
    """Return a fresh token: prefix, 256 random bits (43 chars), CRC-32 checksum."""
    body = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return body + _checksum(body)


def well_formed(token: str) -> bool:
    """Return True when `token` has the token shape and a matching checksum."""
    return bool(_TOKEN_RE.fullmatch(token)) and _checksum(token[:-8]) == token[-8:]


def token_hash(token: str) -> str:
    """Return the lowercase SHA-256 hex that the tokens file stores for `token`."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(header_value: str | None) -> str | None:
    """Return the credentials of an `Authorization: Bearer <token>` value, else None."""
    if not header_value or len(header_value) > _MAX_HEADER:
        return None
    scheme, _, credentials = header_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def denial_reason(header_value: str | None) -> str:
    """Classify why a header did not authenticate: token_missing, _malformed or _unknown."""
    token = bearer_token(header_value)
    if token is None:
        return "token_missing" if not header_value else "token_malformed"
    return "token_unknown" if well_formed(token) else "token_malformed"


# (device, inode, size, mtime, ctime): ctime also moves on chmod and chown.
Identity = tuple[int, int, int, int, int]


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _expiry(expires: str) -> float | None:
    """Return `expires` as POSIX time (None: never); one that cannot be read has passed."""
    if not expires:
        return None
    try:
        return parse_rfc3339(expires).timestamp()
    except ValueError:
        return 0.0


RECHECK_S = 1.0  # the tokens file is stat'ed at least this often, whatever inotify says
MAX_KNOWN_HEADERS = 256


class TokenStore:
    """The valid tokens of `api.tokens_file`, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: tuple[str, ...] = ()
        self.generation = 0  # counts (re)loads, so callers can tell that one happened
        self._entries: dict[str, TokenEntry] = {}
        self._principals: dict[str, Principal] = {}
        self._expires: dict[str, float | None] = {}  # POSIX time, None: never
        self._identity: Identity | None = None
        self.refused: TokenFileError | None = None  # why the last re-read was refused
        self._path = os.fspath(path)
        self._checked_at = 0.0
        # Authorization header -> token name, for headers that authenticated (cleared on
        # every reload): the hash and the constant-time scan run once per distinct header.
        self._known: dict[str, str] = {}
        self.flag = ChangeFlag(path)
        self.reload()

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Return the names of the valid tokens."""
        return sorted(self._entries)

    def reload(self) -> None:
        """Re-read the file now (the SIGHUP hook). A file that may not be trusted leaves the
        tokens as they were and sets `refused`."""
        self._identity = _identity(self._path)  # taken first: a later change is seen again
        self.generation += 1
        try:
            entries, problems = read_tokens_file(self.path)
        except TokenFileError as exc:
            self.refused = exc
            if self.generation == 1:  # nothing was trusted before: nothing is now
                self.problems = (exc.message,)
            return
        self.refused = None
        self._entries, self.problems = entries, tuple(problems)
        self._principals = {
            name: Principal(name=name, permissions=frozenset(entry.permissions))
            for name, entry in entries.items()
        }
        self._expires = {name: _expiry(entry.expires) for name, entry in entries.items()}
        self._known = {}

    def refresh(self) -> bool:
        """Re-read the file when its identity changed; return True when it was re-read."""
        self._checked_at = time.monotonic()
        if _identity(self._path) == self._identity:
            return False
        self.reload()
        return True

    def authenticate(self, header_value: str | None) -> Principal | None:
        """Return the principal of an `Authorization` header value, or None (also when the
        token has expired).

        The file is looked at first when it may have changed (`flag`; without inotify, on
        every call) and at least once a second in any case.
        """
        if self.flag.changed() or time.monotonic() - self._checked_at >= RECHECK_S:
            self.refresh()
        if header_value is None:
            return None
        name = self._known.get(header_value)
        if name is None:
            found = self._lookup(header_value)
            if found is None:
                return None
            name = found.name
            if len(self._known) < MAX_KNOWN_HEADERS:
                self._known[header_value] = name
        if self._expired(name):
            return None
        return self._principals[name]

    def expired_name(self, header_value: str | None) -> str | None:
        """Return the name of the token in the header when it is known but expired."""
        found = self._lookup(header_value)
        return found.name if found is not None and self._expired(found.name) else None

    def _expired(self, name: str) -> bool:
        expires = self._expires.get(name)
        return expires is not None and time.time() >= expires

    def _lookup(self, header_value: str | None) -> TokenEntry | None:
        token = bearer_token(header_value)
        if token is None or not well_formed(token):
            return None
        digest = token_hash(token)
        found: TokenEntry | None = None
        for entry in self._entries.values():  # no early exit: same work for every token
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found
