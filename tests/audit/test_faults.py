"""Real faults under a running daemon: nothing is acknowledged without its line, ever.

Each test drives a real daemon process over HTTP and breaks its audit file for real: a 64 KiB
tmpfs that fills up, an ext4 on a loop device shut down with EXT4_IOC_SHUTDOWN (EIO), the path
replaced by a directory, the directory deleted, SIGHUP storms while failing, kill -9 in the
middle of a batch. Mounting needs root; those tests skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.verify import verify_files
from tests.conftest import Env, PluginFactory
from tests.live import LiveDaemon, live_daemon, wait_until

P = "/api/v1/plugins"
PLUGIN = "test.echo"
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def _mount(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args[:3])}: {proc.stderr.strip()})")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` (root only); unmount it afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def loop_ext4(path: Path, image: Path) -> Iterator[Path]:
    """Mount a fresh 8 MiB ext4 image at `path` through a loop device; unmount afterwards."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    with image.open("wb") as fh:
        fh.truncate(8 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir(parents=True, exist_ok=True)
    _mount(["mount", "-o", "loop", str(image), str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _shut_down(mountpoint: Path) -> None:
    """Make every further I/O on the filesystem fail with EIO (like a dead disk)."""
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


@pytest.fixture
def echo(plugins: PluginFactory) -> None:
    plugins.write("echo", plugin_id=PLUGIN)


def _state(daemon: LiveDaemon) -> str:
    status, body = daemon.request("GET", f"{P}/{PLUGIN}")
    assert status == 200
    return str(body["state"])


def _all_lines(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        if path.is_file():
            out += [
                json.loads(line)
                for line in path.read_bytes().splitlines()
                if line.startswith(b"{") and line.endswith(b"}")
            ]
    return out


def _assert_acknowledged_in_files(
    daemon: LiveDaemon, acknowledged: list[int], files: list[Path]
) -> None:
    """Every seq the daemon answered 2xx for is a line in one of the files."""
    seqs = {e.get("seq") for e in _all_lines(files)}
    assert [s for s in acknowledged if s not in seqs] == []


def _one_report(daemon: LiveDaemon) -> None:
    reports = [line for line in daemon.stderr_text().splitlines() if "audit.write_failed" in line]
    assert len(reports) == 1, reports


def _health(daemon: LiveDaemon) -> tuple[str, int]:
    _, body = daemon.request("GET", "/healthz")
    status, _ = daemon.request("GET", "/readyz")
    return str(body["audit"]), status


def test_a_full_disk_refuses_changes_and_heals_with_a_gap(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """64 KiB tmpfs: once full, the first change that cannot be written gets 503 and is not
    made, later ones and runs too; once space is back the kept events follow audit.gap, the
    torn line verifies and changes work again."""
    log_dir = tmp_path / "log"
    audit = log_dir / "audit.jsonl"
    with (
        tmpfs(log_dir, "64k"),
        live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, audit=audit) as d,
    ):
        filler = log_dir / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as fh:
            while True:
                fh.write(b"x" * 4096)
                fh.flush()
        # The file's last page may still hold a few lines: change back and forth until a
        # change cannot be written; that one must not have been made.
        for attempt in range(200):
            before = _state(d)
            verb = "disable" if before == "enabled" else "enable"
            status, body = d.request("POST", f"{P}/{PLUGIN}/{verb}")
            if status != 200:
                break
        assert (status, body["error"]["code"]) == (503, "audit_unavailable"), attempt
        assert _state(d) == before
        assert d.request("POST", f"{P}/{PLUGIN}/run", {"payload": {}})[0] == 503
        assert _health(d) == ("failing", 503)
        _one_report(d)
        filler.unlink()
        verb = "disable" if before == "enabled" else "enable"
        status, body = d.request("POST", f"{P}/{PLUGIN}/{verb}")
        assert status == 200, body
        assert _health(d) == ("ok", 200)
        assert d.stop() == 0
        names = [e["event"] for e in d.audit_events()]
        assert "audit.gap" in names and names[-1] == "daemon.stopped"
        report = verify_files([d.audit], complete=True)
        assert report.ok, report.broken


def test_eio_refuses_changes_and_the_daemon_keeps_serving(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """An ext4 shut down under the daemon (EIO): 503 for changes, reads and health go on,
    one stderr report; a fresh disk mounted there and SIGHUP heal it."""
    log_dir = tmp_path / "log"
    with (
        loop_ext4(log_dir, tmp_path / "ext4.img"),
        live_daemon(
            tmp_path / "d", plugins=env.plugins, keys=env.keys, audit=log_dir / "audit.jsonl"
        ) as d,
    ):
        status, body = d.request("POST", f"{P}/{PLUGIN}/run", {"payload": {}})
        assert status == 200, body
        _shut_down(log_dir)
        status, body = d.request("POST", f"{P}/{PLUGIN}/disable")
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")
        assert _state(d) == "enabled"
        assert d.request("POST", f"{P}/{PLUGIN}/run", {"payload": {}})[0] == 503
        assert _health(d) == ("failing", 503)
        assert d.proc.poll() is None
        _one_report(d)
        subprocess.run(["umount", "-l", str(log_dir)], check=True)  # the disk is replaced
        d.signal(signal.SIGHUP)
        wait_until(lambda: True if _health(d) == ("ok", 200) else None, 10, "healing")
        assert d.request("POST", f"{P}/{PLUGIN}/disable")[0] == 200
        assert d.stop() == 0
        events = d.audit_events()
        assert events[0]["event"] == "audit.reopened"
        gap = next(e for e in events if e["event"] == "audit.gap")
        assert gap["count"] >= 1
        denied = [e for e in events if e["event"] == "api.denied"]
        assert denied and denied[0]["reason"] == "audit_unavailable"


def test_the_audit_path_replaced_by_a_directory_fails_closed_then_heals(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """A directory where the file was: 503, no change; removed again: the chain continues."""
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        away = d.audit.with_name("audit.jsonl.away")
        d.audit.rename(away)
        d.audit.mkdir()
        assert d.request("POST", f"{P}/{PLUGIN}/disable")[0] == 503
        assert _state(d) == "enabled"
        d.audit.rmdir()
        status, _ = d.request("POST", f"{P}/{PLUGIN}/disable")
        assert status == 200
        assert d.stop() == 0
        report = verify_files([away, d.audit], complete=True)
        assert report.ok, report.broken
        assert [e["event"] for e in d.audit_events()][:2] == ["audit.reopened", "audit.gap"]


def test_a_deleted_audit_directory_is_recreated_with_a_trace(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """rm -rf of the log directory mid-run: recreated, and the first line says why."""
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        shutil.rmtree(d.audit.parent)
        status, _ = d.request("POST", f"{P}/{PLUGIN}/disable")
        assert status == 200
        first = d.audit_events()[0]
        assert (first["event"], first["reason"]) == ("audit.reopened", "directory_missing")
        assert oct(d.audit.parent.stat().st_mode & 0o777) == "0o750"


def test_a_sighup_storm_while_failing_keeps_the_daemon_up_and_closed(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """SIGHUPs in a storm while the audit path cannot exist: alive, fail-closed, one report."""
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        log_dir = d.audit.parent
        shutil.move(log_dir, tmp_path / "log-away")
        log_dir.write_text("a file where the directory was")
        assert d.request("POST", f"{P}/{PLUGIN}/disable")[0] == 503
        for _ in range(50):
            d.signal(signal.SIGHUP)
            time.sleep(0.005)  # pending signals of one kind coalesce in the kernel
        d.wait_for("daemon.reloading", count=10)
        assert d.proc.poll() is None
        assert _health(d) == ("failing", 503)
        assert d.request("POST", f"{P}/{PLUGIN}/disable")[0] == 503
        assert _state(d) == "enabled"
        _one_report(d)
        log_dir.unlink()
        d.signal(signal.SIGHUP)
        wait_until(lambda: True if _health(d) == ("ok", 200) else None, 10, "healing")
        assert d.stop() == 0


def test_kill_9_in_the_middle_of_a_batch_then_restart_verifies(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """SIGKILL during a flood of runs, restart on the same file: the chain verifies and
    every run that was answered 200 has its line."""
    acknowledged: list[int] = []
    root = tmp_path / "d"
    with live_daemon(root, plugins=env.plugins, keys=env.keys) as d:
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                try:
                    status, _ = d.request("POST", f"{P}/{PLUGIN}/run", {"payload": {}}, timeout=2)
                except OSError:
                    return
                if status == 200:
                    acknowledged.append(1)

        workers = [threading.Thread(target=flood) for _ in range(4)]
        for worker in workers:
            worker.start()
        wait_until(lambda: True if len(acknowledged) > 50 else None, 15, "50 runs")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
        answered = len(acknowledged)
    audit = root / "log" / "audit.jsonl"
    runs_in_file = sum(1 for e in _all_lines([audit]) if e["event"] == "plugin.run.completed")
    assert runs_in_file >= answered
    (root / "stdout.jsonl").unlink()
    with live_daemon(root, plugins=env.plugins, keys=env.keys) as again:
        assert again.stop() == 0
    report = verify_files([audit], complete=True)
    assert report.ok, report.broken


def test_a_bad_audit_path_at_start_leaves_the_daemon_up_and_closed(
    env: Env, echo: None, tmp_path: Path
) -> None:
    """Start with an audit path that cannot exist: the daemon serves reads, refuses changes,
    is not ready; fixed and SIGHUP'ed, it heals and loads the plugins it could not."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so blocker/log cannot be a directory")
    audit = blocker / "log" / "audit.jsonl"
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, audit=audit) as d:
        assert _health(d) == ("failing", 503)
        assert d.request("POST", f"{P}/discover")[0] == 503
        assert d.request("GET", P)[0] == 200
        _one_report(d)
        blocker.unlink()
        d.signal(signal.SIGHUP)
        wait_until(lambda: True if _health(d) == ("ok", 200) else None, 10, "healing")
        wait_until(
            lambda: True if d.request("GET", f"{P}/{PLUGIN}")[0] == 200 else None,
            10,
            "the plugin loaded after recovery",
        )
        assert _state(d) == "enabled"
