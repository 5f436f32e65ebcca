"""Time limits for many concurrent calls: one event-loop timer per 50 ms slot, not per call.

`asyncio.timeout()` schedules (and cancels) a timer for every call; at thousands of runs a
second the loop's timer heap and its Python-level comparisons cost more than the run itself.
Here a call joins the slot its deadline falls in, and the slot's single timer cancels every
call still in it. A limit fires between `timeout_s` and `timeout_s + SLOT_S` after the start.
"""

from __future__ import annotations

import asyncio
import math

__all__ = ["SLOT_S", "Deadlines", "Watch"]

SLOT_S = 0.05


class Watch:
    """One call under a time limit: its task, its slot, and whether the limit fired."""

    __slots__ = ("expired", "slot", "task")

    def __init__(self, task: asyncio.Task[object], slot: int) -> None:
        self.task = task
        self.slot = slot
        self.expired = False


class Deadlines:
    """Cancel calls that outlive their limit; see the module docstring."""

    def __init__(self) -> None:
        self._slots: dict[int, set[Watch]] = {}

    def start(self, timeout_s: float) -> Watch:
        """Put the current task under a limit of `timeout_s` from now."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called from a coroutine in a task
            raise RuntimeError("Deadlines.start() needs a running task")
        slot = math.ceil((loop.time() + timeout_s) / SLOT_S)
        watch = Watch(task, slot)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            loop.call_at(slot * SLOT_S, self._expire, slot)
        members.add(watch)
        return watch

    def finish(self, watch: Watch) -> bool:
        """End the watch; return True when its limit fired (the task's cancellation that it
        caused is withdrawn: the caller reports a timeout instead)."""
        members = self._slots.get(watch.slot)
        if members is not None:
            members.discard(watch)
        if watch.expired:
            watch.task.uncancel()
        return watch.expired

    def _expire(self, slot: int) -> None:
        for watch in self._slots.pop(slot, ()):
            watch.expired = True
            watch.task.cancel()
