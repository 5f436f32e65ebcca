"""The event log and its writer: one line per event, in seq order, chained, bounded, no secrets.

Real files in tmp dirs; the fault tests with real full disks, EIO and kill -9 live in
`test_faults.py`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit import sink
from aisoc_plugind.audit.chain import GENESIS, line_hash
from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.audit.render import MAX_LINE_BYTES
from aisoc_plugind.config.settings import FsyncPolicy
from aisoc_plugind.errors import AuditUnavailable

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Logs:
    """Event logs made by one test, all closed at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = tmp / "audit" / "audit.jsonl"
        self.made: list[EventLog] = []

    def make(self, out: io.StringIO | None = None, **options: Any) -> EventLog:
        options.setdefault("path", self.path)
        log = EventLog(LogOptions(**options), stream=out or io.StringIO(), stderr=io.StringIO())
        self.made.append(log)
        return log


@pytest.fixture
def logs(tmp_path: Path) -> Any:
    made = Logs(tmp_path)
    yield made
    for log in made.made:
        log.close()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_event_is_the_same_line_on_stdout_and_in_the_audit_file(logs: Logs) -> None:
    """In json format the stdout line is the audit line, byte for byte."""
    out = io.StringIO()
    log = logs.make(out)
    log.emit("plugin.loaded", plugin_id="a", version="1")
    log.flush()
    assert out.getvalue() == logs.path.read_text()
    event = _lines(logs.path)[0]
    assert list(event)[:4] == ["timestamp", "event", "level", "seq"]
    assert RFC3339.match(event["timestamp"])


def test_seq_is_monotonic_and_matches_file_order(logs: Logs) -> None:
    """seq counts up by one per event, in file order."""
    log = logs.make()
    for i in range(50):
        log.emit("plugin.run.completed", plugin_id="a", n=i)
    log.flush()
    assert [e["seq"] for e in _lines(logs.path)] == list(range(1, 51))


def test_every_line_names_the_hash_of_the_previous_one(logs: Logs) -> None:
    """prev is SHA-256 of the previous line's bytes; the first line ever has 64 zeros."""
    log = logs.make()
    for i in range(5):
        log.emit("plugin.enabled", plugin_id=f"p{i}")
    log.flush()
    raw = logs.path.read_bytes().splitlines()
    assert json.loads(raw[0])["prev"] == GENESIS
    for before, line in itertools.pairwise(raw):
        assert json.loads(line)["prev"] == line_hash(before)


def test_the_chain_continues_across_a_restart(logs: Logs) -> None:
    """A new log on an existing file starts from the hash of its last line."""
    first = logs.make()
    first.emit("daemon.started")
    first.close()
    second = logs.make()
    second.emit("daemon.started")
    second.flush()
    raw = logs.path.read_bytes().splitlines()
    assert json.loads(raw[1])["prev"] == line_hash(raw[0])


@pytest.mark.parametrize(
    "key",
    ["token", "authorization", "payload", "context", "result", "password", "secret", "config"],
)
def test_secret_keys_are_never_written(logs: Logs, key: str) -> None:
    """Keys that may carry secrets are dropped from stdout and the audit file."""
    out = io.StringIO()
    log = logs.make(out)
    log.emit("api.denied", **{key: "s3cr3t-value"})
    log.flush()
    assert "s3cr3t-value" not in logs.path.read_text() + out.getvalue()


def test_audit_file_is_private_and_appended_across_restarts(logs: Logs) -> None:
    """The file is created 0600 (its directory 0750) and appended to, never truncated."""
    log = logs.make()
    log.emit("daemon.started")
    log.close()
    again = logs.make()
    again.emit("daemon.started")
    again.flush()
    assert oct(logs.path.stat().st_mode & 0o777) == "0o600"
    assert oct(logs.path.parent.stat().st_mode & 0o777) == "0o750"
    assert len(_lines(logs.path)) == 2


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """A rotation grace short enough for a test to wait it out."""
    monkeypatch.setattr(sink, "ROTATION_GRACE_S", 0.2)
    return 0.2


def test_a_rename_by_logrotate_is_followed_without_losing_a_line(
    logs: Logs, short_grace: float
) -> None:
    """While the path is missing after a rename, lines go on in the renamed file (for the
    rotation grace: the rotator creates the new file meanwhile); once the grace ended with
    no new file, the next line goes to a new file, chained to the old."""
    log = logs.make()
    log.emit("a.one")
    log.flush()
    rotated = logs.path.with_suffix(".1")
    logs.path.rename(rotated)
    log.emit("a.two")
    log.flush()
    assert not logs.path.exists()  # not created under the rotator's feet
    time.sleep(short_grace + 0.05)
    log.emit("a.three")
    log.flush()
    old, new = _lines(rotated), _lines(logs.path)
    assert [e["event"] for e in old] == ["a.one", "a.two"]
    assert [e["event"] for e in new] == ["audit.reopened", "a.three"]
    assert new[0]["reason"] == "file_missing"
    assert new[0]["prev"] == line_hash(rotated.read_bytes().rstrip(b"\n").split(b"\n")[-1])


def test_a_rotators_create_never_meets_a_file_of_ours(logs: Logs) -> None:
    """logrotate renames, then creates the new file with O_EXCL (if that fails it moves the
    file it finds aside as `<name>-<date>.backup`, where no shipper reads it). Lines written
    in between go to the renamed file; the new file is taken once it is there."""
    log = logs.make()
    log.emit("a.one")
    log.flush()
    rotated = logs.path.with_name("audit.jsonl-20261126-220221")
    logs.path.rename(rotated)
    for n in range(5):
        log.emit(f"b.{n}")
        log.reopen()  # a SIGHUP that arrives between the rename and the create
        log.flush()
    os.close(os.open(logs.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # succeeds
    log.emit("a.two")
    log.flush()
    old, new = _lines(rotated), _lines(logs.path)
    assert [e["event"] for e in old] == ["a.one", *(f"b.{n}" for n in range(5))]
    assert [(e["event"], e.get("reason")) for e in new] == [
        ("audit.reopened", "rotated"),
        ("a.two", None),
    ]
    assert new[0]["prev"] == line_hash(rotated.read_bytes().rstrip(b"\n").split(b"\n")[-1])


def test_a_deleted_file_is_replaced_at_once(logs: Logs) -> None:
    """A deleted file (no name left) would swallow every later line: no grace."""
    log = logs.make()
    log.emit("a.one")
    log.flush()
    logs.path.unlink()
    log.emit("a.two")
    log.flush()
    assert [(e["event"], e.get("reason")) for e in _lines(logs.path)] == [
        ("audit.reopened", "file_missing"),
        ("a.two", None),
    ]


def test_reopen_writes_audit_reopened_first(logs: Logs) -> None:
    """reopen() (SIGHUP) after a rotation starts the new file with audit.reopened, reason
    sighup."""
    log = logs.make()
    log.emit("a.one")
    log.flush()
    os.rename(logs.path, logs.tmp / "old.jsonl")
    os.close(os.open(logs.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    log.reopen()
    log.emit("a.two")
    log.flush()
    assert [(e["event"], e.get("reason")) for e in _lines(logs.path)] == [
        ("audit.reopened", "sighup"),
        ("a.two", None),
    ]


def test_writer_records_carry_no_seq(logs: Logs) -> None:
    """audit.reopened is the writer's own record: no seq, so file order stays seq order."""
    log = logs.make()
    log.emit("a.one")
    log.flush()
    log.reopen()
    log.emit("a.two")
    log.flush()
    assert [e.get("seq") for e in _lines(logs.path)] == [1, None, 2]


def test_a_partial_last_line_is_closed_before_the_next_line(logs: Logs) -> None:
    """A torn tail (a crash mid-write) is ended with a newline and declared by hash."""
    logs.path.parent.mkdir(parents=True)
    good = b'{"event":"x","prev":"' + GENESIS.encode() + b'"}'
    logs.path.write_bytes(good + b"\n" + b'{"event":"torn","se')
    log = logs.make()
    log.emit("daemon.started")
    log.flush()
    raw = logs.path.read_bytes().splitlines()
    assert raw[1] == b'{"event":"torn","se'
    reopened, started = json.loads(raw[2]), json.loads(raw[3])
    assert reopened["event"] == "audit.reopened" and reopened["reason"] == "partial_line"
    assert reopened["partial_line_sha256"] == line_hash(raw[1])
    assert reopened["prev"] == line_hash(good)
    assert started["event"] == "daemon.started" and started["prev"] == line_hash(raw[2])


def test_an_oversized_event_is_cut_to_8192_bytes_and_marked(logs: Logs) -> None:
    """Attacker-sized values are cut so no line exceeds 8192 bytes; truncated: true."""
    log = logs.make()
    log.emit(
        "plugin.load.failed",
        version="9" * 60_000,
        error="e" * 30_000,
        names=[f"n{i}" for i in range(5000)],
    )
    log.emit("plugin.loaded", plugin_id="after")
    log.flush()
    raw = logs.path.read_bytes().splitlines()
    assert all(len(line) <= MAX_LINE_BYTES for line in raw)
    big = json.loads(raw[0])
    assert big["truncated"] is True and big["version"].startswith("999")
    assert json.loads(raw[1])["plugin_id"] == "after"


def test_console_format_is_readable_and_the_file_stays_json(logs: Logs) -> None:
    """log.format=console prints for people; the audit file keeps JSON lines."""
    out = io.StringIO()
    log = logs.make(out, log_format="console")
    log.emit("plugin.loaded", plugin_id="a")
    log.flush()
    assert "plugin.loaded" in out.getvalue() and not out.getvalue().startswith("{")
    assert _lines(logs.path)[0]["plugin_id"] == "a"


def test_log_level_filters_stdout_but_never_the_audit_file(logs: Logs) -> None:
    """Below log.level an event is not printed, yet it is in the audit file."""
    out = io.StringIO()
    log = logs.make(out, log_level="warning")
    log.emit("plugin.loaded", plugin_id="quiet")
    log.emit("plugin.load.failed", level="error", plugin_id="loud")
    log.flush()
    assert "quiet" not in out.getvalue() and "loud" in out.getvalue()
    assert [e["plugin_id"] for e in _lines(logs.path)] == ["quiet", "loud"]


def test_stdout_only_records_are_not_in_the_audit_file(logs: Logs) -> None:
    """emit_log (library log records) prints without seq and never enters the chain."""
    out = io.StringIO()
    log = logs.make(out)
    log.emit_log("log.record", level="warning", logger="aiohttp.server", message="m")
    log.emit("a.b")
    log.flush()
    assert "aiohttp.server" in out.getvalue()
    assert [e["event"] for e in _lines(logs.path)] == ["a.b"]


@pytest.mark.parametrize("policy", list(FsyncPolicy))
async def test_commit_returns_once_the_line_is_written(logs: Logs, policy: FsyncPolicy) -> None:
    """commit(seq) returns after the line is in the file, whatever the fsync policy."""
    log = logs.make(fsync=policy)
    seq = log.emit("plugin.enabled", plugin_id="a")
    await log.commit(seq)
    assert _lines(logs.path)[-1]["seq"] == seq


async def test_commit_raises_while_the_file_cannot_be_written(logs: Logs) -> None:
    """A path that cannot be a file makes commit raise AuditUnavailable; stdout still works."""
    blocker = logs.tmp / "file"
    blocker.write_text("")
    out = io.StringIO()
    log = logs.make(out, path=blocker / "audit.jsonl")
    seq = log.emit("plugin.enabled", plugin_id="a")
    with pytest.raises(AuditUnavailable):
        await log.commit(seq)
    log.flush()
    assert "plugin.enabled" in out.getvalue()
    assert log.failure is not None


async def test_kept_events_follow_a_gap_record_when_the_file_works_again(logs: Logs) -> None:
    """Events emitted while failing are written after audit.reopened and audit.gap."""
    logs.path.parent.mkdir(parents=True)
    logs.path.mkdir()  # the audit path is a directory: no file can be opened there
    log = logs.make()
    first = log.emit("plugin.disabled", plugin_id="a")
    with pytest.raises(AuditUnavailable):
        await log.commit(first)
    second = log.emit("plugin.enabled", plugin_id="a")
    logs.path.rmdir()
    log.reopen()  # SIGHUP once the path is fixed: the writer retries at once
    log.flush()
    third = log.emit("plugin.loaded", plugin_id="b")
    await log.commit(third)
    events = _lines(logs.path)
    assert [e["event"] for e in events] == [
        "audit.reopened",
        "audit.gap",
        "plugin.disabled",
        "plugin.enabled",
        "plugin.loaded",
    ]
    assert (events[1]["count"], events[1]["first_seq"], events[1]["last_seq"]) == (2, first, second)


def test_a_failure_is_reported_once_on_stderr(tmp_path: Path) -> None:
    """One stderr line when the file becomes unwritable, not one per event."""
    err = io.StringIO()
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = EventLog(LogOptions(path=blocker / "audit.jsonl"), stream=io.StringIO(), stderr=err)
    try:
        for _ in range(20):
            log.emit("x.y")
        log.flush()
        reports = [json.loads(line) for line in err.getvalue().splitlines()]
        assert [r["event"] for r in reports] == ["audit.write_failed"]
        assert reports[0]["error_code"] == "audit_unavailable"
    finally:
        log.close()
