"""The engine's plugin boundaries hold even when a host lets a plugin's exception through.

The hosts code whatever plugin code raises; these tests give the engine a host that does not
(a broken host is the one fault that cannot be caused for real) and check that each boundary
(load, reload, run, teardown, the watcher's sync) still ends in a coded error and its event,
while a real cancellation of the caller still passes as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.audit.names import WATCHER_ERROR
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.hosts import HostInfo, LoadedPlugin, LoadRequest, RunOutput
from aisoc_plugind.engine.hosts.inprocess import InProcessHost
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.errors import PluginDError, PluginLoadError, PluginRunError
from tests.conftest import Env, PluginFactory
from tests.service.test_watcher import watching


class Custom(BaseException):
    """A BaseException no host knows."""


class LeakyPlugin:
    """A loaded plugin whose calls raise what they are told to, as a broken host would."""

    def __init__(self, inner: LoadedPlugin, host: LeakyHost) -> None:
        self._inner = inner
        self._leaks = host.leaks
        self._owner = host

    @property
    def host(self) -> HostInfo:
        return self._inner.host

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        if "run" in self._leaks:
            raise self._leaks["run"]
        if self._owner.hang:
            await anyio.sleep(30)
        return await self._inner.run(payload, context)

    async def teardown(self) -> None:
        await self._inner.teardown()
        if "teardown" in self._leaks:
            raise self._leaks["teardown"]


class LeakyHost(InProcessHost):
    """An in-process host that lets the given exceptions escape at the given steps."""

    def __init__(self) -> None:
        super().__init__(timeout_s=2, concurrency=2)
        self.leaks: dict[str, BaseException] = {}
        self.hang = False  # runs sleep (until cancelled)

    async def load(self, request: LoadRequest) -> LoadedPlugin:
        if "load" in self.leaks:
            raise self.leaks["load"]
        return LeakyPlugin(await super().load(request), self)

    async def load_many(self, requests: Sequence[LoadRequest]) -> list[LoadedPlugin | PluginDError]:
        if "load" in self.leaks:
            raise self.leaks["load"]
        loaded = await super().load_many(requests)
        return [o if isinstance(o, PluginDError) else LeakyPlugin(o, self) for o in loaded]


LEAKS: dict[str, Callable[[], BaseException]] = {
    "exit": lambda: SystemExit(2),
    "keyboard": KeyboardInterrupt,
    "generator": GeneratorExit,
    "cancelled": asyncio.CancelledError,  # raised, not delivered: nobody cancelled us
    "custom": lambda: Custom("x"),
    "error": lambda: ZeroDivisionError("host bug"),
}


@asynccontextmanager
async def _manager(env: Env, host: LeakyHost) -> AsyncIterator[PluginManager]:
    settings = env.settings(trust_mode=TrustMode.STRICT)
    async with PluginManager(
        settings, env.events(), load_keyring(settings.keys_dir), host=host
    ) as manager:
        yield manager


@pytest.mark.parametrize("leak", list(LEAKS))
async def test_a_host_that_leaks_at_load_fails_each_plugin_with_a_code(
    env: Env, plugins: PluginFactory, leak: str
) -> None:
    """Discovery goes on: each plugin of the batch is `failed` with `plugin_load_error`."""
    plugins.write("a")
    plugins.write("b")
    host = LeakyHost()
    host.leaks["load"] = LEAKS[leak]()
    async with _manager(env, host) as manager:
        result = await manager.discover()
        assert sorted(r.error.code for r in result.failed) == ["plugin_load_error"] * 2
        assert {manager.get(i).state.value for i in ("test.a", "test.b")} == {"failed"}
        assert env.names().count("plugin.load.failed") == 2


@pytest.mark.parametrize("leak", list(LEAKS))
async def test_a_host_that_leaks_at_reload_keeps_the_old_version(
    env: Env, plugins: PluginFactory, leak: str
) -> None:
    """The reload fails with a code and `plugin.reload.failed`; the old version serves."""
    plugins.write("a")
    host = LeakyHost()
    async with _manager(env, host) as manager:
        await manager.discover()
        host.leaks["load"] = LEAKS[leak]()
        with pytest.raises(PluginLoadError) as caught:
            await manager.reload("test.a")
        assert caught.value.code == "plugin_load_error"
        assert "plugin.reload.failed" in env.names()
        del host.leaks["load"]
        assert (await manager.run("test.a", {})).result["version"] == "1.0.0"


@pytest.mark.parametrize("leak", list(LEAKS))
async def test_a_host_that_leaks_at_run_gives_a_coded_failure_and_an_event(
    env: Env, plugins: PluginFactory, leak: str
) -> None:
    """The run is a PluginRunError naming the type, with `plugin.run.failed`."""
    plugins.write("a")
    host = LeakyHost()
    async with _manager(env, host) as manager:
        await manager.discover()
        host.leaks["run"] = exc = LEAKS[leak]()
        with pytest.raises(PluginRunError) as caught:
            await manager.run("test.a", {})
        assert caught.value.message == f"plugin raised {type(exc).__name__}"
        failed = [e for e in env.audit_events() if e["event"] == "plugin.run.failed"]
        assert failed[-1]["error"] == f"plugin raised {type(exc).__name__}"


@pytest.mark.parametrize("leak", list(LEAKS))
async def test_a_host_that_leaks_at_teardown_still_unloads(
    env: Env, plugins: PluginFactory, leak: str
) -> None:
    """The unload completes; `plugin.teardown.failed` says why."""
    plugins.write("a")
    host = LeakyHost()
    async with _manager(env, host) as manager:
        await manager.discover()
        host.leaks["teardown"] = LEAKS[leak]()
        assert (await manager.unload("test.a")).state.value == "unloaded"
        torn = [e for e in env.audit_events() if e["event"] == "plugin.teardown.failed"]
        assert torn[-1]["error_code"] == "plugin_teardown_failed"


async def test_a_real_cancellation_of_a_run_still_passes(env: Env, plugins: PluginFactory) -> None:
    """A caller's cancel scope ends a run as a cancellation, never as a plugin error."""
    plugins.write("a")
    host = LeakyHost()
    async with _manager(env, host) as manager:
        await manager.discover()
        host.hang = True
        try:
            with anyio.move_on_after(0.1) as scope:
                await manager.run("test.a", {})
            assert scope.cancelled_caught
            assert "plugin.run.failed" not in env.names()
        finally:
            host.hang = False


@pytest.mark.parametrize("leak", ["exit", "keyboard", "cancelled", "custom"])
async def test_the_watcher_reports_a_sync_that_raises_and_keeps_watching(
    env: Env, plugins: PluginFactory, leak: str
) -> None:
    """A sync that lets anything through is a `watcher.error`; the next change is synced."""
    async with watching(env) as watched:
        real = watched.manager.sync_dir
        raised: list[Path] = []

        async def once_broken(path: Path, caller: Any = None) -> None:
            if not raised:
                raised.append(path)
                raise LEAKS[leak]()
            await real(path, caller)

        watched.manager.sync_dir = once_broken  # type: ignore[method-assign]
        plugins.write("first")
        error = await watched.wait_for(WATCHER_ERROR, error_code="watcher_internal_error")
        assert error["path"].endswith("first")
        plugins.write("second")
        await watched.wait_for("plugin.enabled", plugin_id="test.second")
