"""Whatever plugin code raises, at whichever entry point, ends in that plugin's coded failure.

`SystemExit`, `KeyboardInterrupt`, `GeneratorExit`, a plugin's own `asyncio.CancelledError`,
custom `BaseException` subclasses, and exceptions whose `__str__` raises or returns 10 MB, at
import, `Plugin(config)`, `setup`, `run` and `teardown` (sync and async), in both isolation
modes: a failed load is `failed` with a code and `plugin.load.failed`, a failed run is answered
`502 plugin_error` with `plugin.run.failed`, a failed teardown is `plugin.teardown.failed` and
the unload completes. The daemon reaches READY with all of them present and keeps serving; the
file watcher survives hot-reloading them.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTOR_PUB, sign_dir
from tests.live import LiveDaemon, live_daemon

# kind -> (the statement that raises, the type name a run failure reports)
KINDS: dict[str, tuple[str, str]] = {
    "exit": ("raise SystemExit(3)", "SystemExit"),
    "keyboard": ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    "generator": ("raise GeneratorExit", "GeneratorExit"),
    "cancelled": ("raise asyncio.CancelledError()", "CancelledError"),
    "custom": ("raise Custom('custom')", "Custom"),
    "strraises": ("raise StrRaises()", "StrRaises"),
    "hugestr": ("raise HugeStr()", "HugeStr"),
}
LOADS = {
    "import": "plugin_import_failed",
    "init": "plugin_init_failed",
    "setup": "plugin_setup_failed",
    "setup_async": "plugin_setup_failed",
}
RUNS = ("run", "run_async")
TEARDOWNS = ("teardown", "teardown_async")
WHERES = (*LOADS, *RUNS, *TEARDOWNS)

TEMPLATE = """
import asyncio

class Custom(BaseException):
    pass

class StrRaises(Exception):
    def __str__(self):
        raise KeyboardInterrupt
    __repr__ = __str__

class HugeStr(Exception):
    def __str__(self):
        return "h" * 10_000_000

{module}

class Plugin:
    def __init__(self, config):
        self.config = config
        {init}

    {setup_async}def setup(self):
        {setup}

    {run_async}def run(self, payload, context):
        {run}
        return {{"ok": True}}

    {teardown_async}def teardown(self):
        {teardown}
"""


def plugin_code(kind: str | None, where: str | None) -> str:
    """Return a plugin module that raises `kind` at `where` (or nowhere)."""
    statement = KINDS[kind][0] if kind else "pass"
    step = (where or "").removesuffix("_async")
    slots = {name: "pass" for name in ("init", "setup", "run", "teardown")}
    asyncs = {f"{name}_async": "" for name in ("setup", "run", "teardown")}
    if where and where.endswith("_async"):
        asyncs[f"{step}_async"] = "async "
    module = statement if step == "import" else ""
    if step in slots:
        slots[step] = statement
    return TEMPLATE.format(module=module, **slots, **asyncs)


def write_plugin(
    root: Path, plugin_id: str, code: str, *, version: str = "1.0.0", dirname: str | None = None
) -> Path:
    """Write and sign a plugin directory (built aside, then moved into `root` whole)."""
    staging = root.parent / f".staging-{plugin_id}"
    staging.mkdir()
    manifest = {"id": plugin_id, "name": plugin_id, "version": version, "plugin_type": "enricher"}
    (staging / "plugin.yaml").write_text(json.dumps(manifest))
    (staging / "plugin.py").write_text(textwrap.dedent(code))
    sign_dir(staging)
    target = root / (dirname or plugin_id)
    if target.exists():  # a new version of a watched plugin: its files, replaced one by one
        for name in ("plugin.yaml", "plugin.py", "plugin.sig"):
            (staging / name).replace(target / name)
        staging.rmdir()
    else:
        staging.rename(target)
    return target


def _id(kind: str, where: str) -> str:
    return f"exc.{kind}.{where}"


def _keys(root: Path) -> Path:
    keys = root / "keys"
    keys.mkdir()
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    return keys


@pytest.fixture(scope="module", params=["process", "none"])
def raising(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveDaemon]:
    """One daemon (per isolation mode) that starts with every kind x entry point present."""
    root = tmp_path_factory.mktemp(f"exceptions-{request.param}")
    plugins = root / "plugins"
    plugins.mkdir()
    for kind in KINDS:
        for where in WHERES:
            write_plugin(plugins, _id(kind, where), plugin_code(kind, where))
    write_plugin(plugins, "exc.good", plugin_code(None, None))
    with live_daemon(
        root / "daemon",
        plugins=plugins,
        keys=_keys(root),
        isolation_extra=f'mode = "{request.param}"\n',
    ) as daemon:
        yield daemon
        assert daemon.proc.poll() is None, daemon.stderr_text()
        assert daemon.request("GET", "/healthz")[0] == 200
        assert daemon.request("POST", "/api/v1/plugins/exc.good/run", {})[0] == 200
        assert daemon.stop() == 0


def _record(daemon: LiveDaemon, plugin_id: str) -> dict[str, Any]:
    status, record = daemon.request("GET", f"/api/v1/plugins/{plugin_id}")
    assert status == 200, record
    return dict(record)


@pytest.mark.parametrize("where", list(LOADS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_load_that_raises_ends_failed_with_its_code(
    raising: LiveDaemon, kind: str, where: str
) -> None:
    """The plugin is `failed` with the step's code and a `plugin.load.failed` event; the
    daemon started anyway."""
    plugin_id = _id(kind, where)
    record = _record(raising, plugin_id)
    assert record["state"] == "failed"
    assert record["error"]["code"] == LOADS[where]
    assert len(record["error"]["message"]) <= 600
    raising.wait_for("plugin.load.failed", plugin_id=plugin_id, error_code=LOADS[where])


@pytest.mark.parametrize("where", RUNS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_run_that_raises_is_answered_502_and_audited(
    raising: LiveDaemon, kind: str, where: str
) -> None:
    """`502 plugin_error` naming the type only, and one `plugin.run.failed` line; the
    plugin keeps serving."""
    plugin_id = _id(kind, where)
    status, body = raising.request("POST", f"/api/v1/plugins/{plugin_id}/run", {})
    assert (status, body["error"]["code"]) == (502, "plugin_error")
    assert body["error"]["message"] == f"plugin raised {KINDS[kind][1]}"
    failed = raising.wait_for("plugin.run.failed", plugin_id=plugin_id)[0]
    assert failed["error_code"] == "plugin_error"
    assert _record(raising, plugin_id)["state"] == "enabled"


@pytest.mark.parametrize("where", TEARDOWNS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_teardown_that_raises_is_an_event_and_the_unload_completes(
    raising: LiveDaemon, kind: str, where: str
) -> None:
    """DELETE answers 204, the record is `unloaded`, and `plugin.teardown.failed` says why."""
    plugin_id = _id(kind, where)
    assert raising.request("POST", f"/api/v1/plugins/{plugin_id}/run", {})[0] == 200
    status, _ = raising.request("DELETE", f"/api/v1/plugins/{plugin_id}")
    assert status == 204
    assert _record(raising, plugin_id)["state"] == "unloaded"
    failed = raising.wait_for("plugin.teardown.failed", plugin_id=plugin_id)[0]
    assert failed["error_code"] == "plugin_teardown_failed"


@pytest.mark.parametrize("mode", ["process", "none"])
def test_the_watcher_survives_reloading_plugins_that_raise(tmp_path: Path, mode: str) -> None:
    """A serving plugin whose new code raises SystemExit at import: the reload fails, the old
    version serves on; new directories raising KeyboardInterrupt or GeneratorExit fail alone;
    later good changes are still picked up by the same watcher."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    write_plugin(plugins, "watch.a", plugin_code(None, None))
    with live_daemon(
        tmp_path / "daemon",
        plugins=plugins,
        keys=_keys(tmp_path),
        watch=True,
        isolation_extra=f'mode = "{mode}"\n',
    ) as daemon:
        daemon.wait_for("watcher.started")
        write_plugin(plugins, "watch.a", plugin_code("exit", "import"), version="2.0.0")
        daemon.wait_for(
            "plugin.reload.failed", plugin_id="watch.a", error_code="plugin_import_failed"
        )
        assert _record(daemon, "watch.a")["version"] == "1.0.0"
        assert daemon.request("POST", "/api/v1/plugins/watch.a/run", {})[0] == 200
        write_plugin(plugins, "watch.k", plugin_code("keyboard", "import"))
        write_plugin(plugins, "watch.g", plugin_code("generator", "init"))
        daemon.wait_for("plugin.load.failed", plugin_id="watch.k")
        daemon.wait_for("plugin.load.failed", plugin_id="watch.g")
        write_plugin(plugins, "watch.a", plugin_code(None, None), version="3.0.0")
        daemon.wait_for("plugin.reload.completed", plugin_id="watch.a", version="3.0.0")
        write_plugin(plugins, "watch.b", plugin_code(None, None))
        daemon.wait_for("plugin.enabled", plugin_id="watch.b")
        assert daemon.request("POST", "/api/v1/plugins/watch.b/run", {})[0] == 200
        assert daemon.events("watcher.error") == []
        assert daemon.events("watcher.stopped") == []
        assert daemon.stop() == 0
