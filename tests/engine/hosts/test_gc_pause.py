"""A discovery loads with the garbage collector paused (profiled: about half of a host's bulk
load was the collector walking the growing set of plugin objects), and the collector is on
again once the plugins are loaded: in the daemon (in-process mode) and in a plugin host."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import ManagerFactory, PluginFactory

PROBE = textwrap.dedent(
    """
    import gc
    AT_IMPORT = gc.isenabled()
    class Plugin:
        def run(self, payload, context):
            return {"at_import": AT_IMPORT, "now": gc.isenabled()}
    """
)


@pytest.mark.parametrize("mode", ["process", "none"])
async def test_a_discovery_pauses_the_collector_and_turns_it_back_on(
    plugins: PluginFactory, make_manager: ManagerFactory, mode: str
) -> None:
    for n in range(3):
        plugins.write(f"probe{n}", plugin_id=f"test.probe{n}", code=PROBE)
    manager = await make_manager(isolation_mode=mode)
    await manager.discover()
    for n in range(3):
        result = (await manager.run(f"test.probe{n}", {})).result
        assert result == {"at_import": False, "now": True}


async def test_a_single_load_into_a_host_turns_it_back_on_too(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A plugin loaded after start (the watcher's path, not a discovery) in a plugin host."""
    manager = await make_manager(isolation_mode="process", isolation_group="plugin")
    await manager.discover()
    path = plugins.write("late", plugin_id="test.late", code=PROBE)
    await manager.sync_dir(path)
    assert (await manager.run("test.late", {})).result == {"at_import": False, "now": True}
