"""Startup and instances, on the real daemon process.

A start that fails ends in a coded error stop: `daemon.stopped` with `reason: start_failed`,
its `error_code` and level error (the last line of the audit file and of stdout), one line
`aisoc-plugind: error: CODE: MESSAGE` on stderr, and exit status 1. A second daemon on the
same configuration stops with `already_running` before it touches anything: the tokens file
and the audit file keep their bytes and their mtime.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.api_fixtures import write_tokens
from tests.conftest import Env
from tests.hardening.live import wait_exit, wait_ready
from tests.live import LiveDaemon, free_port, live_daemon, run_daemon, wait_until

EXIT_S = 20.0


def _config(root: Path, env: Env, listen: str, audit: Path) -> Path:
    config = root / "config.toml"
    config.write_text(
        'environment = "development"\n'
        f'[plugins]\ndir = "{env.plugins}"\nwatch = false\n'
        f'[trust]\nkeys_dir = "{env.keys}"\nrevoked_file = "{root}/revoked.toml"\n'
        f'[api]\nlisten = "{listen}"\ntokens_file = "{root}/tokens.toml"\n'
        f'[audit]\npath = "{audit}"\n'
        f'[isolation]\nstate_dir = "{root}/state"\n'
        "[daemon]\nshutdown_grace_s = 5\n"
    )
    return config


@contextmanager
def _daemon(root: Path, config: Path, audit: Path, port: int = 0) -> Iterator[LiveDaemon]:
    """Start `aisoc-plugind run --config config` (stdout, stderr in files under `root`);
    stop it by its PID on the way out."""
    with run_daemon(root, config, port=port, token="", audit=audit, wait_ready=False) as daemon:
        yield daemon


def _one_error_line(daemon: LiveDaemon) -> str:
    """Return the one line of text on stderr (besides the audit writer's JSON report of an
    audit file it cannot write, INTERFACE §9)."""
    lines = [
        line
        for line in daemon.stderr_text().splitlines()
        if line.strip() and '"event":"audit.write_failed"' not in line
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aisoc-plugind: error: ")
    return lines[0]


def _error_stop(events: list[dict[str, Any]], code: str) -> None:
    """The events (audit file or stdout) end in the coded error stop of a failed start."""
    names = [e["event"] for e in events]
    assert names[0] == "daemon.started"
    assert "daemon.ready" not in names
    last = events[-1]
    assert last["event"] == "daemon.stopped"
    assert (last["reason"], last["error_code"], last["level"]) == ("start_failed", code, "error")
    assert last["error"]


def _snapshot(*paths: Path) -> dict[Path, tuple[bytes, int, int]]:
    found = {}
    for path in paths:
        st = path.stat()
        found[path] = (path.read_bytes(), st.st_mtime_ns, st.st_mode)
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    made = tmp_path / "d"
    made.mkdir()
    write_tokens(made / "tokens.toml", {"ops": ("plugins:read",)})
    return made


def test_a_taken_port_is_a_coded_error_stop(root: Path, env: Env) -> None:
    """The API's port is taken: daemon.stopped start_failed / listen_failed (audit and
    stdout), one stderr line with the code, exit 1."""
    audit = root / "log" / "audit.jsonl"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _config(root, env, f"127.0.0.1:{port}", audit)
        with _daemon(root, config, audit, port) as daemon:
            assert wait_exit(daemon, EXIT_S) == 1
    line = _one_error_line(daemon)
    assert f"listen_failed: cannot listen on 127.0.0.1:{port}" in line
    _error_stop(daemon.audit_events(), "listen_failed")
    _error_stop(daemon.events(), "listen_failed")


def test_a_unix_socket_path_that_is_no_socket_is_a_coded_error_stop(root: Path, env: Env) -> None:
    """`api.listen = unix:PATH` where PATH is a regular file: refused (never replaced)."""
    audit = root / "log" / "audit.jsonl"
    path = root / "api.sock"
    path.write_text("not a socket")
    with _daemon(root, _config(root, env, f"unix:{path}", audit), audit) as daemon:
        assert wait_exit(daemon, EXIT_S) == 1
    assert "listen_failed" in _one_error_line(daemon)
    _error_stop(daemon.audit_events(), "listen_failed")
    assert path.read_text() == "not a socket"


def test_a_refused_tokens_file_is_a_coded_error_stop(root: Path, env: Env) -> None:
    """A tokens file anyone may write is refused at start: the stop carries its code."""
    audit = root / "log" / "audit.jsonl"
    (root / "tokens.toml").chmod(0o666)
    config = _config(root, env, f"127.0.0.1:{free_port()}", audit)
    with _daemon(root, config, audit) as daemon:
        assert wait_exit(daemon, EXIT_S) == 1
    line = _one_error_line(daemon)
    code = line.removeprefix("aisoc-plugind: error: ").split(":", 1)[0]
    assert code.startswith("tokens_file_")
    _error_stop(daemon.audit_events(), code)


def test_a_second_daemon_on_the_same_config_touches_nothing(tmp_path: Path, env: Env) -> None:
    """A second `run` on a running daemon's config: exit 1 with already_running (naming the
    first one's PID) before anything is read or written; the tokens file and the audit file
    are unchanged to the byte and the nanosecond; the first daemon serves on."""
    with live_daemon(tmp_path / "a", plugins=env.plugins, keys=env.keys) as first:
        tokens, audit = first.root / "tokens.toml", first.audit
        wait_until(lambda: (audit.stat().st_size > 0) or None, 10, "the audit file")
        before = _snapshot(tokens, audit)
        listing = sorted(p.name for p in audit.parent.iterdir())
        second_root = tmp_path / "b"
        second_root.mkdir()
        with _daemon(second_root, first.config, audit) as second:
            assert wait_exit(second, EXIT_S) == 1
        line = _one_error_line(second)
        assert "already_running" in line and f"pid {first.proc.pid}" in line
        assert second.stdout.read_bytes() == b""  # not one event: the log was never opened
        assert _snapshot(tokens, audit) == before
        assert sorted(p.name for p in audit.parent.iterdir()) == listing
        assert first.request("GET", "/healthz")[0] == 200
        assert first.proc.poll() is None
    assert first.proc.returncode == 0


def test_a_daemon_without_its_lock_still_refuses_a_second_start_by_its_port(
    tmp_path: Path, env: Env
) -> None:
    """An audit directory that cannot exist (INTERFACE §9: the daemon runs, fail-closed) also
    means no instance lock: the daemon says so (`instance_lock_unavailable`); a second daemon
    on its configuration is then stopped by the taken port, with a coded error stop."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so blocker/log cannot be a directory")
    audit = blocker / "log" / "audit.jsonl"
    with live_daemon(tmp_path / "a", plugins=env.plugins, keys=env.keys, audit=audit) as first:
        wait_ready(first, 20)
        warnings = first.events("config.warning")
        assert "instance_lock_unavailable" in [w["error_code"] for w in warnings]
        assert first.request("GET", "/readyz")[0] == 503
        second_root = tmp_path / "b"
        second_root.mkdir()
        with _daemon(second_root, first.config, audit, first.port) as second:
            assert wait_exit(second, EXIT_S) == 1
        assert "listen_failed" in _one_error_line(second)
        _error_stop(second.events(), "listen_failed")
        assert first.proc.poll() is None
