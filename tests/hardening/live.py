"""Helpers of the hardening tests that drive real daemons (on top of `tests.live`)."""

from __future__ import annotations

from typing import Any

from tests.live import LiveDaemon, wait_until


def wait_ready(daemon: LiveDaemon, timeout: float) -> dict[str, Any]:
    """Wait for `daemon.ready`; fail at once, with its stderr, if the daemon exits first."""

    def probe() -> dict[str, Any] | None:
        found = daemon.events("daemon.ready")
        if found:
            return found[0]
        if daemon.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited ({daemon.proc.returncode}) before it was ready:\n"
                + daemon.stderr_text()[-3000:]
            )
        return None

    return wait_until(probe, timeout, "daemon.ready")


def wait_exit(daemon: LiveDaemon, timeout: float) -> int:
    """Wait until the daemon process has exited; return its exit status."""
    return wait_until(daemon.proc.poll, timeout, "the daemon to exit")
