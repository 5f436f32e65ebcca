"""Reloads while runs are in flight (manager level): no run fails, each sees one whole version.

The HTTP variant (clients calling `/run` over the control API during the reloads) builds on
this once the API component is wired into the service.
"""

from __future__ import annotations

from typing import Any

import anyio

from tests.conftest import Env, ManagerFactory, PluginFactory

RELOADS = 50
RUNNERS = 8

# A run spans several event-loop turns, so reloads land while it is in flight; a version
# torn down under a running call would make the run fail.
LOAD_CODE = """
import anyio

VERSION = {version!r}


class Plugin:
    def __init__(self):
        self.closed = False

    async def teardown(self):
        self.closed = True

    async def run(self, payload, context):
        for _ in range(3):
            await anyio.sleep(0)
            if self.closed:
                raise RuntimeError("torn down while a run was in flight")
        return {{"version": VERSION}}
"""


async def test_fifty_reloads_under_concurrent_runs_lose_no_call(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Every run succeeds and returns a version that was live; reloads all complete."""
    plugins.write("a", version="1.0.0", code=LOAD_CODE.format(version="1.0.0"))
    manager = await make_manager()
    await manager.discover()
    written = {"1.0.0"}
    results: list[str] = []
    failures: list[BaseException] = []
    reloading_done = anyio.Event()

    async def runner() -> None:
        while not reloading_done.is_set():
            try:
                outcome = await manager.run("test.a", {"n": len(results)})
            except Exception as exc:
                failures.append(exc)
            else:
                results.append(outcome.result["version"])

    async def reloader() -> None:
        for i in range(1, RELOADS + 1):
            version = f"2.0.{i}"
            plugins.write("a", version=version, code=LOAD_CODE.format(version=version))
            written.add(version)
            record = await manager.reload("test.a")
            assert record.version == version
            await anyio.sleep(0)  # let runners start calls on the new version
        reloading_done.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(RUNNERS):
                tg.start_soon(runner)
            tg.start_soon(reloader)

    assert failures == []
    assert results, "no run completed"
    assert set(results) <= written
    assert len(set(results)) > 1  # runs really spanned several versions
    assert manager.get("test.a").version == f"2.0.{RELOADS}"


async def test_in_flight_run_finishes_on_the_version_it_started_on(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A run that started before a reload returns the old version; the next gets the new.

    The plugin runs in a host process: it says it started, and waits to be released, through
    files in its own state directory (the one place it may write).
    """
    code = """
import asyncio, os
VERSION = {version!r}
class Plugin:
    async def run(self, payload, context):
        if "hold" in payload:
            where = payload["hold"]
            open(os.path.join(where, "started"), "w").close()
            while not os.path.exists(os.path.join(where, "release")):
                await asyncio.sleep(0.01)
        return {{"version": VERSION}}
"""
    plugins.write("a", version="1.0.0", code=code.format(version="1.0.0"))
    manager = await make_manager()
    await manager.discover()
    state = env.tmp / "state" / "test.a"
    held: dict[str, Any] = {}

    async def long_run() -> None:
        outcome = await manager.run("test.a", {"hold": str(state)})
        held.update(outcome.result)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(long_run)
            while not (state / "started").exists():
                await anyio.sleep(0.01)
            plugins.write("a", version="2.0.0", code=code.format(version="2.0.0"))
            await manager.reload("test.a")
            assert (await manager.run("test.a")).result["version"] == "2.0.0"
            (state / "release").touch()
    assert held["version"] == "1.0.0"
