"""Run `aisoc-plugind token create|list|revoke`: manage the control API's tokens file."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

from aisoc_plugind.api.tokens import PERMISSIONS, new_token, token_hash
from aisoc_plugind.api.tokens_file import (
    NAME_RE,
    TokenEntry,
    load_for_update,
    locked_dir,
    read_tokens_file,
    write_tokens_file,
)
from aisoc_plugind.cli.tree import EXIT_OK, Command
from aisoc_plugind.core.clock import rfc3339, utcnow
from aisoc_plugind.errors import TokenFileError

__all__ = ["TOKEN_COMMANDS", "parse_duration"]

DEFAULT_TOKENS_FILE = Path("/etc/aisoc-plugind/tokens.toml")
TOKENS_FILE_ENV = "AISOC_PLUGIND_TOKENS_FILE"
_PREFIX = "aisoc-plugind token"

_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})([dhm])$")


def parse_duration(text: str) -> timedelta:
    """Parse `90d`, `12h` or `30m`; raises ValueError."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 90d, 12h or 30m")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def _parse_permissions(text: str) -> tuple[str, ...]:
    perms = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown or not perms:
        raise TokenFileError(
            f"unknown permission {', '.join(unknown) or '(none given)'}; "
            f"choose from: {', '.join(PERMISSIONS)}"
        )
    return perms


def _create(args: argparse.Namespace) -> int:
    if not NAME_RE.fullmatch(args.name):
        raise TokenFileError(
            f"invalid token name {args.name!r}: use 1-64 characters "
            "A-Z a-z 0-9 . _ @ - (starting with a letter or digit)"
        )
    perms = _parse_permissions(args.permissions)
    path = _tokens_file(args)
    with locked_dir(path):
        entries = load_for_update(path)
        if args.name in entries:
            raise TokenFileError(f"a token named {args.name!r} exists already; revoke it first")
        token = new_token()
        now = utcnow()
        expires = rfc3339(now + args.expires_in) if args.expires_in else ""
        entries[args.name] = TokenEntry(
            name=args.name,
            sha256=token_hash(token),
            permissions=perms,
            created=rfc3339(now),
            expires=expires,
        )
        write_tokens_file(path, entries)
    print(token)
    print(
        f"created token {args.name!r} ({', '.join(perms)}) in {path}; it is shown once",
        file=sys.stderr,
    )
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    entries, problems = read_tokens_file(_tokens_file(args))
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    shown = [entries[n].public() for n in sorted(entries)]
    if args.json:
        print(json.dumps({"tokens": shown}, indent=2))
        return EXIT_OK
    rows = [("NAME", "PERMISSIONS", "CREATED", "EXPIRES")]
    rows += [
        (t["name"], ",".join(t["permissions"]), t["created"], t["expires"] or "never")
        for t in shown
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    path = _tokens_file(args)
    with locked_dir(path):
        entries = load_for_update(path)
        if entries.pop(args.name, None) is None:
            raise TokenFileError(f"no token named {args.name!r} in {path}")
        write_tokens_file(path, entries)
    print(
        f"revoked token {args.name!r}; the daemon refuses it from its next request", file=sys.stderr
    )
    return EXIT_OK


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _tokens_file(args: argparse.Namespace) -> Path:
    given: Path | None = args.tokens_file
    return given or Path(os.environ.get(TOKENS_FILE_ENV) or DEFAULT_TOKENS_FILE)


def _file_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help=f"tokens file (default: ${TOKENS_FILE_ENV} or {DEFAULT_TOKENS_FILE})",
    )


def _args_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="token name (the audit log's actor)")
    p.add_argument(
        "--permissions", required=True, help=f"comma-separated, from: {', '.join(PERMISSIONS)}"
    )
    p.add_argument(
        "--expires-in",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help="refuse the token after this long: 90d, 12h or 30m (default: never)",
    )
    _file_option(p)


def _args_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    _file_option(p)


def _args_revoke(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True)
    _file_option(p)


TOKEN_COMMANDS: tuple[Command, ...] = (
    Command(
        name="create",
        help="create a token; prints it alone on stdout",
        run=_create,
        arguments=_args_create,
        error_prefix=_PREFIX,
        example="""\
  aisoc-plugind token create --tokens-file /etc/aisoc-plugind/tokens.toml \\
      --name soc-runner --permissions plugins:execute --expires-in 90d""",
    ),
    Command(
        name="list",
        help="list names, permissions, creation and expiry times",
        run=_list,
        arguments=_args_list,
        error_prefix=_PREFIX,
    ),
    Command(
        name="revoke",
        help="delete a token by name",
        run=_revoke,
        arguments=_args_revoke,
        error_prefix=_PREFIX,
    ),
)
