"""Lifecycle operations on the manager: discover, enable/disable, reload, unload, run."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import anyio
import pytest

from aisoc_plugind.api.errors import status_for
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import (
    PluginDError,
    PluginLoadError,
    PluginNotFound,
    PluginResultInvalid,
    PluginRunError,
    PluginStateConflict,
    PluginTimeout,
)
from tests.conftest import Env, ManagerFactory, PluginFactory


def state_of(env: Env, plugin_id: str = "test.a") -> Path:
    """The plugin's own writable directory (in a host, the only place it may write)."""
    return env.tmp / "state" / plugin_id


TEARDOWN_CODE = """
import pathlib
VERSION = {version!r}
class Plugin:
    def __init__(self, config):
        self.config = config
    async def setup(self):
        pathlib.Path({marker!r}).joinpath("setup-" + VERSION).touch()
    async def teardown(self):
        pathlib.Path({marker!r}).joinpath("teardown-" + VERSION).touch()
    def run(self, payload, context):
        return {{"version": VERSION, "config": self.config}}
"""


async def test_discover_loads_new_plugins_enabled(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """New plugins end `enabled`, with discovered -> loaded -> enabled events."""
    plugins.write("a")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == ["test.a"] and result.failed == []
    record = manager.get("test.a")
    assert record.state.value == "enabled" and record.enabled and record.loaded_at is not None
    lifecycle = [
        e
        for e in env.names()
        if e.startswith("plugin.") and "signature" not in e and not e.startswith("plugin.host.")
    ]
    assert lifecycle == [
        "plugin.discovered",
        "plugin.loaded",
        "plugin.enabled",
    ]


async def test_second_discover_loads_only_new(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A re-scan loads what is new and leaves loaded plugins alone."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    plugins.write("b")
    assert (await manager.discover()).discovered == ["test.b"]


async def test_bad_manifest_is_reported_with_path(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A directory with an invalid manifest is a failure entry with path and error."""
    path = plugins.write("bad", sign=False)
    (path / "plugin.yaml").write_text("id: ../escape\nname: x\nversion: '1'\nplugin_type: x\n")
    manager = await make_manager()
    result = await manager.discover()
    assert result.failed[0].to_json()["path"] == str(path)
    assert result.failed[0].to_json()["code"] == "manifest_invalid"
    assert "plugin.load.failed" in env.names()


async def test_identity_is_manifest_id_not_dirname(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """The directory name plays no part in identity."""
    plugins.write("whatever-dir", plugin_id="acme.real-id")
    manager = await make_manager()
    assert (await manager.discover()).discovered == ["acme.real-id"]


async def test_disable_blocks_runs_and_enable_restores(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """disable keeps the code loaded but refuses runs with plugin_disabled."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    assert (await manager.disable("test.a")).state.value == "disabled"
    with pytest.raises(PluginStateConflict) as info:
        await manager.run("test.a", {})
    assert info.value.code == "plugin_disabled"
    assert (await manager.enable("test.a")).state.value == "enabled"
    assert (await manager.run("test.a", {"x": 1})).result["echo"] == {"x": 1}


async def test_enable_failed_plugin_conflicts(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A failed plugin cannot be enabled (409 in the API)."""
    plugins.write("a", sign=False)
    manager = await make_manager()
    await manager.discover()
    with pytest.raises(PluginStateConflict) as info:
        await manager.enable("test.a")
    assert info.value.code == "plugin_failed" and status_for(info.value) == 409


async def test_unknown_id_is_not_found(make_manager: ManagerFactory) -> None:
    """Every operation on an unknown id raises plugin_not_found."""
    manager = await make_manager()
    for op in (manager.enable, manager.disable, manager.reload, manager.unload, manager.run):
        with pytest.raises(PluginNotFound):
            await op("nope")


async def test_actor_and_request_id_reach_events(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """The caller's identity is on the events of the operation."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    await manager.disable("test.a", Caller(actor="ops", request_id="r-1"))
    event = next(e for e in env.audit_events() if e["event"] == "plugin.disabled")
    assert (event["actor"], event["request_id"], event["from_state"], event["to_state"]) == (
        "ops",
        "r-1",
        "enabled",
        "disabled",
    )


# ---- runs -----------------------------------------------------------------------------

RUN_CASES = {
    "sync": ("def run(self, p, c):\n        return {'ok': p['n'] + 1}", {"ok": 2}),
    "async": ("async def run(self, p, c):\n        return {'ok': p['n'] * 2}", {"ok": 2}),
    "scalar": ("def run(self, p, c):\n        return 42", {"result": 42}),
    "list": ("async def run(self, p, c):\n        return [1, 2]", {"result": [1, 2]}),
    "none": ("def run(self, p, c):\n        return None", {"result": None}),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
async def test_run_results(case: str, plugins: PluginFactory, make_manager: ManagerFactory) -> None:
    """Sync and async run work; non-dict results are wrapped as {"result": value}."""
    body, expected = RUN_CASES[case]
    plugins.write("a", code=f"class Plugin:\n    {body}\n")
    manager = await make_manager()
    await manager.discover()
    result = await manager.run("test.a", {"n": 1})
    assert result.result == expected and result.duration_ms >= 0


@pytest.mark.parametrize(
    ("body", "error", "code"),
    [
        ("def run(self, p, c):\n        raise ValueError('boom')", PluginRunError, "plugin_error"),
        ("async def run(self, p, c):\n        raise KeyError('k')", PluginRunError, "plugin_error"),
        ("def run(self, p, c):\n        raise SystemExit(3)", PluginRunError, "plugin_error"),
        (
            "def run(self, p, c):\n        return {'x': object()}",
            PluginResultInvalid,
            "plugin_result_invalid",
        ),
        (
            "def run(self, p, c):\n        return {'x': float('nan')}",
            PluginResultInvalid,
            "plugin_result_invalid",
        ),
    ],
)
async def test_run_failures_have_distinct_codes(
    body: str,
    error: type[Exception],
    code: str,
    env: Env,
    plugins: PluginFactory,
    make_manager: ManagerFactory,
) -> None:
    """A raising or badly-returning plugin gives its own code; the daemon carries on."""
    plugins.write("a", code=f"class Plugin:\n    {body}\n")
    manager = await make_manager()
    await manager.discover()
    with pytest.raises(error) as info:
        await manager.run("test.a", {})
    assert info.value.code == code
    assert env.audit_events()[-1]["event"] == "plugin.run.failed"
    assert env.audit_events()[-1]["error_code"] == code


async def test_async_plugin_that_never_returns_times_out(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """An async run that hangs is cut off at run_timeout_s with plugin_timeout."""
    plugins.write(
        "a",
        code="import asyncio\nclass Plugin:\n    async def run(self, p, c):\n"
        "        await asyncio.Event().wait()\n",
    )
    manager = await make_manager(run_timeout_s=0.3)
    await manager.discover()
    with pytest.raises(PluginTimeout) as info:
        await manager.run("test.a", {})
    assert status_for(info.value) == 504
    assert manager.inflight == 0


async def test_sync_plugin_that_sleeps_keeps_loop_responsive(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A blocking sync run goes to a worker thread: other tasks keep running meanwhile."""
    plugins.write(
        "slow",
        code="import time\nclass Plugin:\n    def run(self, p, c):\n"
        "        time.sleep(0.5)\n        return {'slept': True}\n",
    )
    plugins.write("fast")
    manager = await make_manager()
    await manager.discover()
    ticks: list[float] = []
    fast_done: list[float] = []

    async def ticker() -> None:
        for _ in range(10):
            ticks.append(time.monotonic())
            await anyio.sleep(0.02)

    async def fast() -> None:
        await anyio.sleep(0.05)
        await manager.run("test.fast", {})
        fast_done.append(time.monotonic())

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(fast)
        result = await manager.run("test.slow", {})
    slow_done = time.monotonic()
    assert result.result == {"slept": True}
    assert len(ticks) == 10 and fast_done and fast_done[0] < slow_done
    assert ticks[-1] - start < 0.5  # the ticker never waited for the sleeping plugin


async def test_sync_plugin_over_time_limit_times_out(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A sync run past the limit is answered plugin_timeout (its thread is abandoned)."""
    plugins.write(
        "a", code="import time\nclass Plugin:\n    def run(self, p, c):\n        time.sleep(1)\n"
    )
    manager = await make_manager(run_timeout_s=0.2)
    await manager.discover()
    with pytest.raises(PluginTimeout):
        await manager.run("test.a", {})


# ---- load failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code_text", "error_code"),
    [
        ("raise RuntimeError('at import')\n", "plugin_import_failed"),
        ("def broken(:\n", "plugin_import_failed"),
        ("import sys\nsys.exit(1)\n", "plugin_import_failed"),
        ("X = 1\n", "plugin_class_missing"),
        (
            "class Plugin:\n    def __init__(self):\n        raise ValueError('init')\n"
            "    def run(self, p, c): return {}\n",
            "plugin_init_failed",
        ),
        (
            "class Plugin:\n    async def setup(self):\n        raise ValueError('setup')\n"
            "    def run(self, p, c): return {}\n",
            "plugin_setup_failed",
        ),
    ],
)
async def test_plugin_raising_while_loading_fails_cleanly(
    code_text: str, error_code: str, env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Raising in module code, __init__ or setup ends `failed` with a code; others still load."""
    plugins.write("bad", code=code_text)
    plugins.write("good")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == ["test.good"]
    record = manager.get("test.bad")
    assert record.state.value == "failed"
    assert record.error is not None and record.error["code"] == error_code
    assert not [n for n in sys.modules if n.startswith("_aisoc_plugins.") and "bad" in n]


async def test_plugin_gets_its_config(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Plugin(config) receives [plugin_config."<id>"]."""
    plugins.write("a", code=TEARDOWN_CODE.format(version="1", marker=str(state_of(env))))
    manager = await make_manager(plugin_config={"test.a": {"api_key": "k"}})
    await manager.discover()
    assert (await manager.run("test.a", {})).result["config"] == {"api_key": "k"}


async def test_config_not_matching_schema_fails_load(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A plugin_config that violates the manifest's config_schema fails the load, clearly."""
    schema = {"type": "object", "properties": {"port": {"type": "integer"}}}
    plugins.write("a", manifest_extra={"config_schema": schema})
    manager = await make_manager(plugin_config={"test.a": {"port": "eighty"}})
    await manager.discover()
    error = manager.get("test.a").error
    assert error is not None and error["code"] == "plugin_config_invalid"


# ---- duplicates and vanished directories ---------------------------------------------------


async def test_duplicate_id_first_wins(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """The second directory with an id is failed with both paths named."""
    first = plugins.write("a1", plugin_id="acme.dup")
    second = plugins.write("a2", plugin_id="acme.dup")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == ["acme.dup"]
    assert manager.get("acme.dup").path == str(first)
    failure = result.failed[0].to_json()
    assert failure["code"] == "duplicate_id"
    assert str(first) in failure["error"] and str(second) in failure["error"]
    assert "plugin.duplicate_id" in env.names()
    dup_records = [r for r in manager.records(state="failed") if r.path == str(second)]
    assert dup_records and dup_records[0].error is not None


async def test_vanished_directory_stays_loaded_and_flagged(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A deleted directory keeps serving from memory and is flagged on the record."""
    path = plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    shutil.rmtree(path)
    await manager.discover()
    record = manager.get("test.a")
    assert record.path_missing and record.state.value == "enabled"
    assert (await manager.run("test.a", {})).result["version"] == "1.0.0"
    assert "plugin.path.missing" in env.names()


# ---- reload -------------------------------------------------------------------------------


async def test_reload_swaps_in_new_code(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """reload re-reads from disk; the new version serves; the old one is torn down."""
    plugins.write("a", code=TEARDOWN_CODE.format(version="1", marker=str(state_of(env))))
    manager = await make_manager()
    await manager.discover()
    plugins.write(
        "a", version="2.0.0", code=TEARDOWN_CODE.format(version="2", marker=str(state_of(env)))
    )
    record = await manager.reload("test.a")
    assert record.version == "2.0.0"
    assert (await manager.run("test.a", {})).result["version"] == "2"
    assert (state_of(env) / "setup-2").exists() and (state_of(env) / "teardown-1").exists()
    completed = [e for e in env.audit_events() if e["event"] == "plugin.reload.completed"]
    assert completed[0]["from_version"] == "1.0.0" and completed[0]["version"] == "2.0.0"


async def test_reload_preserves_disabled(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A disabled plugin stays disabled across reload."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    await manager.disable("test.a")
    plugins.write("a", version="2.0.0")
    assert (await manager.reload("test.a")).state.value == "disabled"


@pytest.mark.parametrize("breakage", ["unsigned", "tampered", "syntax", "setup_raises"])
async def test_failed_reload_keeps_old_version_serving(
    breakage: str, env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """When the new code fails to verify or import, the old version keeps serving."""
    path = plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    if breakage == "unsigned":
        plugins.write("a", version="2.0.0", sign=False)
    elif breakage == "tampered":
        (path / "plugin.py").write_text("VERSION = 'evil'\n" + (path / "plugin.py").read_text())
    elif breakage == "syntax":
        plugins.write("a", version="2.0.0", code="def (:\n")
    else:
        plugins.write(
            "a",
            version="2.0.0",
            code="class Plugin:\n    async def setup(self):\n"
            "        raise OSError('no db')\n    def run(self, p, c): return {}\n",
        )
    with pytest.raises(PluginDError) as info:
        await manager.reload("test.a")
    assert status_for(info.value) in (409, 422)
    record = manager.get("test.a")
    assert record.state.value == "enabled" and record.version == "1.0.0"
    assert record.error is not None
    assert (await manager.run("test.a", {})).result["version"] == "1.0.0"
    assert "plugin.reload.failed" in env.names()


async def test_reload_after_fix_clears_error(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A successful reload after a failed one clears the record's error."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    plugins.write("a", version="2.0.0", sign=False)
    with pytest.raises(PluginDError, match="unsigned"):
        await manager.reload("test.a")
    plugins.write("a", version="2.0.0")
    record = await manager.reload("test.a")
    assert record.error is None and record.version == "2.0.0"


async def test_reload_of_failed_plugin_retries_it(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """reload on a failed plugin loads it afresh once the files are fixed."""
    plugins.write("a", sign=False)
    manager = await make_manager()
    await manager.discover()
    plugins.write("a")
    assert (await manager.reload("test.a")).state.value == "enabled"


async def test_in_flight_run_finishes_on_old_version(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A run in flight during a reload completes on the version it started on."""
    slow = (
        "import asyncio\nVERSION = {v!r}\nclass Plugin:\n    async def run(self, p, c):\n"
        "        await asyncio.sleep(p.get('wait', 0))\n        return {{'v': VERSION}}\n"
    )
    plugins.write("a", code=slow.format(v="old"))
    manager = await make_manager()
    await manager.discover()
    results: list[str] = []

    async def long_run() -> None:
        results.append((await manager.run("test.a", {"wait": 0.3})).result["v"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_run)
        await anyio.sleep(0.05)
        plugins.write("a", version="2.0.0", code=slow.format(v="new"))
        await manager.reload("test.a")
        results.append((await manager.run("test.a", {})).result["v"])
    assert sorted(results) == ["new", "old"]


async def test_upgrade_into_new_directory(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Seed upgrade flow: new version in a new dir, old dir removed, reload -> new code."""
    old = plugins.write("shodan-1", plugin_id="acme.shodan", version="1.0.0")
    manager = await make_manager()
    await manager.discover()
    new = plugins.write("shodan-2", plugin_id="acme.shodan", version="2.0.0")
    shutil.rmtree(old)
    record = await manager.reload("acme.shodan")
    assert record.version == "2.0.0" and record.path == str(new) and not record.path_missing
    assert (await manager.run("acme.shodan", {})).result["version"] == "2.0.0"


async def test_reload_with_directory_gone_keeps_serving(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Reload with no directory for the id fails plugin_dir_missing; old code serves on."""
    path = plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    shutil.rmtree(path)
    with pytest.raises(PluginLoadError) as info:
        await manager.reload("test.a")
    assert info.value.code == "plugin_dir_missing"
    assert (await manager.run("test.a", {})).result["version"] == "1.0.0"


# ---- unload -------------------------------------------------------------------------------


async def test_unload_tears_down_and_keeps_files(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """unload calls teardown, frees the modules, leaves files, and discovery reloads it."""
    path = plugins.write("a", code=TEARDOWN_CODE.format(version="1", marker=str(state_of(env))))
    manager = await make_manager()
    await manager.discover()
    record = await manager.unload("test.a")
    assert record.state.value == "unloaded" and path.joinpath("plugin.py").exists()
    assert (state_of(env) / "teardown-1").exists()
    assert not [
        n
        for n in sys.modules
        if n.startswith("_aisoc_plugins.g")
        and sys.modules[n].__dict__.get("VERSION") == "1"
        and "test" in str(sys.modules[n].__file__ or "")
    ]
    with pytest.raises(PluginStateConflict) as info:
        await manager.run("test.a", {})
    assert info.value.code == "plugin_unloaded"
    assert (await manager.discover()).discovered == ["test.a"]


async def test_teardown_failure_is_an_event_not_a_crash(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A raising teardown is reported and the unload still completes."""
    plugins.write(
        "a",
        code="class Plugin:\n    async def teardown(self):\n"
        "        raise RuntimeError('x')\n    def run(self, p, c): return {}\n",
    )
    manager = await make_manager()
    await manager.discover()
    await manager.unload("test.a")
    assert "plugin.teardown.failed" in env.names()


async def test_warn_mode_reload_to_unsigned_is_allowed(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """In warn mode an unsigned new version loads (status unsigned)."""
    plugins.write("a")
    manager = await make_manager(TrustMode.WARN)
    await manager.discover()
    plugins.write("a", version="2.0.0", sign=False)
    assert (await manager.reload("test.a")).signature_status == "unsigned"


async def test_strict_refuses_enabling_a_plugin_whose_key_was_revoked(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """After the signing key is removed (disabled by SIGHUP's re-check), enable is refused."""
    from aisoc_plugind.engine.keyring import load_keyring

    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    (env.keys / "vector-signer.pem").unlink()
    assert await manager.adopt_keyring(load_keyring(env.keys)) == ["test.a"]
    assert manager.get("test.a").state.value == "disabled"
    with pytest.raises(PluginStateConflict) as info:
        await manager.enable("test.a")
    assert info.value.code == "plugin_untrusted"
    with pytest.raises(PluginStateConflict):
        await manager.run("test.a", {})


async def test_run_failure_event_never_quotes_the_payload(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A plugin whose exception text echoes the payload: the caller and the audit get the
    exception's type only."""
    plugins.write(
        "a",
        code="class Plugin:\n    def run(self, p, c):\n"
        "        raise ValueError('bad ip ' + p['ip'])\n",
    )
    manager = await make_manager()
    await manager.discover()
    with pytest.raises(PluginRunError) as info:
        await manager.run("test.a", {"ip": "10.66.77.88"})
    assert info.value.message == "plugin raised ValueError"
    assert "10.66.77.88" not in env.audit_text() + env.stdout.getvalue()
    assert env.audit_events()[-1]["error"] == "plugin raised ValueError"


async def test_reload_of_failed_plugin_from_a_new_directory(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A failed plugin whose fixed copy lives in a new directory reloads from there."""
    old = plugins.write("v1", plugin_id="acme.moved", sign=False)
    manager = await make_manager()
    await manager.discover()
    shutil.rmtree(old)
    new = plugins.write("v2", plugin_id="acme.moved", version="2.0.0")
    record = await manager.reload("acme.moved")
    assert (record.state.value, record.path, record.version) == ("enabled", str(new), "2.0.0")


async def test_failed_retry_keeps_a_record(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A retry that still fails leaves the plugin known (failed), never forgotten."""
    path = plugins.write("a", sign=False)
    manager = await make_manager()
    await manager.discover()
    (path / "plugin.yaml").write_text("id: [broken\n")
    with pytest.raises(PluginDError):
        await manager.reload("test.a")
    assert manager.get("test.a").state.value == "failed"


async def test_sync_dir_skips_an_unchanged_directory(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """The watcher's sync of a directory whose bytes did not change reloads nothing."""
    path = plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    (path / "plugin.py").touch()
    await manager.sync_dir(path)
    assert "plugin.reload.completed" not in env.names()
    plugins.write("a", version="2.0.0")
    await manager.sync_dir(path)
    assert manager.get("test.a").version == "2.0.0"
    assert env.names().count("plugin.reload.completed") == 1


async def test_sync_dir_retries_after_a_failed_reload(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Old version serving with an error: a sync of the same bytes retries, not skips."""
    path = plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    plugins.write("a", version="2.0.0", sign=False)
    with pytest.raises(PluginDError):  # refused: unsigned; 1.0.0 serves on with the error
        await manager.sync_dir(path)
    assert manager.get("test.a").error is not None
    plugins.write("a", version="2.0.0")
    await manager.sync_dir(path)
    record = manager.get("test.a")
    assert (record.version, record.error) == ("2.0.0", None)


# ---- red-team regressions -------------------------------------------------------------------


async def test_deeply_nested_manifest_fails_only_its_directory(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """2000 nested brackets: that directory fails (manifest_too_deep), discovery carries on."""
    bad = plugins.write("deep", sign=False)
    (bad / "plugin.yaml").write_bytes(b"id: " + b"[" * 2000 + b"]" * 2000 + b"\n")
    plugins.write("good")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == ["test.good"]
    assert [(str(f.path), f.error.code) for f in result.failed] == [(str(bad), "manifest_too_deep")]


async def test_config_values_never_appear_in_errors_or_events(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A plugin_config failing its schema is reported by path and keyword, never by value."""
    schema = {
        "type": "object",
        "properties": {"api_key": {"type": "string", "pattern": "^sk-[0-9]+$"}},
    }
    plugins.write("a", manifest_extra={"config_schema": schema})
    manager = await make_manager(plugin_config={"test.a": {"api_key": "SUPERSECRET-live-1"}})
    await manager.discover()
    error = manager.get("test.a").error
    assert error is not None and error["code"] == "plugin_config_invalid"
    assert "$.api_key" in error["message"] and "pattern" in error["message"]
    assert "SUPERSECRET" not in str(error) + env.audit_text() + env.stdout.getvalue()


@pytest.mark.parametrize(
    "schema", [{"$ref": "#/$defs/nope"}, {"$ref": "#"}, {"$ref": "urn:example:elsewhere"}]
)
async def test_unusable_config_schema_fails_that_plugin_only(
    schema: dict[str, str], plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A $ref that does not resolve (or loops) fails the plugin, not discovery."""
    plugins.write("a", manifest_extra={"config_schema": schema})
    plugins.write("good")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == ["test.good"]
    error = manager.get("test.a").error
    assert error is not None and error["code"] == "manifest_bad_config_schema"


async def test_config_schema_never_fetches_a_remote_ref(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A manifest cannot make the daemon send requests: a remote $ref is not retrieved."""
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "object"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/schema.json"
        plugins.write("a", manifest_extra={"config_schema": {"$ref": url}})
        manager = await make_manager()
        await manager.discover()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert hits == []
    error = manager.get("test.a").error
    assert error is not None and error["code"] == "manifest_bad_config_schema"


async def test_second_directory_for_an_unloaded_id_is_reported(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """An id whose plugin was unloaded (dir still there) is not silently claimed by another."""
    plugins.write("b-first", plugin_id="acme.x")
    manager = await make_manager()
    await manager.discover()
    await manager.unload("acme.x")
    claimant = plugins.write("a-claimant", plugin_id="acme.x")
    result = await manager.discover()
    assert result.discovered == ["acme.x"]
    assert manager.get("acme.x").path == str(env.plugins / "b-first")
    assert [str(f.path) for f in result.failed] == [str(claimant)]
    assert "plugin.duplicate_id" in env.names()


async def test_bad_entry_deep_inside_fails_only_that_reload(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A FIFO planted in a subpackage fails that plugin's reload; other plugins serve on."""
    path = plugins.write("a", files={"pkg/__init__.py": ""})
    plugins.write("good")
    manager = await make_manager()
    await manager.discover()
    shutil.rmtree(path / "pkg")
    (path / "pkg").mkdir()
    os.mkfifo(path / "pkg" / "x.py")  # an unreadable entry deep inside
    with pytest.raises(PluginDError) as info:
        await manager.reload("test.a")
    assert info.value.code == "bundle_not_regular"
    assert (await manager.run("test.good", {})).result["version"] == "1.0.0"
