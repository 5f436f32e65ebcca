"""Run a real `aisoc-plugind run` process for the ops tests, and stop it by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["audit_events", "running_daemon", "stop", "wait_for_event"]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def audit_events(path: Path) -> list[dict[str, Any]]:
    """Return the events of one audit file (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_event(
    path: Path, name: str, count: int = 1, timeout: float = START_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Wait until `path` holds `count` events named `name`; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in audit_events(path) if e["event"] == name]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    seen = [e["event"] for e in audit_events(path)]
    raise AssertionError(f"{name} x{count} not seen in {path}: {seen}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Send `sig` to this process (by its PID); SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_daemon(config: Path, audit: Path, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start the daemon on `config`, wait for `daemon.ready`, stop it (SIGTERM) on exit.

    Its stdout and stderr go to `logs/daemon.stdout` and `logs/daemon.stderr`.
    """
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "daemon.stdout").open("wb") as out, (logs / "daemon.stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
    try:
        try:
            wait_for_event(audit, "daemon.ready")
        except AssertionError as exc:
            stderr = (logs / "daemon.stderr").read_text(errors="replace")
            raise AssertionError(f"{exc}\nexit code {proc.poll()}, stderr:\n{stderr}") from None
        yield proc
    finally:
        stop(proc)
