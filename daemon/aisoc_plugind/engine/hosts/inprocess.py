"""Run plugins inside the daemon's own process (`isolation.mode = "none"`).

Sync `run()` calls and imports go to worker threads (bounded by `plugins.run_concurrency`);
async ones run on the event loop. Time limits are enforced by abandoning the wait: a sync
call that overruns keeps its thread, and nothing stops an async plugin that blocks the loop.
That is why this mode is for development and benchmarks only.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import anyio

from aisoc_plugind.core.contract import Plugin
from aisoc_plugind.engine.hosts import HostInfo, LoadedPlugin, LoadRequest, RunOutput
from aisoc_plugind.engine.hosts.deadlines import Deadlines
from aisoc_plugind.engine.hosts.loader import (
    ImportedBundle,
    entry_module_name,
    import_bundle,
    takes_config,
)
from aisoc_plugind.errors import (
    PluginDError,
    PluginLoadError,
    PluginResultInvalid,
    PluginRunError,
    PluginTimeout,
)

__all__ = ["InProcessHost", "InProcessPlugin", "call_hook", "describe", "normalise_result"]

# Exceptions a plugin may raise that must not end the daemon (sys.exit() in a plugin, ...).
PLUGIN_FAULTS = (Exception, SystemExit, KeyboardInterrupt)
MAX_ERROR_TEXT = 500
# A run's result as compact JSON, ASCII escapes (a lone surrogate cannot break the UTF-8
# response), NaN refused; one encoder (json.dumps with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class InProcessPlugin:
    """A plugin instance living in the daemon, with the modules it was imported as."""

    def __init__(
        self,
        instance: Plugin,
        imported: ImportedBundle,
        host: HostInfo,
        timeout_s: float,
        limiter: anyio.CapacityLimiter,
        deadlines: Deadlines,
    ) -> None:
        self.instance = instance
        self._imported = imported
        self._host = host
        self._timeout_s = timeout_s
        self._limiter = limiter
        self._coroutine = inspect.iscoroutinefunction(instance.run)
        self._deadlines = deadlines

    @property
    def host(self) -> HostInfo:
        """Return the daemon itself as the host."""
        return self._host

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        """Call `run(payload, context)` under the time limit; translate what it raises."""
        if self._coroutine:
            return normalise_result(await self._run_on_loop(payload, context))
        run: Callable[..., Any] = self.instance.run
        try:
            with anyio.fail_after(self._timeout_s):
                value = await anyio.to_thread.run_sync(
                    functools.partial(run, payload, context),
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
                if inspect.isawaitable(value):
                    value = await value
        except TimeoutError as exc:
            raise PluginTimeout(f"run did not return within {self._timeout_s}s") from exc
        except PLUGIN_FAULTS as exc:
            raise PluginRunError(f"run raised {describe(exc)}") from exc
        return normalise_result(value)

    async def _run_on_loop(self, payload: dict[str, Any], context: dict[str, Any]) -> Any:
        """An async `run`, on the event loop, under a shared-timer limit (`Deadlines`)."""
        watch = self._deadlines.start(self._timeout_s)
        try:
            value = await self.instance.run(payload, context)
        except asyncio.CancelledError:
            if not self._deadlines.finish(watch) or watch.task.cancelling():
                raise  # cancelled from outside (shutdown): not this call's time limit
            raise PluginTimeout(f"run did not return within {self._timeout_s}s") from None
        except PLUGIN_FAULTS as exc:
            if self._deadlines.finish(watch):
                raise PluginTimeout(f"run did not return within {self._timeout_s}s") from exc
            raise PluginRunError(f"run raised {describe(exc)}") from exc
        if self._deadlines.finish(watch):  # it swallowed the cancellation: still too late
            raise PluginTimeout(f"run did not return within {self._timeout_s}s")
        return value

    async def teardown(self) -> None:
        """Call `teardown()` (if any) under the time limit, then free the modules."""
        try:
            await call_hook(self.instance, "teardown", "plugin_teardown_failed", self._timeout_s)
        finally:
            self._imported.release()


class InProcessHost:
    """Load plugins into the daemon's own interpreter."""

    def __init__(self, *, timeout_s: float, concurrency: int) -> None:
        self._timeout_s = timeout_s
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._deadlines = Deadlines()
        self._info = HostInfo(pid=os.getpid(), group="daemon", isolated=False)

    async def load(self, request: LoadRequest) -> LoadedPlugin:
        """Import and construct in a worker thread, then call `setup()`."""
        build = functools.partial(_import_and_construct, request)
        try:
            with anyio.fail_after(self._timeout_s):
                instance, imported = await anyio.to_thread.run_sync(
                    build, abandon_on_cancel=True, limiter=self._limiter
                )
        except TimeoutError as exc:
            raise _load_timeout(self._timeout_s) from exc
        try:
            await call_hook(instance, "setup", "plugin_setup_failed", self._timeout_s)
        except PluginLoadError:
            imported.release()
            raise
        return InProcessPlugin(
            instance, imported, self._info, self._timeout_s, self._limiter, self._deadlines
        )

    @property
    def wants_code(self) -> bool:
        """Return True: code compiled by the scan is imported here as is."""
        return True

    @property
    def loads_together(self) -> bool:
        """Return False: loading chunk by chunk lets scanning and importing overlap."""
        return False

    def warm_up(self) -> None:
        """Do nothing: plugins load in this process."""

    async def load_many(self, requests: Sequence[LoadRequest]) -> list[LoadedPlugin | PluginDError]:
        """Import and construct the requests in one worker thread (one hop, not one per
        plugin), each under the time limit; then call each `setup()` on the loop.

        An import that overruns is abandoned (its thread keeps it; nothing it builds is
        used) and the rest continue in a new thread.
        """
        built: list[_Built | PluginDError | None] = [None] * len(requests)
        start = 0
        while start < len(requests):
            batch = _Batch(start)
            await self._build(requests, built, batch)
            if batch.abandoned:
                built[batch.current] = _load_timeout(self._timeout_s)
            start = batch.current + 1 if batch.abandoned else len(requests)
        out: list[LoadedPlugin | PluginDError] = []
        for item in built:
            if item is None or isinstance(item, PluginDError):
                out.append(item or PluginLoadError("not loaded", code="plugin_load_error"))
                continue
            instance, imported = item
            try:
                await call_hook(instance, "setup", "plugin_setup_failed", self._timeout_s)
            except PluginLoadError as exc:
                imported.release()
                out.append(exc)
                continue
            out.append(
                InProcessPlugin(
                    instance, imported, self._info, self._timeout_s, self._limiter, self._deadlines
                )
            )
        return out

    async def _build(
        self,
        requests: Sequence[LoadRequest],
        built: list[_Built | PluginDError | None],
        batch: _Batch,
    ) -> None:
        """Run `_build_batch` in a thread; abandon it when one import overruns the limit."""
        finished = anyio.Event()
        poll_s = min(0.25, self._timeout_s / 4)

        async def in_thread() -> None:
            try:
                await anyio.to_thread.run_sync(
                    _build_batch,
                    requests,
                    built,
                    batch,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
            finally:
                finished.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(in_thread)
            while not finished.is_set():
                with anyio.move_on_after(poll_s):
                    await finished.wait()
                if not finished.is_set() and batch.overran(self._timeout_s):
                    tasks.cancel_scope.cancel()

    def set_on_failed(self, callback: Callable[[list[str], PluginDError], None]) -> None:
        """Nothing to report: in process, a plugin cannot be lost without the daemon."""

    async def aclose(self) -> None:
        """Nothing to release: plugins free their own modules at teardown."""


_Built = tuple[Plugin, ImportedBundle]


class _Batch:
    """Where a batch import thread is, shared with the loop that watches it."""

    def __init__(self, start: int) -> None:
        self.current = start
        self.started = time.monotonic()
        self.abandoned = False
        self.lock = threading.Lock()

    def gave_up(self) -> bool:
        """Return True once the loop abandoned this thread (another thread sets it)."""
        return self.abandoned

    def overran(self, timeout_s: float) -> bool:
        """Abandon the thread when its current import runs past the limit; return True then."""
        with self.lock:
            if time.monotonic() - self.started > timeout_s:
                self.abandoned = True
        return self.abandoned


def _build_batch(
    requests: Sequence[LoadRequest], built: list[_Built | PluginDError | None], batch: _Batch
) -> None:
    """Import and construct requests from `batch.current` on (in a worker thread)."""
    for index in range(batch.current, len(requests)):
        with batch.lock:
            if batch.gave_up():
                return
            batch.current, batch.started = index, time.monotonic()
        result: _Built | PluginDError
        try:
            result = _import_and_construct(requests[index])
        except PluginDError as exc:
            result = exc
        except Exception as exc:  # a bug here fails that plugin, never the batch
            result = PluginLoadError(
                f"loading failed unexpectedly ({type(exc).__name__})", code="plugin_load_error"
            )
        with batch.lock:
            if batch.gave_up():  # too late: the loop reported a timeout for this one
                if not isinstance(result, PluginDError):
                    result[1].release()
                return
            built[index] = result


def _load_timeout(timeout_s: float) -> PluginLoadError:
    return PluginLoadError(
        f"importing and constructing the plugin took longer than {timeout_s}s",
        code="plugin_load_timeout",
    )


async def call_hook(instance: object, name: str, code: str, timeout_s: float) -> None:
    """Call an optional sync or async hook (`setup`, `teardown`) under the time limit."""
    hook = getattr(instance, name, None)
    if hook is None:
        return
    try:
        with anyio.fail_after(timeout_s):
            outcome = hook()
            if inspect.isawaitable(outcome):
                await outcome
    except TimeoutError as exc:
        raise PluginLoadError(f"{name}() did not return within {timeout_s}s", code=code) from exc
    except PLUGIN_FAULTS as exc:
        raise PluginLoadError(f"{name}() raised {describe(exc)}", code=code) from exc


def _import_and_construct(request: LoadRequest) -> tuple[Plugin, ImportedBundle]:
    """Import the verified bytes and build the Plugin instance (runs in a worker thread)."""
    try:
        imported = import_bundle(request.root, request.sources, request.entry_point, request.code)
    except PLUGIN_FAULTS as exc:
        leaf = entry_module_name(request.entry_point).rsplit(".", 1)[-1]
        missing = isinstance(exc, ModuleNotFoundError) and leaf in str(exc)
        raise PluginLoadError(
            f"importing {request.entry_point} raised {describe(exc)}",
            code="plugin_entry_missing" if missing else "plugin_import_failed",
        ) from exc
    try:
        return _construct(imported, request), imported
    except BaseException:
        imported.release()
        raise


def _construct(imported: ImportedBundle, request: LoadRequest) -> Plugin:
    cls: Any = getattr(imported.module, "Plugin", None)
    if not inspect.isclass(cls):
        raise PluginLoadError(
            f"{request.entry_point} defines no class Plugin", code="plugin_class_missing"
        )
    if not callable(getattr(cls, "run", None)):
        raise PluginLoadError(
            "class Plugin has no run(payload, context) method", code="plugin_class_missing"
        )
    factory = cast(Callable[..., Plugin], cls)
    try:
        instance = factory(dict(request.config)) if takes_config(cls) else factory()
    except PLUGIN_FAULTS as exc:
        raise PluginLoadError(
            f"Plugin() raised {describe(exc)}", code="plugin_init_failed"
        ) from exc
    return instance


def normalise_result(value: Any) -> RunOutput:
    """Wrap a non-dict result as `{"result": value}`; refuse what JSON cannot encode."""
    result = value if isinstance(value, dict) else {"result": value}
    try:
        text = _ENCODE(result)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PluginResultInvalid(f"the result is not JSON-serialisable: {exc}") from exc
    return RunOutput(result, text)


def describe(exc: BaseException) -> str:
    """Return `Type: text` of a plugin's exception, cut at 500 characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"
