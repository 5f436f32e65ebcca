"""Run plugins and account for runs in flight, so replaced versions retire when idle.

A run takes the version that is live when it starts and finishes on it; a replaced or
unloaded version is torn down by whoever sees its last run end. Once the daemon stops, new
runs are refused and the runs still in flight when the drain period ends are cut: both end in
`daemon_stopping` (answered, and audited as `plugin.run.failed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import anyio

from aisoc_plugind.audit import names
from aisoc_plugind.core.records import State
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.hosts import LoadedPlugin, RunOutput
from aisoc_plugind.engine.hosts.faults import cancelled_here, type_name
from aisoc_plugind.engine.results import Caller, RunResult
from aisoc_plugind.engine.table import Live, Slot
from aisoc_plugind.errors import (
    DaemonStopping,
    PluginDError,
    PluginLoadError,
    PluginRunError,
    PluginStateConflict,
)

__all__ = ["RunTracker", "elapsed_ms"]


class RunTracker:
    """Count runs in flight and tear down retired versions once nothing runs on them."""

    def __init__(self, events: EngineEvents) -> None:
        self.events = events
        self.inflight = 0
        self._idle: anyio.Event | None = None  # made when someone waits (rarely)
        self.stopping = False
        # The task of each run in flight, and whether `cut()` cancelled it.
        self._cuts: dict[asyncio.Task[Any], bool] = {}

    async def wait_idle(self) -> None:
        """Return once no run is executing."""
        while self.inflight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def run(
        self,
        slot: Slot,
        payload: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
        caller: Caller,
    ) -> RunResult:
        """Run the live version of `slot`'s plugin and write the run's event."""
        record = slot.record
        try:
            if self.stopping:
                raise DaemonStopping("the daemon is shutting down; the run was not started")
            live = _runnable(slot)
        except (PluginStateConflict, DaemonStopping) as exc:  # a refused run is on the record
            self.events.emit(
                names.PLUGIN_RUN_FAILED,
                level="warning",
                plugin_id=record.id,
                version=record.version,
                error_code=exc.code,
                error=exc.message,
                duration_ms=0.0,
                **caller.fields(),
            )
            raise
        live.inflight += 1
        self.inflight += 1
        started = time.perf_counter()
        try:
            output = await self._cuttable(live.plugin, dict(payload or {}), dict(context or {}))
        except BaseException as exc:
            if cancelled_here(exc):
                raise
            error = self.events.redacted(exc if isinstance(exc, PluginDError) else _fault(exc))
            self.events.emit(
                names.PLUGIN_RUN_FAILED,
                level="warning",
                plugin_id=record.id,
                version=record.version,
                error_code=error.code,
                error=_audit_text(error),
                duration_ms=elapsed_ms(started),
                **caller.fields(),
            )
            if error is exc:
                raise
            raise error from exc
        finally:
            self._finished(live)
            if live.retired and live.inflight == 0:
                await self.retire_if_idle(live, record.id)
        duration = elapsed_ms(started)
        seq = self.events.emit(
            names.PLUGIN_RUN_COMPLETED,
            plugin_id=record.id,
            version=record.version,
            duration_ms=duration,
            **caller.fields(),
        )
        await self.events.commit(seq, durable=False)  # answered only once its line is written
        return RunResult(
            plugin_id=record.id, result=output.value, duration_ms=duration, result_json=output.text
        )

    async def _cuttable(
        self, plugin: LoadedPlugin, payload: dict[str, Any], context: dict[str, Any]
    ) -> RunOutput:
        """Run `plugin` so that `cut()` can cancel it; raise DaemonStopping when it did.

        A cut cancels the run's task and takes its own cancellation back (as
        `asyncio.timeout` does): a cancellation from outside still propagates. (Not an anyio
        CancelScope per run: that was about a tenth of a run's cost in the daemon.)
        """
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called from a task
            return await plugin.run(payload, context)
        cuts = self._cuts
        cuts[task] = False
        taken_back = False
        try:
            return await plugin.run(payload, context)
        except asyncio.CancelledError:
            if cuts.get(task):
                taken_back = True
                if task.uncancel() == 0:  # cut, and not cancelled from outside as well
                    raise DaemonStopping(
                        "the daemon is shutting down; the run was cut before it finished "
                        "(its drain period, part of daemon.shutdown_grace_s, ended)"
                    ) from None
            raise
        finally:
            if cuts.pop(task, False) and not taken_back:
                await _take_back_cancel(task)  # cut as it finished: the result stands

    def refuse(self) -> None:
        """Refuse every new run from now on (DaemonStopping): the daemon is stopping."""
        self.stopping = True

    def cut(self) -> int:
        """Cancel every run in flight (each ends in DaemonStopping); return how many."""
        cuts = [task for task, cut in self._cuts.items() if not cut]
        for task in cuts:
            self._cuts[task] = True
            task.cancel()
        return len(cuts)

    def _finished(self, live: Live) -> None:
        live.inflight -= 1
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def retire_if_idle(self, live: Live | None, plugin_id: str) -> None:
        """Tear down a replaced version once nothing runs on it (whoever sees that does it)."""
        if live is not None and live.retired and live.inflight == 0:
            with anyio.CancelScope(shield=True):
                await self.teardown(live, plugin_id)

    async def teardown(self, live: Live, plugin_id: str | None = None) -> None:
        """Call the version's teardown once; a failure is an event, never an error."""
        if live.torn_down:
            return
        live.torn_down = True
        try:
            await live.plugin.teardown()
        except BaseException as exc:
            if cancelled_here(exc):
                raise
            error = self.events.redacted(
                exc
                if isinstance(exc, PluginDError)
                else PluginLoadError(
                    f"teardown() failed ({type_name(exc)})", code="plugin_teardown_failed"
                )
            )
            self.events.emit(
                names.PLUGIN_TEARDOWN_FAILED,
                level="warning",
                plugin_id=plugin_id,
                error_code=error.code,
                error=error.message,
            )


async def _take_back_cancel(task: asyncio.Task[Any]) -> None:
    """Take back a cut's cancellation that has not reached `task` yet (it would at the next
    await); a cancellation from outside that came with it is raised again."""
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        if task.uncancel() > 0:
            raise
        return
    task.uncancel()  # pragma: no cover - delivered before the sleep: nothing more to take


def _runnable(slot: Slot) -> Live:
    state = slot.record.state
    if state is State.DISABLED:
        raise PluginStateConflict(f"plugin {slot.record.id!r} is disabled", code="plugin_disabled")
    if state is not State.ENABLED or slot.live is None:
        code = {State.FAILED: "plugin_failed", State.UNLOADED: "plugin_unloaded"}.get(
            state, "plugin_not_ready"
        )
        raise PluginStateConflict(f"plugin {slot.record.id!r} is {state.value}", code=code)
    return slot.live


def _fault(exc: BaseException) -> PluginRunError:
    """Code what a host let through (it should not): the type only, as for any run."""
    name = type_name(exc)
    return PluginRunError(f"plugin raised {name}", fault=name)


def _audit_text(exc: PluginDError) -> str:
    """Return what a run failure may say in an event: a plugin's exception text can quote the
    payload, so only its type is kept there."""
    if isinstance(exc, PluginRunError) and exc.fault is not None:
        return f"plugin raised {exc.fault}"
    return exc.message


def elapsed_ms(started: float) -> float:
    """Return milliseconds since `started` (a `time.perf_counter()` value), rounded to µs."""
    return round((time.perf_counter() - started) * 1000, 3)
