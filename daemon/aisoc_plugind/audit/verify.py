"""Check audit files: the hash chain across rotations, signed checkpoints, the run of `seq`.

`verify_files` reads the files oldest first (gzip-compressed rotations too) and reports the
first line that breaks the chain: a line edited, removed, inserted or reordered, a file of
the rotation missing or out of order, a checkpoint whose signature does not verify, or a
`seq` that jumps without an `audit.gap` saying why. A partial line is accepted only where the
writer declared it (the `audit.reopened` after it names its hash), or as the very last bytes
of the last file (a write in progress). Only the daemon's own key signs checkpoints; anyone
with write access can rebuild a chain without one, so ship checkpoints off the host.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing

from aisoc_plugind.audit import names
from aisoc_plugind.audit.chain import GENESIS, is_hash, key_id, line_hash, verify_checkpoint

__all__ = ["Break", "VerifyReport", "verify_files"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Break:
    """Where and why the chain breaks (line numbers count from 1 in each file)."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(slots=True, kw_only=True)
class VerifyReport:
    """What verification found: lines checked, checkpoints, notes, and the first break."""

    lines: int = 0
    checkpoints: int = 0
    unsealed: int = 0  # lines after the last checkpoint
    notes: list[str] = field(default_factory=list)
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        """Return True when no line breaks the chain."""
        return self.broken is None


@dataclass(slots=True)
class _Cursor:
    """The walk's state between lines and files."""

    complete: bool = False  # the files must hold the chain from its very first line
    prev: str | None = None  # hash of the last complete line seen; None before the first
    fragment: tuple[Path, int, bytes] | None = None
    seq: int | None = None
    dropped: tuple[int, int] | None = None  # a seq range an audit.gap said was dropped


class _Broken(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def verify_files(
    paths: Sequence[Path], key: nacl.signing.VerifyKey | None = None, *, complete: bool = False
) -> VerifyReport:
    """Verify audit files given oldest first; `key` checks checkpoint signatures.

    With `complete`, the first line must start the chain (prev of 64 zeros): use it when the
    files are the whole history, so a removed first line or first file is reported too.
    """
    report, cursor = VerifyReport(), _Cursor(complete=complete)
    for index, path in enumerate(paths):
        try:
            _verify_file(path, _read(path), report, cursor, key, last=index == len(paths) - 1)
        except _Broken as exc:
            report.broken = Break(path=path, line=exc.line, reason=exc.reason)
            return report
        except OSError as exc:
            report.broken = Break(path=path, line=0, reason=f"cannot read: {exc.strerror or exc}")
            return report
    if cursor.fragment is not None:
        path, line, _ = cursor.fragment
        report.broken = Break(
            path=path,
            line=line,
            reason="not a JSON line, and no audit.reopened after it declares it (a partial write)",
        )
    if key is None and report.checkpoints:
        report.notes.append(
            f"{report.checkpoints} checkpoint(s) not signature-checked "
            "(give the audit public key with --key)"
        )
    return report


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _verify_file(
    path: Path,
    data: bytes,
    report: VerifyReport,
    cursor: _Cursor,
    key: nacl.signing.VerifyKey | None,
    *,
    last: bool,
) -> None:
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        where = "the end of the last file (a write in progress?)" if last else "the end"
        report.notes.append(f"{path}: a partial line of {len(tail)} bytes at {where}; not checked")
    for number, line in enumerate(lines, start=1):
        _check_line(path, number, line, report, cursor, key)


def _check_line(
    path: Path,
    number: int,
    line: bytes,
    report: VerifyReport,
    cursor: _Cursor,
    key: nacl.signing.VerifyKey | None,
) -> None:
    doc = _parse(line)
    if doc is None:
        if cursor.fragment is not None:
            raise _Broken(cursor.fragment[1], "not a JSON line of the audit chain")
        cursor.fragment = (path, number, line)
        return
    _check_fragment(cursor, doc)
    _check_prev(number, doc, report, cursor)
    _check_checkpoint(number, doc, report, key)
    _check_seq(number, doc, cursor)
    cursor.prev = line_hash(line)
    report.lines += 1
    report.unsealed = 0 if doc.get("event") == names.AUDIT_CHECKPOINT else report.unsealed + 1


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and is_hash(doc.get("prev")) else None


def _check_fragment(cursor: _Cursor, doc: dict[str, Any]) -> None:
    """A partial line must be declared, by hash, by the audit.reopened right after it."""
    if cursor.fragment is None:
        return
    _, number, fragment = cursor.fragment
    declared = doc.get("event") == names.AUDIT_REOPENED and doc.get(
        "partial_line_sha256"
    ) == line_hash(fragment)
    if not declared:
        raise _Broken(number, "not a JSON line of the audit chain")
    cursor.fragment = None


def _check_prev(number: int, doc: dict[str, Any], report: VerifyReport, cursor: _Cursor) -> None:
    if cursor.prev is None:  # the first line of the first file
        if doc["prev"] != GENESIS and cursor.complete:
            raise _Broken(
                number, "the chain does not start here (its first line or file was removed)"
            )
        if doc["prev"] != GENESIS:
            report.notes.append(
                "the first line continues an earlier file (its prev is "
                f"{doc['prev'][:16]}…); give every rotated file to check it"
            )
        return
    if doc["prev"] != cursor.prev:
        what = "the previous file's last line" if number == 1 else "the previous line"
        cause = (
            "a file of the rotation is missing, or the files are out of order"
            if number == 1
            else "a line was removed, inserted, edited or reordered"
        )
        raise _Broken(number, f"prev does not match {what}: {cause}")


def _check_checkpoint(
    number: int, doc: dict[str, Any], report: VerifyReport, key: nacl.signing.VerifyKey | None
) -> None:
    if doc.get("event") != names.AUDIT_CHECKPOINT:
        return
    chain_hash, signature = doc.get("chain_hash"), doc.get("signature")
    if chain_hash != doc["prev"] or not isinstance(signature, str):
        raise _Broken(number, "a checkpoint that does not seal the line before it")
    if key is not None:
        if doc.get("key_id") != key_id(key):
            raise _Broken(number, f"a checkpoint signed by another key ({doc.get('key_id')})")
        if not verify_checkpoint(key, chain_hash, signature):
            raise _Broken(number, "a checkpoint whose signature does not verify")
    report.checkpoints += 1


def _check_seq(number: int, doc: dict[str, Any], cursor: _Cursor) -> None:
    """Within a run `seq` counts up by one; a restart begins at 1; a gap may drop a range."""
    if doc.get("event") == names.AUDIT_GAP and isinstance(doc.get("dropped"), int):
        cursor.dropped = (int(doc["dropped_first_seq"]), int(doc["dropped_last_seq"]))
    seq = doc.get("seq")
    if not isinstance(seq, int):
        return
    expected = None if cursor.seq is None else cursor.seq + 1
    restart = doc.get("event") == names.DAEMON_STARTED and seq == 1
    skipped = (
        cursor.dropped is not None
        and expected == cursor.dropped[0]
        and seq == cursor.dropped[1] + 1
    )
    if expected is not None and seq != expected and not restart and not skipped:
        raise _Broken(number, f"seq {seq} follows {cursor.seq}: an event is missing or repeated")
    cursor.seq, cursor.dropped = seq, None if skipped else cursor.dropped
