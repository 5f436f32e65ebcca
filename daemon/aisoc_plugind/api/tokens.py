"""Authenticate control-API bearer tokens against the tokens file and manage that file.

The tokens file (`api.tokens_file`, TOML) holds only SHA-256 hashes:

    [tokens."ops"]
    sha256 = "<64 hex>"
    permissions = ["plugins:read"]
    created = "2026-05-09T07:35:25.000000Z"

A token is `aisoc_pd_` + 43 url-safe characters (256 random bits) + 8 hex characters of
CRC-32 over the rest, so secret scanners can recognise it and typos are caught without a
lookup. `TokenStore` checks the file's identity (device, inode, size, mtime) on every
authentication, one `stat()`, and re-reads it when it changed; the daemon's SIGHUP hook
forces a re-read. A file that cannot be read or parsed grants nothing (fail closed).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import tempfile
import tomllib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aisoc_plugind.core.records import rfc3339, utcnow

PERMISSIONS = ("plugins:read", "plugins:admin", "plugins:execute")
TOKEN_PREFIX = "aisoc_pd_"  # noqa: S105 (a public prefix for secret scanners)
DEFAULT_TOKENS_FILE = Path("/etc/aisoc-plugind/tokens.toml")
TOKENS_FILE_ENV = "AISOC_PLUGIND_TOKENS_FILE"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN_RE = re.compile(r"^aisoc_pd_[A-Za-z0-9_-]{43}[0-9a-f]{8}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER = 512
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_HEADER = ("# aisoc-plugind API tokens: only SHA-256 hashes of the tokens are stored here.\n"
           "# Managed by `aisoc-plugind token create|list|revoke`; rewritten on each change.\n")


class TokenFileError(Exception):
    """The tokens file cannot be read, parsed or written (for the CLI)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated caller: the token's name and what it may do."""

    name: str
    permissions: frozenset[str]

    def allows(self, permission: str) -> bool:
        """Return True when the token holds exactly this permission (none implies another)."""
        return permission in self.permissions


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
        return {"name": self.name, "permissions": list(self.permissions),
                "created": self.created, "expires": self.expires or None}

    def expired(self, now: datetime) -> bool:
        """Return True once `expires` has passed."""
        return bool(self.expires) and now >= _parse_time(self.expires)


def _parse_time(text: str) -> datetime:
    """Parse the RFC 3339 UTC timestamps this file holds; raises ValueError."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a time zone is required")
    return moment


_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})([dhm])$")


def parse_duration(text: str) -> timedelta:
    """Parse `90d`, `12h` or `30m`; raises ValueError."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 90d, 12h or 30m")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


# ---- tokens: pure --------------------------------------------------------------------------


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


# ---- the file format: pure -----------------------------------------------------------------


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
        return {}, [*problems, "`tokens` must be a table of [tokens.\"<name>\"] tables"]
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
    return TokenEntry(name=name, sha256=digest, permissions=tuple(perms), created=created,
                      expires=expires), ""


def _valid_expiry(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return not value or bool(_parse_time(value))
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
        parts.append(f"\n[tokens.{_toml_str(name)}]\nsha256 = {_toml_str(e.sha256)}\n"
                     f"permissions = [{perms}]\ncreated = {_toml_str(e.created)}\n")
        if e.expires:
            parts.append(f"expires = {_toml_str(e.expires)}\n")
    return "".join(parts)


# ---- the daemon's view ---------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_tokens_file(path: Path) -> tuple[dict[str, TokenEntry], list[str]]:
    """Read and parse the tokens file; a missing, unsafe or unreadable file gives no tokens."""
    try:
        with path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                return {}, [f"{path} is writable by group or others "
                            f"({stat.filemode(mode)}); refusing to trust it"]
            data = fh.read()
    except FileNotFoundError:
        return {}, [f"{path} does not exist; every API request will be refused"]
    except OSError as exc:
        return {}, [f"{path} cannot be read: {exc.strerror}"]
    entries, problems = parse_tokens(data)
    return entries, [f"{path}: {p}" for p in problems]


class TokenStore:
    """The valid tokens of `api.tokens_file`, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: tuple[str, ...] = ()
        self.generation = 0  # counts (re)loads, so callers can tell that one happened
        self._entries: dict[str, TokenEntry] = {}
        self._identity: tuple[int, int, int, int] | None = None
        self.reload()

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Return the names of the valid tokens."""
        return sorted(self._entries)

    def reload(self) -> None:
        """Re-read the file now (the SIGHUP hook)."""
        self._identity = _identity(self.path)  # taken first: a later change is seen again
        entries, problems = read_tokens_file(self.path)
        self._entries, self.problems = entries, tuple(problems)
        self.generation += 1

    def refresh(self) -> bool:
        """Re-read the file when its identity changed; return True when it was re-read."""
        if _identity(self.path) == self._identity:
            return False
        self.reload()
        return True

    def authenticate(self, header_value: str | None) -> Principal | None:
        """Return the principal of an `Authorization` header value, or None (also when the
        token has expired)."""
        self.refresh()
        found = self._lookup(header_value)
        if found is None or found.expired(utcnow()):
            return None
        return Principal(name=found.name, permissions=frozenset(found.permissions))

    def expired_name(self, header_value: str | None) -> str | None:
        """Return the name of the token in the header when it is known but expired."""
        found = self._lookup(header_value)
        return found.name if found is not None and found.expired(utcnow()) else None

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


# ---- the token CLI -------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_dir(path: Path) -> Iterator[None]:
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


def _load_for_update(path: Path) -> dict[str, TokenEntry]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TokenFileError(f"{path}: {exc.strerror}") from exc
    entries, problems = parse_tokens(data)
    if problems:
        raise TokenFileError(f"{path} has problems, fix them first: " + "; ".join(problems))
    return entries


def write_tokens_file(path: Path, entries: Mapping[str, TokenEntry]) -> None:
    """Replace the file atomically (temp file + rename), mode 0600, keeping its owner."""
    try:
        owner = path.stat()
    except FileNotFoundError:
        owner = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, owner.st_uid, owner.st_gid)
        os.write(fd, render_tokens(entries).encode("ascii"))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_permissions(text: str) -> tuple[str, ...]:
    perms = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown or not perms:
        raise TokenFileError(f"unknown permission {', '.join(unknown) or '(none given)'}; "
                             f"choose from: {', '.join(PERMISSIONS)}")
    return perms


def _create(args: argparse.Namespace) -> int:
    if not NAME_RE.fullmatch(args.name):
        raise TokenFileError(f"invalid token name {args.name!r}: use 1-64 characters "
                             "A-Z a-z 0-9 . _ @ - (starting with a letter or digit)")
    perms = _parse_permissions(args.permissions)
    path: Path = args.tokens_file
    with _locked_dir(path):
        entries = _load_for_update(path)
        if args.name in entries:
            raise TokenFileError(f"a token named {args.name!r} exists already; revoke it first")
        token = new_token()
        now = utcnow()
        expires = rfc3339(now + args.expires_in) if args.expires_in else ""
        entries[args.name] = TokenEntry(name=args.name, sha256=token_hash(token),
                                        permissions=perms, created=rfc3339(now),
                                        expires=expires)
        write_tokens_file(path, entries)
    print(token)
    print(f"created token {args.name!r} ({', '.join(perms)}) in {path}; it is shown once",
          file=sys.stderr)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    entries, problems = read_tokens_file(args.tokens_file)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    shown = [entries[n].public() for n in sorted(entries)]
    if args.json:
        print(json.dumps({"tokens": shown}, indent=2))
        return EXIT_OK
    rows = [("NAME", "PERMISSIONS", "CREATED", "EXPIRES")]
    rows += [(t["name"], ",".join(t["permissions"]), t["created"], t["expires"] or "never")
             for t in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    path: Path = args.tokens_file
    with _locked_dir(path):
        entries = _load_for_update(path)
        if entries.pop(args.name, None) is None:
            raise TokenFileError(f"no token named {args.name!r} in {path}")
        write_tokens_file(path, entries)
    print(f"revoked token {args.name!r}; the daemon refuses it from its next request",
          file=sys.stderr)
    return EXIT_OK


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _default_tokens_file() -> Path:
    return Path(os.environ.get(TOKENS_FILE_ENV) or DEFAULT_TOKENS_FILE)


def _token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aisoc-plugind token", description="Create, list or revoke control-API tokens.")
    sub = parser.add_subparsers(dest="action", required=True)
    file_help = f"tokens file (default: ${TOKENS_FILE_ENV} or {DEFAULT_TOKENS_FILE})"
    create = sub.add_parser("create", help="create a token; prints it alone on stdout")
    create.add_argument("--name", required=True, help="token name (the audit log's actor)")
    create.add_argument("--permissions", required=True,
                        help=f"comma-separated, from: {', '.join(PERMISSIONS)}")
    create.add_argument("--expires-in", type=_duration_arg, default=None, metavar="DURATION",
                        help="refuse the token after this long: 90d, 12h or 30m "
                             "(default: never)")
    listing = sub.add_parser("list", help="list names, permissions, creation times")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = sub.add_parser("revoke", help="delete a token by name")
    revoke.add_argument("--name", required=True)
    for p in (create, listing, revoke):
        p.add_argument("--tokens-file", type=Path, default=None, help=file_help)
    return parser


_ACTIONS = {"create": _create, "list": _list, "revoke": _revoke}


def token_main(argv: Sequence[str]) -> int:
    """Run `aisoc-plugind token create|list|revoke`; return the exit code (0/1/2)."""
    try:
        args = _token_parser().parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    if args.tokens_file is None:
        args.tokens_file = _default_tokens_file()
    try:
        return _ACTIONS[args.action](args)
    except (TokenFileError, OSError) as exc:
        text = str(exc) if isinstance(exc, TokenFileError) else f"{exc.filename}: {exc.strerror}"
        print(f"aisoc-plugind token: error: {text}", file=sys.stderr)
        return EXIT_FAILED
