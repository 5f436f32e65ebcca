"""Split one shutdown deadline (`daemon.shutdown_grace_s`) into the deadlines of its steps.

A stop signal starts the clock. Until `drain_until` the runs in flight may finish; then the
ones still running are cut (answered 503 `daemon_stopping`). Until `teardown_until` every
plugin's `teardown()` runs, all at once. Until `end` the plugin hosts are stopped (killed
when the deadline passes), the zygote ends and the audit file is flushed. So the whole
shutdown takes at most the grace period, whatever plugins do, in both isolation modes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

__all__ = ["FINAL_MAX_S", "FINAL_MIN_S", "TEARDOWN_SHARE", "ShutdownPlan"]

# The last step (kill hosts, end the zygote, flush the audit file): a tenth of the grace,
# between half a second and two (never more than half the grace).
FINAL_MIN_S, FINAL_MAX_S, FINAL_SHARE = 0.5, 2.0, 0.1
# Teardowns: a quarter of the grace, at most `plugins.run_timeout_s` (their own time limit).
TEARDOWN_SHARE = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownPlan:
    """When each step of one shutdown must be done, as `time.monotonic()` values."""

    started: float
    drain_until: float
    teardown_until: float
    end: float

    @classmethod
    def starting(
        cls, *, grace_s: float, run_timeout_s: float, now: float | None = None
    ) -> ShutdownPlan:
        """Return the plan of a shutdown that began at `now` (default: now)."""
        start = time.monotonic() if now is None else now
        final = min(FINAL_MAX_S, max(FINAL_MIN_S, grace_s * FINAL_SHARE), grace_s / 2)
        teardown = min(run_timeout_s, grace_s * TEARDOWN_SHARE)
        end = start + grace_s
        return cls(
            started=start,
            drain_until=end - final - teardown,
            teardown_until=end - final,
            end=end,
        )

    def remaining(self, until: float) -> float:
        """Return the seconds left until `until` (0 when it has passed)."""
        return max(0.0, until - time.monotonic())

    def scope(self, until: float, *, shield: bool = False) -> anyio.CancelScope:
        """Return a cancel scope whose deadline is `until` (shielded from outside: the steps
        of a shutdown run even when the task that runs them is being cancelled)."""
        return anyio.CancelScope(
            deadline=anyio.current_time() + self.remaining(until), shield=shield
        )
