"""Startup and instances, in process: the instance lock, and `aisoc-plugind run`'s exits."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisoc_plugind.cli import entry
from aisoc_plugind.cli.main import run_plugind
from aisoc_plugind.errors import AlreadyRunning
from aisoc_plugind.service import signals
from aisoc_plugind.service.instance import InstanceLock, lock_path
from tests.api_fixtures import write_tokens
from tests.conftest import Env

pytestmark = pytest.mark.usefixtures("handlers")  # tests/hardening/conftest.py


# The instance lock.


def test_the_lock_lives_next_to_the_audit_file() -> None:
    """`.<audit file name>.lock` in the audit file's directory (hidden from log globs)."""
    assert lock_path(Path("/var/log/aisoc-plugind/audit.jsonl")) == Path(
        "/var/log/aisoc-plugind/.audit.jsonl.lock"
    )


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    """One holder at a time; the refusal names the holder's PID and the audit path."""
    audit = tmp_path / "log" / "audit.jsonl"
    first = InstanceLock.acquire(audit)
    assert first.held and first.problem is None
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o750
    with pytest.raises(AlreadyRunning) as refused:
        InstanceLock.acquire(audit)
    assert refused.value.code == "already_running"
    assert f"pid {os.getpid()}" in refused.value.message and str(audit) in refused.value.message
    first.release()
    first.release()  # twice is harmless
    again = InstanceLock.acquire(audit)
    assert again.held
    again.release()


def test_a_directory_that_cannot_exist_gives_no_lock_and_a_reason(tmp_path: Path) -> None:
    """The audit directory cannot be made: the lock is not held, and says why."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    lock = InstanceLock.acquire(blocker / "log" / "audit.jsonl")
    assert not lock.held and lock.problem is not None
    assert "blocker" in lock.problem


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_lock_path_that_is_no_regular_file_is_not_used(tmp_path: Path, kind: str) -> None:
    """A FIFO (never blocks), a symlink (never followed) or a directory at the lock's path:
    no lock, a reason."""
    audit = tmp_path / "audit.jsonl"
    path = lock_path(audit)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
    lock = InstanceLock.acquire(audit)
    assert not lock.held and lock.problem is not None


# `aisoc-plugind run` in process.


def _config(tmp_path: Path, env: Env, listen: str) -> Path:
    write_tokens(tmp_path / "tokens.toml", {"ops": ("plugins:read",)})
    config = tmp_path / "config.toml"
    config.write_text(
        'environment = "development"\n'
        f'[plugins]\ndir = "{env.plugins}"\nwatch = false\n'
        f'[trust]\nkeys_dir = "{env.keys}"\nrevoked_file = "{tmp_path}/revoked.toml"\n'
        f'[api]\nlisten = "{listen}"\ntokens_file = "{tmp_path}/tokens.toml"\n'
        f'[audit]\npath = "{env.audit}"\n'
        f'[isolation]\nmode = "none"\nstate_dir = "{tmp_path}/state"\n'
    )
    return config


@pytest.fixture
def taken() -> Iterator[str]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


def test_run_with_a_taken_port_exits_1_with_the_code(
    tmp_path: Path, env: Env, taken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failed start is one stderr line `aisoc-plugind: error: listen_failed: ...`."""
    assert run_plugind(["run", "--config", str(_config(tmp_path, env, taken))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("aisoc-plugind: error: listen_failed: ")
    assert not signals.held()  # called in process, `run` put the caller's handlers back


def test_run_next_to_a_running_daemon_exits_1_already_running(
    tmp_path: Path, env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another holder of the lock: exit 1, `already_running`, and no audit file written."""
    config = _config(tmp_path, env, "127.0.0.1:1")
    holder = InstanceLock.acquire(env.audit)
    try:
        assert run_plugind(["run", "--config", str(config)]) == 1
    finally:
        holder.release()
    assert "error: already_running: another aisoc-plugind" in capsys.readouterr().err
    assert not env.audit.exists()


def test_the_entry_point_holds_signals_for_run_only(
    tmp_path: Path, env: Env, taken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aisoc-plugind run` holds signals from its first line; when it is done and threads
    linger (a hung plugin thread), it leaves without joining them; other commands do
    neither."""
    left: list[int] = []

    def leave(code: int) -> None:
        left.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(SystemExit) as version:
        entry.plugind(["--version"])
    assert version.value.code == 0 and not signals.held() and left == []
    release = threading.Event()
    lingering = threading.Thread(target=release.wait)  # not a daemon thread
    lingering.start()
    try:
        assert lingering in entry.lingering_threads()
        with pytest.raises(SystemExit) as done:
            entry.plugind(["run", "--config", str(_config(tmp_path, env, taken))])
    finally:
        release.set()
        lingering.join()
    assert done.value.code == 1 and left == [1]
    assert signals.held()  # the entry point holds them until the process exits
