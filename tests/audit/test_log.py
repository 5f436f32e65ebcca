"""Events: one JSON object a line on stdout and in the audit file, numbered, no secrets."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest

from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.audit.sink import AuditSink
from aisoc_plugind.config.settings import FsyncPolicy

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _log(tmp_path: Path, fmt: str = "json") -> tuple[EventLog, io.StringIO, Path]:
    out = io.StringIO()
    path = tmp_path / "audit" / "audit.jsonl"
    return EventLog(audit=AuditSink(path), log_format=fmt, stream=out), out, path


def test_event_is_same_line_on_stdout_and_in_audit(tmp_path: Path) -> None:
    """The stdout line and the audit line are identical JSON."""
    log, out, path = _log(tmp_path)
    log.emit("plugin.loaded", plugin_id="a", version="1")
    assert out.getvalue() == path.read_text()
    event = json.loads(path.read_text())
    assert list(event)[:4] == ["timestamp", "event", "level", "seq"]
    assert RFC3339.match(event["timestamp"])


def test_seq_is_monotonic(tmp_path: Path) -> None:
    """seq counts up by one per event, in file order."""
    log, _, path = _log(tmp_path)
    for i in range(5):
        log.emit("plugin.run.completed", plugin_id="a", n=i)
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "key",
    ["token", "authorization", "payload", "context", "result", "password", "secret", "config"],
)
def test_secret_keys_never_written(tmp_path: Path, key: str) -> None:
    """Keys that may carry secrets are dropped from stdout and the audit file."""
    log, out, path = _log(tmp_path)
    log.emit("api.denied", **{key: "s3cr3t-value"})
    assert "s3cr3t-value" not in path.read_text() + out.getvalue()


def test_audit_file_is_private_and_appended(tmp_path: Path) -> None:
    """The audit file is created 0600 and appended to across sinks (restarts)."""
    log, _, path = _log(tmp_path)
    log.emit("daemon.started")
    log2 = EventLog(audit=AuditSink(path), stream=io.StringIO())
    log2.emit("daemon.started")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert len(path.read_text().splitlines()) == 2


def test_rotation_by_rename_is_followed(tmp_path: Path) -> None:
    """After logrotate moves the file away, the next line goes to a new file; none lost."""
    log, _, path = _log(tmp_path)
    log.emit("a.one")
    path.rename(path.with_suffix(".1"))
    log.emit("a.two")
    assert json.loads(path.with_suffix(".1").read_text())["event"] == "a.one"
    assert json.loads(path.read_text())["event"] == "a.two"


def test_explicit_reopen(tmp_path: Path) -> None:
    """reopen() (SIGHUP) starts writing to the path again."""
    log, _, path = _log(tmp_path)
    assert log.audit is not None
    log.emit("a.one")
    os.rename(path, tmp_path / "old.jsonl")
    log.audit.reopen()
    log.emit("a.two")
    assert len(path.read_text().splitlines()) == 1


def test_audit_failure_does_not_stop_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """If the audit file cannot be written, stdout still gets events and stderr says why."""
    out = io.StringIO()
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = EventLog(audit=AuditSink(blocker / "audit.jsonl"), stream=out)
    log.emit("plugin.loaded", plugin_id="a")
    assert "plugin.loaded" in out.getvalue()
    assert "audit.write_failed" in capsys.readouterr().err
    assert log.audit is not None and log.audit.failure is not None


def test_console_format(tmp_path: Path) -> None:
    """log.format=console prints a readable line; the audit file stays JSON."""
    log, out, path = _log(tmp_path, "console")
    log.emit("plugin.loaded", plugin_id="a")
    assert "plugin.loaded" in out.getvalue() and not out.getvalue().startswith("{")
    assert json.loads(path.read_text())["plugin_id"] == "a"


def test_fsync_policy_always_writes(tmp_path: Path) -> None:
    """fsync=always still writes every line."""
    sink = AuditSink(tmp_path / "a.jsonl", FsyncPolicy.ALWAYS)
    log = EventLog(audit=sink, stream=io.StringIO())
    log.emit("x.y")
    assert (tmp_path / "a.jsonl").read_text().count("\n") == 1
