"""`aisoc-plugind` one-shot commands and library logging, run in this process.

The daemon's own commands are otherwise driven as processes (tests/service); these call the
same entry points in-process so their branches are measured: `check-config` on a good and a
bad file, `--version`, an unknown command, and library log records turned into events.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from aisoc_plugind.audit import stdlog
from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.cli.main import run_plugind


def _config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'environment = "development"\n[plugins]\ndir = "{tmp_path}/plugins"\n'
        f'[trust]\nkeys_dir = "{tmp_path}/keys"\n[audit]\npath = "{tmp_path}/audit.jsonl"\n'
        f'[isolation]\nstate_dir = "{tmp_path}/state"\n{extra}'
    )
    return config


def test_check_config_prints_the_resolved_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_plugind(["check-config", "--config", str(_config(tmp_path))]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert isinstance(shown, dict)
    assert f"{tmp_path}/plugins" in json.dumps(shown)


def test_check_config_refuses_a_bad_value_with_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, '[api]\nlisten = "not-an-address"\n')
    assert run_plugind(["check-config", "--config", str(config)]) != 0
    assert "listen" in capsys.readouterr().err


def test_check_config_warns_about_process_isolation_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path).read_text().replace('"development"', '"production"')
    path = tmp_path / "prod.toml"
    path.write_text(config + 'mode = "none"\n')
    run_plugind(["check-config", "--config", str(path)])
    assert "isolation_none_outside_development" in capsys.readouterr().err


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plugind(["no-such-command"]) == 2
    assert "no-such-command" in capsys.readouterr().err


def test_library_log_records_become_events(tmp_path: Path) -> None:
    """A library's record (with an exception) is a `log.record` event on stdout, never text;
    the exception's message is not copied, its type and place are."""
    out = tmp_path / "stdout.jsonl"
    with out.open("w") as stream:
        events = EventLog(LogOptions(path=tmp_path / "audit.jsonl"), stream=stream)
        events.start()
        uninstall = stdlog.install(events, "info")
        try:
            logger = logging.getLogger("aiohttp.server")
            logger.debug("below the level: dropped")
            try:
                raise ValueError("secret-in-message")
            except ValueError:
                logger.exception("Error handling request")
            logger.warning("plain %s", "warning")
        finally:
            uninstall()
            events.close()
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    records = [e for e in lines if e.get("event") == "log.record"]
    assert [r["message"] for r in records] == ["Error handling request", "plain warning"]
    assert records[0]["exc_type"] == "ValueError" and "where" in records[0]
    assert records[0]["level"] == "error" and records[1]["level"] == "warning"
    assert "secret-in-message" not in out.read_text()
    assert logging.getLogger().handlers == [] or not any(
        isinstance(h, stdlog.EventLogHandler) for h in logging.getLogger().handlers
    )
