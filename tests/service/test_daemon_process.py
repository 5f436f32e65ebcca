"""The daemon as a process: startup, signals, audit framing, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, PluginFactory


def _config(env: Env, **extra: str) -> Path:
    lines = [
        'environment = "development"',
        f'[plugins]\ndir = "{env.plugins}"\nwatch = false',
        f'[trust]\nkeys_dir = "{env.keys}"',
        f'[audit]\npath = "{env.audit}"',
        f'[isolation]\nstate_dir = "{env.tmp}/state"',
        f'[api]\nlisten = "unix:{env.tmp}/api.sock"\ntokens_file = "{env.tmp}/tokens.toml"',
    ]
    path = env.tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(path: Path, name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _events(path) if e["event"] == name]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    seen = [e["event"] for e in _events(path)]
    raise AssertionError(f"{name} x{count} not seen in {path}: {seen}")


@pytest.fixture
def daemon(env: Env, plugins: PluginFactory) -> Iterator[subprocess.Popen[str]]:
    plugins.write("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(_config(env))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    try:
        _wait_for(env.audit, "daemon.ready")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_sigterm_stops_cleanly_with_framing_events(env: Env, daemon: subprocess.Popen[str]) -> None:
    """SIGTERM: exit 0; the audit file runs daemon.started ... daemon.ready ... daemon.stopped."""
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    names = [e["event"] for e in _events(env.audit)]
    assert names[0] == "daemon.started" and names[-1] == "daemon.stopped"
    assert names.index("daemon.ready") < names.index("daemon.stopping")
    seqs = [e["seq"] for e in _events(env.audit) if "seq" in e]
    assert seqs == list(range(1, len(seqs) + 1))


def test_stdout_carries_the_same_events(env: Env, daemon: subprocess.Popen[str]) -> None:
    """Each audit line also appears on stdout (journald), one JSON object a line."""
    daemon.send_signal(signal.SIGTERM)
    out, _ = daemon.communicate(timeout=15)
    stdout_events = [json.loads(line) for line in out.splitlines()]
    assert stdout_events == _events(env.audit)


def test_sighup_reopens_rotated_audit_file(env: Env, daemon: subprocess.Popen[str]) -> None:
    """After rename + SIGHUP the old file is complete and the new file continues the seq."""
    rotated = env.audit.with_name("audit.jsonl.1")
    env.audit.rename(rotated)  # as logrotate does: rename, create, then SIGHUP
    os.close(os.open(env.audit, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    daemon.send_signal(signal.SIGHUP)
    _wait_for(env.audit, "audit.reopened")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    old, new = _events(rotated), _events(env.audit)
    seqs = [e["seq"] for e in old + new if "seq" in e]  # writer records carry none
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing split
    assert new[0]["event"] == "audit.reopened" and new[0]["reason"] == "sighup"
    assert new[-1]["event"] == "daemon.stopped"


def test_sighup_after_key_removal_disables_plugin(env: Env, daemon: subprocess.Popen[str]) -> None:
    """Removing the trusted key + SIGHUP disables the plugin it verified, with events."""
    (env.keys / "vector-signer.pem").unlink()
    daemon.send_signal(signal.SIGHUP)
    disabled = _wait_for(env.audit, "plugin.disabled")
    assert disabled[0]["plugin_id"] == "test.a"
    invalid = _wait_for(env.audit, "plugin.signature.invalid")
    assert invalid[0]["error_code"] == "signing_key_removed"
    changed = _wait_for(env.audit, "trust.keys.changed")
    assert changed[0]["removed"] == ["vector-signer"]
    assert daemon.poll() is None


def test_unknown_trust_mode_exits_1_with_message(env: Env) -> None:
    """An unknown PLUGIN_TRUST_MODE refuses to start: exit 1 and a clear message."""
    proc = subprocess.run(
        [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(_config(env))],
        env={**os.environ, "PLUGIN_TRUST_MODE": "permissive"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "PLUGIN_TRUST_MODE" in proc.stderr and "permissive" in proc.stderr
    assert not env.audit.exists()


def test_check_config_prints_effective_settings(env: Env) -> None:
    """check-config prints the settings as JSON and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "aisoc_plugind", "check-config", "--config", str(_config(env))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["plugins_dir"] == str(env.plugins)


def test_usage_error_exits_2() -> None:
    """Unknown options are usage errors (exit 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "aisoc_plugind", "run", "--bogus"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2


def test_preflight_warnings_are_events(env: Env, plugins: PluginFactory) -> None:
    """A group-writable plugins dir and trust mode `warn` in production are config.warning."""
    env.plugins.chmod(0o775)
    config = _config(env)
    config.write_text(
        config.read_text().replace('environment = "development"', 'environment = "production"')
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
        env={**os.environ, "PLUGIN_TRUST_MODE": "warn"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(env.audit, "daemon.ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    codes = {e["error_code"] for e in _events(env.audit) if e["event"] == "config.warning"}
    assert {"plugins_dir_writable", "trust_mode_warn_outside_development"} <= codes
