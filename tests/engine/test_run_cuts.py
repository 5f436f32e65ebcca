"""Cutting runs at shutdown: each run in flight ends in DaemonStopping, nothing else changes.

`RunTracker.cut()` cancels the task of every run in flight and takes that cancellation back
where the run ends (as `asyncio.timeout` does). These tests pin the edges a shutdown can hit:
a run that finished in the same moment, a plugin that swallows the cancellation, and a
cancellation from outside arriving together with a cut, which must still propagate. The
live shutdown tests (tests/hardening/test_shutdown*.py) drive the same path end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import pytest

from aisoc_plugind.engine.hosts import RunOutput
from aisoc_plugind.engine.runs import RunTracker
from aisoc_plugind.errors import DaemonStopping

OK = RunOutput({"ok": True}, '{"ok":true}')


class Plugin:
    """A stand-in with the `run` of a loaded plugin; `behaviour` decides what run does."""

    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        return cast(RunOutput, await self.behaviour())


def _tracker() -> RunTracker:
    return RunTracker(events=cast(Any, None))


async def _cuttable(tracker: RunTracker, plugin: Plugin) -> RunOutput:
    return await tracker._cuttable(cast(Any, plugin), {}, {})


async def test_a_cut_run_ends_in_daemon_stopping_and_its_task_goes_on() -> None:
    tracker, started = _tracker(), asyncio.Event()

    async def waits() -> RunOutput:
        started.set()
        await asyncio.sleep(30)
        return OK

    async def request() -> str:
        with pytest.raises(DaemonStopping):
            await _cuttable(tracker, Plugin(waits))
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.01)  # the task is not cancelled any more: it answers
        return "answered"

    task = asyncio.create_task(request())
    await started.wait()
    assert tracker.cut() == 1
    assert await task == "answered"
    assert tracker.cut() == 0  # nothing in flight any more


async def test_a_run_that_finishes_as_it_is_cut_keeps_its_result() -> None:
    tracker = _tracker()

    async def finishes_while_cut() -> RunOutput:
        assert tracker.cut() == 1  # the cut lands, then the run returns at once
        return OK

    async def request() -> RunOutput:
        out = await _cuttable(tracker, Plugin(finishes_while_cut))
        await asyncio.sleep(0.01)  # the cut's cancellation does not arrive later
        return out

    assert await asyncio.create_task(request()) is OK


async def test_a_plugin_that_swallows_the_cut_keeps_its_result() -> None:
    tracker, started = _tracker(), asyncio.Event()

    async def swallows() -> RunOutput:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        return OK

    async def request() -> RunOutput:
        out = await _cuttable(tracker, Plugin(swallows))
        await asyncio.sleep(0.01)
        return out

    task = asyncio.create_task(request())
    await started.wait()
    tracker.cut()
    assert await task is OK


@pytest.mark.parametrize("order", ["cut-first", "outside-first"])
async def test_a_cancellation_from_outside_still_propagates(order: str) -> None:
    tracker, started = _tracker(), asyncio.Event()

    async def waits() -> RunOutput:
        started.set()
        await asyncio.sleep(30)
        return OK

    task = asyncio.create_task(_cuttable(tracker, Plugin(waits)))
    await started.wait()
    if order == "cut-first":
        tracker.cut()
        task.cancel()
    else:
        task.cancel()
        tracker.cut()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outside_cancellation_with_a_cut_as_the_run_finishes_propagates() -> None:
    tracker = _tracker()

    async def finishes_while_cut_and_cancelled() -> RunOutput:
        task = asyncio.current_task()
        assert task is not None
        tracker.cut()
        task.cancel()  # the server cancels the request at the same moment
        return OK

    task = asyncio.create_task(_cuttable(tracker, Plugin(finishes_while_cut_and_cancelled)))
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_only_runs_in_flight_are_cut() -> None:
    tracker, started = _tracker(), asyncio.Event()
    count = 3

    async def waits() -> RunOutput:
        if sum(1 for _ in tracker._cuts) == count:
            started.set()
        await asyncio.sleep(30)
        return OK

    tasks = [asyncio.create_task(_cuttable(tracker, Plugin(waits))) for _ in range(count)]
    await started.wait()
    assert tracker.cut() == count
    assert tracker.cut() == 0  # a second cut (a second SIGTERM) cancels nothing twice
    for task in tasks:
        with pytest.raises(DaemonStopping):
            await task
