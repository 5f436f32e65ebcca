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
from collections.abc import Callable
from typing import Any, cast

import anyio

from aisoc_plugind.core.contract import Plugin
from aisoc_plugind.engine.hosts import HostInfo, LoadedPlugin, LoadRequest
from aisoc_plugind.engine.hosts.loader import ImportedBundle, entry_module_name, import_bundle
from aisoc_plugind.errors import (
    PluginLoadError,
    PluginResultInvalid,
    PluginRunError,
    PluginTimeout,
)

__all__ = ["InProcessHost", "InProcessPlugin", "call_hook", "describe", "normalise_result"]

# Exceptions a plugin may raise that must not end the daemon (sys.exit() in a plugin, ...).
PLUGIN_FAULTS = (Exception, SystemExit, KeyboardInterrupt)
MAX_ERROR_TEXT = 500


class InProcessPlugin:
    """A plugin instance living in the daemon, with the modules it was imported as."""

    def __init__(
        self,
        instance: Plugin,
        imported: ImportedBundle,
        host: HostInfo,
        timeout_s: float,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.instance = instance
        self._imported = imported
        self._host = host
        self._timeout_s = timeout_s
        self._limiter = limiter

    @property
    def host(self) -> HostInfo:
        """Return the daemon itself as the host."""
        return self._host

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Call `run(payload, context)` under the time limit; translate what it raises."""
        run: Callable[..., Any] = self.instance.run
        try:
            with anyio.fail_after(self._timeout_s):
                if inspect.iscoroutinefunction(run):
                    value = await run(payload, context)
                else:
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
            raise PluginLoadError(
                f"importing and constructing the plugin took longer than {self._timeout_s}s",
                code="plugin_load_timeout",
            ) from exc
        try:
            await call_hook(instance, "setup", "plugin_setup_failed", self._timeout_s)
        except PluginLoadError:
            imported.release()
            raise
        return InProcessPlugin(instance, imported, self._info, self._timeout_s, self._limiter)

    async def aclose(self) -> None:
        """Nothing to release: plugins free their own modules at teardown."""


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
        imported = import_bundle(request.root, request.sources, request.entry_point)
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
        instance = factory(dict(request.config)) if _takes_config(cls) else factory()
    except PLUGIN_FAULTS as exc:
        raise PluginLoadError(
            f"Plugin() raised {describe(exc)}", code="plugin_init_failed"
        ) from exc
    return instance


def _takes_config(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


def normalise_result(value: Any) -> dict[str, Any]:
    """Wrap a non-dict result as `{"result": value}`; refuse what JSON cannot encode."""
    result = value if isinstance(value, dict) else {"result": value}
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PluginResultInvalid(f"the result is not JSON-serialisable: {exc}") from exc
    return result


def describe(exc: BaseException) -> str:
    """Return `Type: text` of a plugin's exception, cut at 500 characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"
