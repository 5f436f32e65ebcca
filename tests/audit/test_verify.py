"""`audit verify` finds the first broken line of a tampered chain, across rotated files.

The chain is written by the real writer (signed checkpoints every 5 lines, one logrotate-style
rotation); each case tampers with a copy the way an attacker or an accident would, and the
report must name the exact file and line where the chain first breaks.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import pytest

from aisoc_plugind.audit.chain import line_hash
from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.audit.verify import verify_files
from aisoc_plugind.cli.main import run_plugind
from aisoc_plugind.core.signing import private_key_pem, public_key_pem

KEY = nacl.signing.SigningKey(b"\x07" * 32)
OTHER = nacl.signing.SigningKey(b"\x09" * 32)


@dataclass
class Chain:
    """A rotated file and the current file of one real chain."""

    old: Path
    new: Path

    @property
    def files(self) -> list[Path]:
        return [self.old, self.new]

    def lines(self, path: Path) -> list[bytes]:
        return path.read_bytes().splitlines(keepends=True)

    def rewrite(self, path: Path, lines: list[bytes]) -> None:
        path.write_bytes(b"".join(lines))


def _write_chain(directory: Path) -> Chain:
    path = directory / "audit.jsonl"
    log = EventLog(
        LogOptions(path=path, signing_key=KEY, checkpoint_lines=5, state_dir=directory / "state")
    )
    try:
        log.emit("daemon.started", pid=1)
        for i in range(8):
            log.emit("plugin.enabled", plugin_id=f"p{i}")
        log.flush()
        rotated = directory / "audit.jsonl.1"
        path.rename(rotated)  # as logrotate does: rename, then create the new file
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        for i in range(8):
            log.emit("plugin.disabled", plugin_id=f"p{i}")
    finally:
        log.close()
    return Chain(old=rotated, new=path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return _write_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def chain(pristine: Chain, tmp_path: Path) -> Chain:
    old, new = tmp_path / pristine.old.name, tmp_path / pristine.new.name
    shutil.copy(pristine.old, old)
    shutil.copy(pristine.new, new)
    return Chain(old=old, new=new)


def test_an_untouched_chain_verifies_with_its_checkpoints(chain: Chain) -> None:
    """The writer's own output verifies: every line, both files, signed checkpoints."""
    report = verify_files(chain.files, KEY.verify_key)
    assert report.ok, report.broken
    assert report.checkpoints >= 2  # after the batch crossing 5 lines, and the last
    assert report.lines == len(chain.lines(chain.old)) + len(chain.lines(chain.new))


def _edit(lines: list[bytes], index: int) -> None:
    doc = json.loads(lines[index])
    doc["plugin_id"] = "evil"
    lines[index] = json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _insert(lines: list[bytes], index: int) -> None:
    forged = json.loads(lines[index])
    forged["event"] = "plugin.enabled"
    lines.insert(index + 1, json.dumps(forged, separators=(",", ":")).encode() + b"\n")


Tamper = Callable[[list[bytes]], None]
# name: (what to do to the old file's lines, the first line number that must be reported)
CASES: dict[str, tuple[Tamper, int]] = {
    "a value edited": (lambda ls: _edit(ls, 3), 5),
    "a line removed": (lambda ls: ls.pop(3), 4),
    "a line inserted (a copy with a new name)": (lambda ls: _insert(ls, 3), 5),
    "two lines swapped": (lambda ls: ls.__setitem__(slice(3, 5), [ls[4], ls[3]]), 4),
    "garbage appended mid-file": (lambda ls: ls.insert(4, b"not json at all\n"), 5),
    "a blank line inserted": (lambda ls: ls.insert(2, b"\n"), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampering_is_reported_at_the_first_bad_line(chain: Chain, case: str) -> None:
    """Edited, removed, inserted, reordered or added lines break the chain exactly there."""
    tamper, expected = CASES[case]
    lines = chain.lines(chain.old)
    tamper(lines)
    chain.rewrite(chain.old, lines)
    report = verify_files(chain.files)
    assert report.broken is not None
    assert (report.broken.path, report.broken.line) == (chain.old, expected)


def test_a_removed_first_line_is_caught_when_the_files_are_the_whole_history(
    chain: Chain,
) -> None:
    """Without `complete` it is a note (a rotated set may start mid-chain); with it, a break."""
    lines = chain.lines(chain.old)
    chain.rewrite(chain.old, lines[1:])
    assert verify_files(chain.files).ok
    report = verify_files(chain.files, complete=True)
    assert report.broken is not None and (report.broken.path, report.broken.line) == (chain.old, 1)


def test_the_last_line_of_the_old_file_removed_breaks_the_new_file(chain: Chain) -> None:
    """Removing the old file's last line breaks the chain at the new file's first line."""
    lines = chain.lines(chain.old)
    chain.rewrite(chain.old, lines[:-1])
    report = verify_files(chain.files)
    assert report.broken is not None and (report.broken.path, report.broken.line) == (chain.new, 1)
    assert "rotation" in report.broken.reason


def test_a_missing_rotated_file_is_reported(chain: Chain, tmp_path: Path) -> None:
    """A rotation file left out of the set (or deleted) breaks where the next file starts."""
    older = tmp_path / "older.jsonl"
    chain.old.rename(older)
    chain.old.write_bytes(chain.lines(older)[0])  # a stub holding only its first line
    report = verify_files([chain.old, chain.new])
    assert report.broken is not None and report.broken.path == chain.new


def test_files_out_of_order_are_reported(chain: Chain) -> None:
    """Giving the rotated file after the current one breaks at the rotated file's line 1."""
    report = verify_files([chain.new, chain.old])
    assert report.broken is not None and (report.broken.path, report.broken.line) == (chain.old, 1)


def test_a_checkpoint_with_a_forged_signature_is_reported(chain: Chain) -> None:
    """A checkpoint whose signature is not the key's is caught with --key."""
    lines = chain.lines(chain.old)
    index = next(i for i, line in enumerate(lines) if b'"audit.checkpoint"' in line)
    doc = json.loads(lines[index])
    doc["signature"] = OTHER.sign(b"x" * 32).signature.hex()
    lines[index] = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    chain.rewrite(chain.old, lines)
    report = verify_files(chain.files, KEY.verify_key)
    assert report.broken is not None and report.broken.line == index + 1
    assert "checkpoint" in report.broken.reason


def test_a_rebuilt_chain_passes_without_the_key_but_not_with_it(chain: Chain) -> None:
    """An attacker who recomputes every prev cannot re-sign the checkpoints."""
    lines = chain.lines(chain.old)
    _edit(lines, 3)
    rebuilt, prev = [], json.loads(lines[0])["prev"]
    for line in lines:
        doc = json.loads(line)
        doc["prev"] = prev
        if doc["event"] == "audit.checkpoint":
            doc["chain_hash"] = prev
        data = json.dumps(doc, separators=(",", ":")).encode()
        rebuilt.append(data + b"\n")
        prev = line_hash(data)
    chain.rewrite(chain.old, rebuilt)
    assert verify_files([chain.old]).ok
    keyed = verify_files([chain.old], KEY.verify_key)
    assert keyed.broken is not None and "signature" in keyed.broken.reason


def test_a_checkpoint_of_another_key_is_reported(chain: Chain) -> None:
    """--key with a different public key rejects the first checkpoint."""
    report = verify_files(chain.files, OTHER.verify_key)
    assert report.broken is not None and "another key" in report.broken.reason


def test_a_seq_gap_without_an_audit_gap_is_reported(tmp_path: Path) -> None:
    """Events missing from a rebuilt chain show as a jump in seq."""
    path = tmp_path / "audit.jsonl"
    log = EventLog(LogOptions(path=path))
    try:
        for i in range(4):
            log.emit("plugin.enabled", plugin_id=f"p{i}")
        log.flush()
    finally:
        log.close()
    docs = [json.loads(line) for line in path.read_bytes().splitlines()]
    del docs[1]
    out, prev = [], docs[0]["prev"]
    for doc in docs:
        doc["prev"] = prev
        data = json.dumps(doc, separators=(",", ":")).encode()
        out.append(data + b"\n")
        prev = line_hash(data)
    path.write_bytes(b"".join(out))
    report = verify_files([path])
    assert report.broken is not None and report.broken.line == 2
    assert "seq" in report.broken.reason


def test_gzipped_rotations_are_read(chain: Chain) -> None:
    """A logrotate-compressed rotated file verifies like a plain one."""
    gz = chain.old.with_suffix(".1.gz")
    gz.write_bytes(gzip.compress(chain.old.read_bytes()))
    assert verify_files([gz, chain.new]).ok


def test_a_partial_last_line_is_a_note_not_a_break(chain: Chain) -> None:
    """A write in progress at the end of the last file is not tampering."""
    with chain.new.open("ab") as fh:
        fh.write(b'{"timestamp":"2026')
    report = verify_files(chain.files)
    assert report.ok
    assert any("partial line" in note for note in report.notes)


def test_a_declared_torn_line_verifies(tmp_path: Path) -> None:
    """A crash mid-write leaves a fragment; the next start declares it and verify accepts it."""
    path = tmp_path / "audit.jsonl"
    first = EventLog(LogOptions(path=path))
    first.emit("daemon.started")
    first.close()
    with path.open("ab") as fh:
        fh.write(b'{"timestamp":"2026-11-26T00:00:00.0Z","event":"plugin.ena')
    second = EventLog(LogOptions(path=path))
    second.emit("daemon.started")
    second.close()
    report = verify_files([path])
    assert report.ok, report.broken


def test_cli_verify_exit_codes_and_output(
    chain: Chain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aisoc-plugind audit verify` prints ok N lines (0) or FILE:LINE: reason (1)."""
    pub = tmp_path / "audit.pub"
    pub.write_bytes(public_key_pem(KEY.verify_key))
    files = [str(p) for p in chain.files]
    assert run_plugind(["audit", "verify", *files, "--key", str(pub)]) == 0
    assert capsys.readouterr().out.startswith("ok ")
    lines = chain.lines(chain.old)
    lines.pop(2)
    chain.rewrite(chain.old, lines)
    assert run_plugind(["audit", "verify", *files]) == 1
    assert capsys.readouterr().out.startswith(f"{chain.old}:3: ")


def test_cli_keygen_writes_a_pair_that_signs_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes a 0600 private key the daemon accepts and never overwrites it."""
    assert run_plugind(["audit", "keygen", "--out", str(tmp_path / "k")]) == 0
    private = tmp_path / "k" / "audit-signing.key"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert b"PRIVATE KEY" in private.read_bytes()
    assert run_plugind(["audit", "keygen", "--out", str(tmp_path / "k")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert private_key_pem(KEY)  # the PEM shapes round-trip in core.signing
