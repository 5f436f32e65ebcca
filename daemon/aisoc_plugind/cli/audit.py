"""Run `aisoc-plugind audit verify|keygen`: check audit files, make a checkpoint key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nacl.signing

from aisoc_plugind.audit.chain import key_id
from aisoc_plugind.audit.verify import verify_files
from aisoc_plugind.cli.tree import EXIT_FAILED, EXIT_OK, Command, CommandFailed, say
from aisoc_plugind.core.signing import load_public_key, private_key_pem, public_key_pem
from aisoc_plugind.errors import KeyFileError
from aisoc_plugind.files import FileRefused, read_regular, write_new

__all__ = ["AUDIT_COMMANDS"]

_PREFIX = "aisoc-plugind audit"
PRIVATE_KEY_FILE = "audit-signing.key"
PUBLIC_KEY_FILE = "audit-signing.pub"


def _verify(args: argparse.Namespace) -> int:
    key = _public_key(args.key) if args.key else None
    report = verify_files(args.files, key, complete=args.complete)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.broken is not None:
        say(str(report.broken))
        return EXIT_FAILED
    sealed = f"; {report.checkpoints} checkpoint(s)" if report.checkpoints else ""
    unsealed = f", {report.unsealed} line(s) after the last" if report.checkpoints else ""
    say(f"ok {report.lines} lines{sealed}{unsealed}")
    return EXIT_OK


def _public_key(path: Path) -> nacl.signing.VerifyKey:
    try:
        return load_public_key(read_regular(path, cap=16 * 1024))
    except (OSError, FileRefused, KeyFileError) as exc:
        detail = exc.message if isinstance(exc, KeyFileError) else str(exc)
        raise CommandFailed(f"{path}: not an Ed25519 public key: {detail}") from exc


def _keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = nacl.signing.SigningKey.generate()
    private, public = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    try:
        write_new(private, private_key_pem(key), 0o600)
        write_new(public, public_key_pem(key.verify_key), 0o644)
    except FileExistsError as exc:
        raise CommandFailed(
            f"{exc.filename} already exists; keygen never overwrites a key (choose another --out)"
        ) from exc
    say(f"wrote {private}  (private: set audit.signing_key to it; readable by the daemon only)")
    say(f"wrote {public}  (public: give it to whoever runs `aisoc-plugind audit verify --key`)")
    say(f"key id: {key_id(key.verify_key)}")
    return EXIT_OK


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        metavar="FILE",
        nargs="+",
        type=Path,
        help="audit files, oldest first (rotated and .gz files too)",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="PUB",
        help="the audit public key: also check checkpoint signatures",
    )
    p.add_argument(
        "--complete",
        action="store_true",
        help="the files are the whole history: the first line must start the chain "
        "(else a removed first line cannot be told from a rotation)",
    )


def _args_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        required=True,
        help=f"directory for {PRIVATE_KEY_FILE} (0600) and {PUBLIC_KEY_FILE}",
    )


AUDIT_COMMANDS: tuple[Command, ...] = (
    Command(
        name="verify",
        help="check the hash chain (and checkpoints) of audit files",
        run=_verify,
        arguments=_args_verify,
        error_prefix=_PREFIX,
        example="""\
  aisoc-plugind audit verify /var/log/aisoc-plugind/audit.jsonl-* \\
      /var/log/aisoc-plugind/audit.jsonl --key audit-signing.pub
exit status: 0 intact ("ok N lines"), 1 the first broken line is printed as FILE:LINE""",
    ),
    Command(
        name="keygen",
        help="write a key pair for signed audit checkpoints",
        run=_keygen,
        arguments=_args_keygen,
        error_prefix=_PREFIX,
        example="""\
  aisoc-plugind audit keygen --out /etc/aisoc-plugind/audit-key""",
    ),
)
