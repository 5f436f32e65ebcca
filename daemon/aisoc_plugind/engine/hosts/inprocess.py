"""Run plugins inside the daemon's own process (`isolation.mode = "none"`).

Sync `run()` calls and imports go to worker threads (bounded by `plugins.run_concurrency`);
async ones run on the event loop. Time limits are enforced by abandoning the wait: a sync
call that overruns keeps its thread, and nothing stops an async plugin that blocks the loop.
That is why this mode is for development and benchmarks only.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio

from aisoc_plugind.core.contract import Plugin
from aisoc_plugind.core.redact import NO_REDACTION, Redactor
from aisoc_plugind.engine.hosts import HostInfo, LoadedPlugin, LoadRequest, RunOutput
from aisoc_plugind.engine.hosts.deadlines import Deadlines
from aisoc_plugind.engine.hosts.faults import (
    Raised,
    cancelled_here,
    captured,
    describe,
    type_name,
)
from aisoc_plugind.engine.hosts.jsondepth import MAX_RESULT_DEPTH, deeper_than, unserialisable
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

__all__ = ["InProcessHost", "InProcessPlugin", "call_hook", "normalise_result"]

# A run's result as compact JSON, ASCII escapes (a lone surrogate cannot break the UTF-8
# response), NaN refused; one encoder (json.dumps with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
MAX_RESULT_BYTES = 8 * 1024 * 1024  # `plugins.max_result_bytes` unless the host is told


class InProcessPlugin:
    """A plugin instance living in the daemon, with the modules it was imported as."""

    def __init__(
        self,
        built: _Built,
        host: HostInfo,
        timeout_s: float,
        limiter: anyio.CapacityLimiter,
        deadlines: Deadlines,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        self.instance = built.instance
        self._max_result = max_result_bytes
        self._imported = built.imported
        self._redactor = built.redactor
        self._host = host
        self._timeout_s = timeout_s
        self._limiter = limiter
        self._coroutine = built.is_async
        self._deadlines = deadlines

    @property
    def host(self) -> HostInfo:
        """Return the daemon itself as the host."""
        return self._host

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        """Call `run(payload, context)` under the time limit; translate what it raises
        (anything: only a cancellation of the calling task passes, as itself)."""
        if self._coroutine:
            return _capped(_result(await self._run_on_loop(payload, context)), self._max_result)
        call = captured(functools.partial(_call_run, self.instance, payload, context))
        with anyio.move_on_after(self._timeout_s) as scope:
            value = await anyio.to_thread.run_sync(
                call, abandon_on_cancel=True, limiter=self._limiter
            )
            if isinstance(value, Raised):
                raise _run_error(value.exc) from value.exc
            value, awaitable = value
            if awaitable:
                value = await _awaited(value)
        if scope.cancel_called:  # overran (also when an awaitable swallowed the cancellation)
            raise PluginTimeout(f"run did not return within {self._timeout_s}s")
        return _capped(_result(value), self._max_result)

    async def _run_on_loop(self, payload: dict[str, Any], context: dict[str, Any]) -> Any:
        """An async `run`, on the event loop, under a shared-timer limit (`Deadlines`)."""
        watch = self._deadlines.start(self._timeout_s)
        try:
            value = await self.instance.run(payload, context)
        except BaseException as exc:  # whatever the plugin raises is coded
            expired = self._deadlines.finish(watch)  # withdraws the limit's own cancellation
            if cancelled_here(exc):
                raise  # cancelled from outside (shutdown): not this call's time limit
            if expired:
                raise PluginTimeout(f"run did not return within {self._timeout_s}s") from None
            raise _run_error(exc) from exc
        if self._deadlines.finish(watch):  # it swallowed the cancellation: still too late
            raise PluginTimeout(f"run did not return within {self._timeout_s}s")
        return value

    async def teardown(self) -> None:
        """Call `teardown()` (if any) under the time limit, then free the modules."""
        try:
            await call_hook(
                self.instance,
                "teardown",
                "plugin_teardown_failed",
                self._timeout_s,
                self._redactor,
            )
        finally:
            self._imported.release()


def _call_run(
    instance: Plugin, payload: dict[str, Any], context: dict[str, Any]
) -> tuple[Any, bool]:
    """Call a sync `run`; return its value and whether it is awaitable (in a worker thread:
    looking `run` up, and looking at what it returned, can run plugin code)."""
    value = instance.run(payload, context)
    return value, inspect.isawaitable(value)


async def _awaited(awaitable: Any) -> Any:
    """Await what a sync `run` returned (an awaitable); code what it raises."""
    try:
        return await awaitable
    except BaseException as exc:  # whatever the plugin raises is coded
        if cancelled_here(exc):
            raise
        raise _run_error(exc) from exc


def _run_error(exc: BaseException) -> PluginRunError:
    """A run's failure names the type of what the plugin raised, never its text (which can
    quote the payload or the plugin's configuration)."""
    name = type_name(exc)
    return PluginRunError(f"plugin raised {name}", fault=name)


def _result(value: Any) -> RunOutput:
    """Encode a result; code whatever encoding it raises (a dict subclass's `items()`, a
    `__class__` property: plugin code runs here too)."""
    try:
        return normalise_result(value)
    except PluginResultInvalid:
        raise
    except BaseException as exc:  # whatever the plugin's objects raise (nothing is awaited)
        raise PluginResultInvalid(f"the result could not be encoded ({type_name(exc)})") from exc


def _capped(output: RunOutput, cap: int) -> RunOutput:
    """Refuse a result over `plugins.max_result_bytes` (its encoding is ASCII: one byte a
    character), as a host process does."""
    size = len(output.text)
    if size > cap:
        raise PluginResultInvalid(
            f"the result is {size} bytes, over plugins.max_result_bytes ({cap})",
            code="plugin_result_too_large",
        )
    return output


class InProcessHost:
    """Load plugins into the daemon's own interpreter."""

    def __init__(
        self, *, timeout_s: float, concurrency: int, max_result_bytes: int = MAX_RESULT_BYTES
    ) -> None:
        self._max_result = max_result_bytes
        self._timeout_s = timeout_s
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._deadlines = Deadlines()
        self._info = HostInfo(pid=os.getpid(), group="daemon", isolated=False)

    async def load(self, request: LoadRequest) -> LoadedPlugin:
        """Import and construct in a worker thread, then call `setup()`."""
        build = functools.partial(_import_and_construct, request)
        try:
            with anyio.fail_after(self._timeout_s):
                built = await anyio.to_thread.run_sync(
                    build, abandon_on_cancel=True, limiter=self._limiter
                )
        except TimeoutError as exc:
            raise _load_timeout(self._timeout_s) from exc
        return await self._set_up(built)

    async def _set_up(self, built: _Built) -> InProcessPlugin:
        """Call `setup()` of a constructed plugin; raise PluginLoadError (modules freed)."""
        try:
            await call_hook(
                built.instance, "setup", "plugin_setup_failed", self._timeout_s, built.redactor
            )
        except BaseException:
            built.imported.release()
            raise
        return InProcessPlugin(
            built, self._info, self._timeout_s, self._limiter, self._deadlines, self._max_result
        )

    @property
    def wants_code(self) -> bool:
        """Return True: code compiled by the scan is imported here as is."""
        return True

    @property
    def loads_together(self) -> bool:
        """Return False: loading chunk by chunk lets scanning and importing overlap."""
        return False

    @property
    def state_root(self) -> None:
        """Return None: plugins in this process get no state directory of their own."""
        return None

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
            try:
                out.append(await self._set_up(item))
            except PluginLoadError as exc:
                out.append(exc)
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


@dataclass(frozen=True, slots=True)
class _Built:
    """A constructed plugin: its instance, modules, kind of `run`, and configuration's
    redactor (for what its hooks raise)."""

    instance: Plugin
    imported: ImportedBundle
    is_async: bool
    redactor: Redactor


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
        except BaseException as exc:  # a bug here fails that plugin only
            result = PluginLoadError(
                f"loading failed unexpectedly ({type_name(exc)})", code="plugin_load_error"
            )
        with batch.lock:
            if batch.gave_up():  # too late: the loop reported a timeout for this one
                if not isinstance(result, PluginDError):
                    result.imported.release()
                return
            built[index] = result


def _load_timeout(timeout_s: float) -> PluginLoadError:
    return PluginLoadError(
        f"importing and constructing the plugin took longer than {timeout_s}s",
        code="plugin_load_timeout",
    )


async def call_hook(
    instance: object,
    name: str,
    code: str,
    timeout_s: float,
    redactor: Redactor = NO_REDACTION,
) -> None:
    """Call an optional sync or async hook (`setup`, `teardown`) under the time limit.

    Whatever it raises (a CancelledError of its own too) is a PluginLoadError with `code`
    and the redacted text; only a cancellation of the calling task passes, as itself.
    """
    try:
        hook = getattr(instance, name, None)  # plugin code too (a property), but never awaits
    except BaseException as exc:
        if cancelled_here(exc):  # pragma: no cover - a sync getattr cannot be cancelled
            raise
        raise PluginLoadError(f"{name}() raised {describe(exc, redactor)}", code=code) from exc
    if hook is None:
        return  # the usual case at discovery: no time-limit scope to set up and tear down
    with anyio.move_on_after(timeout_s) as scope:
        try:
            if inspect.iscoroutinefunction(hook):
                outcome = hook()
            else:  # in a worker thread: a time limit or shutdown can abandon a hook that hangs
                # (`captured`: what it raises comes back as a value, never as if this task's)
                outcome = await anyio.to_thread.run_sync(captured(hook), abandon_on_cancel=True)
                if isinstance(outcome, Raised):
                    raise outcome.exc
            if inspect.isawaitable(outcome):
                await outcome
        except BaseException as exc:  # whatever the plugin raises is coded
            if cancelled_here(exc):
                raise  # the time limit (caught by the scope) or a cancellation from outside
            raise PluginLoadError(f"{name}() raised {describe(exc, redactor)}", code=code) from exc
    if scope.cancel_called:  # overran (also when the hook swallowed the cancellation)
        raise PluginLoadError(f"{name}() did not return within {timeout_s}s", code=code)


def _import_and_construct(request: LoadRequest) -> _Built:
    """Import the verified bytes and build the Plugin instance (runs in a worker thread).

    Raises PluginLoadError only: whatever the plugin's code raises is coded here.
    """
    redactor = Redactor(request.config.values())
    try:
        imported = import_bundle(request.root, request.sources, request.entry_point, request.code)
    except BaseException as exc:  # whatever the module code raises is coded
        text = describe(exc, redactor)
        leaf = entry_module_name(request.entry_point).rsplit(".", 1)[-1]
        missing = isinstance(exc, ModuleNotFoundError) and leaf in text
        raise PluginLoadError(
            f"importing {request.entry_point} raised {text}",
            code="plugin_entry_missing" if missing else "plugin_import_failed",
        ) from exc
    try:
        return _construct(imported, request, redactor)
    except BaseException as exc:
        imported.release()
        if isinstance(exc, PluginLoadError):
            raise
        raise PluginLoadError(
            f"Plugin() raised {describe(exc, redactor)}", code="plugin_init_failed"
        ) from exc


def _construct(imported: ImportedBundle, request: LoadRequest, redactor: Redactor) -> _Built:
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
    instance = factory(dict(request.config)) if takes_config(cls) else factory()
    is_async = inspect.iscoroutinefunction(instance.run)
    return _Built(instance, imported, is_async, redactor)


def normalise_result(value: Any) -> RunOutput:
    """Wrap a non-dict result as `{"result": value}`; refuse what JSON cannot encode."""
    result = value if isinstance(value, dict) else {"result": value}
    try:
        text = _ENCODE(result)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PluginResultInvalid(unserialisable(exc)) from exc
    if deeper_than(result, text):
        raise PluginResultInvalid(f"the result is nested deeper than {MAX_RESULT_DEPTH} levels")
    return RunOutput(result, text)
