"""docs/events.schema.json is the schema the code builds, and it means what it says."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jsonschema
import pytest

from aisoc_plugind.audit import names as ev
from aisoc_plugind.audit.eventschema import event_schema
from aisoc_plugind.audit.log import EventLog, LogOptions
from tests.eventcheck import SCHEMA_FILE, check_event_files, native_events


def test_the_shipped_file_is_current() -> None:
    """Regenerate with `python -m aisoc_plugind.audit.eventschema > docs/events.schema.json`."""
    assert json.loads(SCHEMA_FILE.read_text()) == event_schema()
    jsonschema.Draft202012Validator.check_schema(event_schema())


def test_every_event_name_is_listed() -> None:
    assert set(event_schema()["properties"]["event"]["enum"]) == set(ev.ALL)


@pytest.mark.parametrize(
    ("doc", "ok"),
    [
        (
            {
                "timestamp": "2026-01-01T00:00:00.000001Z",
                "event": "daemon.ready",
                "level": "info",
                "seq": 3,
            },
            True,
        ),
        (
            {"timestamp": "2026-01-01T00:00:00Z", "event": "no.such", "level": "info", "seq": 1},
            False,
        ),
        ({"timestamp": "yesterday", "event": "daemon.ready", "level": "info", "seq": 1}, False),
        ({"timestamp": "2026-01-01T00:00:00Z", "event": "daemon.ready", "level": "info"}, False),
        ({"timestamp": "2026-01-01T00:00:00Z", "event": "log.record", "level": "warning"}, True),
        (
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "event": "plugin.loaded",
                "level": "info",
                "seq": 1,
            },
            False,
        ),
        (
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "event": "api.denied",
                "level": "warning",
                "seq": 1,
                "reason": "Bad Reason",
                "status": 401,
            },
            False,
        ),
        (
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "event": "api.denied",
                "level": "warning",
                "seq": 1,
                "reason": "token_invalid",
                "status": 401,
            },
            True,
        ),
        (
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "event": "plugin.enabled",
                "level": "info",
                "seq": 1,
                "plugin_id": "x",
                "to_state": "running",
            },
            False,
        ),
        (
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "event": "plugin.enabled",
                "level": "info",
                "seq": 1,
                "plugin_id": "x",
                "extra": [1],
            },
            True,
        ),
    ],
)
def test_the_schema_accepts_and_refuses(doc: dict[str, object], ok: bool) -> None:
    errors = list(jsonschema.Draft202012Validator(event_schema()).iter_errors(doc))
    assert (not errors) is ok, errors


def test_the_checker_reads_audit_files_and_prefixed_stdout() -> None:
    # Outside pytest's temporary directory: these bad events must not fail the session check.
    with tempfile.TemporaryDirectory() as tmp:
        _check_bad_events(Path(tmp))


def _check_bad_events(tmp_path: Path) -> None:
    with (tmp_path / "stdout").open("w") as stream:
        log = EventLog(LogOptions(path=tmp_path / "audit.jsonl"), stream=stream)
        log.emit(ev.DAEMON_READY, plugins=0)
        log.emit(ev.PLUGIN_ENABLED, plugin_id="x", to_state="bogus")
        log.close()
    (tmp_path / "journal").write_bytes(
        b'<6>{"timestamp": "2026-01-01T00:00:00Z", "event": "daemon.ready", "level": "info"}\n'
        b"not json\n"
    )
    assert [n for n, _ in native_events(tmp_path / "journal")] == [1]
    checked, problems = check_event_files(tmp_path, event_schema())
    assert checked >= 5
    assert any("plugin.enabled: to_state" in p for p in problems)
    assert any("journal:1: daemon.ready" in p and "seq" in p for p in problems)
