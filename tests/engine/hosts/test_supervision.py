"""A buggy plugin never costs the daemon: crashes, limits and hangs end in coded errors.

Real host processes and real faults: `os._exit`, SIGSEGV through ctypes, MemoryError at the
host's RLIMIT_AS, hung sync runs and blocked event loops, hanging teardowns, threads that
outlive their plugin, processes a plugin starts. After each, the daemon (the test process)
and the other plugins keep serving, and the events say what happened.
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.api.errors import status_for
from aisoc_plugind.engine.hosts.process import CRASH_LIMIT
from aisoc_plugind.errors import PluginDError, PluginTimeout
from tests.conftest import Env, ManagerFactory, PluginFactory
from tests.live import live_daemon, wait_until

FAULTY = textwrap.dedent(
    """
    import asyncio, ctypes, os, sys, threading, time
    class Boom(BaseException):
        pass
    class Plugin:
        def run(self, payload, context):
            what = payload.get("do")
            if what == "exit":
                os._exit(0)
            if what == "segv":
                ctypes.string_at(0)
            if what == "sys_exit":
                sys.exit(3)
            if what == "base":
                raise Boom("a BaseException")
            if what == "keyboard":
                raise KeyboardInterrupt
            if what == "memory":
                blob = bytearray(4 * 1024 * 1024 * 1024)
                return {"len": len(blob)}
            if what == "hang":
                time.sleep(60)
            if what == "busy":  # allocates in a worker thread for a moment
                chunks = [bytearray(256 * 1024) for _ in range(8)]
                time.sleep(0.2)
                return {"ok": True, "kib": sum(len(c) for c in chunks) // 1024}
            if what == "spawn":
                import subprocess
                kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                        for _ in range(5)]
                return {"pids": [k.pid for k in kids]}
            if what == "escape":  # daemonize: new session, double fork, the middle one exits
                import subprocess
                out = subprocess.run([sys.executable, "-c", ESCAPE], capture_output=True,
                                     text=True, timeout=30)
                return {"pids": [int(p) for p in out.stdout.split()]}
            return {"ok": True, "pid": os.getpid()}
    ESCAPE = '''
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        for _ in range(2):
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                os.close(1); os.close(2)
                os.fork()  # each starts one more process of its own
                time.sleep(600)
        os._exit(0)
    os.wait()
    '''
    """
)

ASYNC_FAULTY = textwrap.dedent(
    """
    import asyncio, time
    class Plugin:
        async def run(self, payload, context):
            what = payload.get("do")
            if what == "sleep":
                await asyncio.sleep(60)
            if what == "block":
                time.sleep(60)  # blocks the host's event loop
            return {"ok": True}
    """
)


async def _manager(make_manager: ManagerFactory, plugins: PluginFactory, **settings: Any) -> Any:
    plugins.write("faulty", plugin_id="test.faulty", code=FAULTY)
    plugins.write("other", plugin_id="test.other")
    manager = await make_manager(isolation_group="plugin", run_timeout_s=1.0, **settings)
    await manager.discover()
    assert manager.get("test.faulty").state.value == "enabled"
    return manager


def _events(env: Env, name: str) -> list[dict[str, Any]]:
    return [e for e in env.audit_events() if e["event"] == name]


async def _until(probe: Any, timeout: float = 10.0) -> Any:
    with anyio.fail_after(timeout):
        while not (found := probe()):
            await anyio.sleep(0.02)
    return found


@pytest.mark.parametrize(
    ("fault", "code", "reason"),
    [
        ("exit", "plugin_crashed", "crashed"),
        ("segv", "plugin_crashed", "crashed"),
        ("memory", "plugin_memory_exceeded", "memory"),
    ],
)
async def test_a_host_that_dies_answers_coded_and_comes_back(
    env: Env,
    plugins: PluginFactory,
    make_manager: ManagerFactory,
    fault: str,
    code: str,
    reason: str,
) -> None:
    manager = await _manager(make_manager, plugins, isolation_memory_mb=256)
    before = manager.host_of("test.faulty").pid
    with pytest.raises(PluginDError) as caught:
        await manager.run("test.faulty", {"do": fault})
    assert caught.value.code == code and status_for(caught.value) == 502
    exited = await _until(
        lambda: [e for e in _events(env, "plugin.host.exited") if e["pid"] == before]
    )
    assert exited[0]["reason"] == reason
    if fault == "segv":
        assert exited[0]["signal"] == signal.SIGSEGV
    await _until(lambda: _events(env, "plugin.host.restarting"))
    result = await _retry_run(manager, "test.faulty")
    assert result["ok"] and result["pid"] != before  # a new host serves the same plugin
    assert (await manager.run("test.other", {"x": 1})).result["echo"] == {"x": 1}
    assert manager.get("test.faulty").state.value == "enabled"


async def test_many_threads_of_a_host_fit_its_memory_limit(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Concurrent sync runs use one worker thread each; glibc's per-thread arenas must not
    spend a small RLIMIT_AS on address space (they did: MemoryError in every thread)."""
    manager = await _manager(make_manager, plugins, isolation_memory_mb=256, run_concurrency=16)
    results = await asyncio.gather(
        *(manager.run("test.faulty", {"do": "busy"}) for _ in range(32)), return_exceptions=True
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r.result["kib"] == 2048 for r in results if not isinstance(r, BaseException))


async def _retry_run(manager: Any, plugin_id: str) -> dict[str, Any]:
    """Run until the restarted host answers (it is being started for a moment)."""
    for _ in range(100):
        try:
            return dict((await manager.run(plugin_id, {})).result)
        except PluginDError as exc:
            if exc.code != "plugin_crashed":
                raise
            await anyio.sleep(0.05)
    raise AssertionError("the host did not come back")


@pytest.mark.parametrize("fault", ["sys_exit", "base", "keyboard"])
async def test_exceptions_of_every_kind_in_run_are_plugin_errors(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, fault: str
) -> None:
    """SystemExit, KeyboardInterrupt, any BaseException: an answer, the host stays up."""
    manager = await _manager(make_manager, plugins)
    pid = manager.host_of("test.faulty").pid
    with pytest.raises(PluginDError) as caught:
        await manager.run("test.faulty", {"do": fault})
    assert caught.value.code == "plugin_error"
    assert (await manager.run("test.faulty", {})).result["pid"] == pid
    assert not _events(env, "plugin.host.exited")


ENTRY_POINTS = {
    "import": "raise KeyboardInterrupt\n",
    "init": "class Plugin:\n    def __init__(self):\n        raise SystemExit(1)\n"
    "    def run(self, p, c):\n        return 1\n",
    "setup": "class Boom(BaseException):\n    pass\nclass Plugin:\n    def setup(self):\n"
    "        raise Boom()\n    def run(self, p, c):\n        return 1\n",
    "exit_at_import": "import os\nos._exit(5)\n",
}


async def test_base_exceptions_at_every_entry_point_fail_that_plugin_only(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    for name, code in ENTRY_POINTS.items():
        plugins.write(name.replace("_", "-"), plugin_id=f"test.{name.replace('_', '-')}", code=code)
    plugins.write("good", plugin_id="test.good")
    manager = await make_manager()  # signer grouping: they would all share one host
    await manager.discover()
    codes = {
        r.id: (r.state.value, (r.error or {}).get("code"))
        for r in manager.records()
        if r.id != "test.good"
    }
    assert codes == {
        "test.import": ("failed", "plugin_import_failed"),
        "test.init": ("failed", "plugin_init_failed"),
        "test.setup": ("failed", "plugin_setup_failed"),
        "test.exit-at-import": ("failed", codes["test.exit-at-import"][1]),
    }
    assert codes["test.exit-at-import"][1] in ("host_crashed", "plugin_load_timeout")
    assert (await _retry_run(manager, "test.good"))["version"] == "1.0.0"


async def test_a_hung_sync_run_times_out_and_its_host_is_replaced(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    manager = await _manager(make_manager, plugins)
    pid = manager.host_of("test.faulty").pid
    started = time.monotonic()
    with pytest.raises(PluginTimeout):
        await manager.run("test.faulty", {"do": "hang"})
    assert time.monotonic() - started < 2.0  # the 1 s limit (+ one deadline slot)
    exited = await _until(
        lambda: [e for e in _events(env, "plugin.host.exited") if e["pid"] == pid]
    )
    assert exited[0]["reason"] == "timeout"
    assert (await _retry_run(manager, "test.faulty"))["pid"] != pid
    assert (await manager.run("test.other", {})).result["version"] == "1.0.0"


async def test_an_async_run_is_cancelled_in_its_host_and_a_blocked_loop_ends_the_host(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    plugins.write("async", plugin_id="test.async", code=ASYNC_FAULTY)
    manager = await make_manager(isolation_group="plugin", run_timeout_s=1.0)
    await manager.discover()
    pid = manager.host_of("test.async").pid
    with pytest.raises(PluginTimeout):
        await manager.run("test.async", {"do": "sleep"})
    await anyio.sleep(1.5)  # the cancel grace
    assert manager.host_of("test.async").pid == pid  # cancelled in the host, which lives on
    assert (await manager.run("test.async", {})).result == {"ok": True}
    with pytest.raises(PluginTimeout):
        await manager.run("test.async", {"do": "block"})
    exited = await _until(lambda: _events(env, "plugin.host.exited"))
    assert exited[0]["reason"] == "timeout" and exited[0]["pid"] == pid
    assert (await _retry_run(manager, "test.async")) == {"ok": True}


async def test_what_a_plugin_starts_ends_with_its_host(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """With `isolation.allow_subprocesses` (by default a host cannot start any process), what
    a plugin started dies with its host."""
    manager = await _manager(make_manager, plugins, isolation_allow_subprocesses=True)
    pids = (await manager.run("test.faulty", {"do": "spawn"})).result["pids"]
    assert all(Path(f"/proc/{p}").exists() for p in pids)
    with pytest.raises(PluginDError):
        await manager.run("test.faulty", {"do": "exit"})
    await _until(lambda: not any(_alive(p) for p in pids))


async def test_what_a_plugin_daemonizes_ends_with_its_host(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A plugin's child that leaves the host's session and process group (setsid, double
    fork: a daemon) is adopted by the host, then by the zygote when the host ends, and ended
    there with everything it started in the meantime."""
    manager = await _manager(make_manager, plugins, isolation_allow_subprocesses=True)
    pids = (await manager.run("test.faulty", {"do": "escape"})).result["pids"]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    host = (await manager.run("test.faulty", {})).result["pid"]
    assert all(_parent(p) == host for p in pids)  # adopted by the host, not by init
    family = await _until(
        lambda: (f := pids + [c for p in pids for c in _children_of(p)])[3:] and f
    )
    assert len(family) == 4
    with pytest.raises(PluginDError):
        await manager.run("test.faulty", {"do": "exit"})
    await _until(lambda: not any(_alive(p) for p in family))
    assert (await manager.run("test.faulty", {})).result["ok"]  # restarted


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False
    return state != "Z"


CRASH_AFTER_LOAD = textwrap.dedent(
    """
    import os, threading
    # Long enough that the load is answered first even on a busy machine (a host that ends
    # while loading is host_crashed, not the crash loop this test is about).
    threading.Timer(0.5, lambda: os._exit(9)).start()
    class Plugin:
        def run(self, payload, context):
            return {}
    """
)


async def test_a_crash_loop_ends_in_failed_with_host_crash_loop(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    plugins.write("loop", plugin_id="test.loop", code=CRASH_AFTER_LOAD)
    plugins.write("other", plugin_id="test.other")
    manager = await make_manager(isolation_group="plugin")
    await manager.discover()
    await _until(lambda: manager.get("test.loop").state.value == "failed", timeout=30)
    record = manager.get("test.loop")
    assert record.error is not None and record.error["code"] == "host_crash_loop"
    restarts = _events(env, "plugin.host.restarting")
    delays = [e["delay_s"] for e in restarts]
    assert len(_events(env, "plugin.host.exited")) >= CRASH_LIMIT
    assert delays == sorted(delays) and delays[0] < delays[-1]  # backoff grows
    assert [e["attempt"] for e in restarts] == list(range(1, len(restarts) + 1))
    failed = [e for e in _events(env, "plugin.load.failed") if e.get("plugin_id") == "test.loop"]
    assert failed and failed[-1]["error_code"] == "host_crash_loop"
    assert (await manager.run("test.other", {})).result["version"] == "1.0.0"
    with pytest.raises(PluginDError) as caught:
        await manager.run("test.loop", {})
    assert caught.value.code == "plugin_failed"


LINGERING = textwrap.dedent(
    """
    import threading, time
    def forever():
        while True:
            time.sleep(0.1)
    threading.Thread(target=forever).start()  # not a daemon thread
    class Plugin:
        def run(self, payload, context):
            return {}
        def teardown(self):
            time.sleep(60)  # a teardown that hangs
    """
)


async def test_unload_ends_a_host_with_a_lingering_thread_and_a_hanging_teardown(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    plugins.write("linger", plugin_id="test.linger", code=LINGERING)
    manager = await make_manager(isolation_group="plugin", run_timeout_s=1.0)
    await manager.discover()
    pid = manager.host_of("test.linger").pid
    started = time.monotonic()
    await manager.unload("test.linger")
    await _until(lambda: not _alive(pid))
    assert time.monotonic() - started < 6.0


def test_sigterm_stops_every_host_within_the_grace(tmp_path: Path, env: Env) -> None:
    """A real daemon with a hung run in flight, a hanging teardown and a lingering thread:
    SIGTERM ends it, and every host, within daemon.shutdown_grace_s (plus a margin)."""
    factory = PluginFactory(tmp_path / "live-plugins")
    factory.write("linger", plugin_id="test.linger", code=LINGERING)
    factory.write("faulty", plugin_id="test.faulty", code=FAULTY)
    with live_daemon(tmp_path / "d", plugins=factory.root, keys=env.keys) as daemon:
        wait_until(lambda: daemon.events("plugin.host.started") or None, 20, "hosts started")
        host_pids = [e["pid"] for e in daemon.events("plugin.host.started")]
        threading.Thread(
            target=lambda: daemon.request(
                "POST", "/api/v1/plugins/test.faulty/run", {"payload": {"do": "hang"}}, timeout=30
            ),
            daemon=True,
        ).start()
        time.sleep(0.3)
        begun = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.proc.wait(timeout=30)
        took = time.monotonic() - begun
    assert code == 0
    assert took < 5 + 3  # shutdown_grace_s = 5 in the live config
    assert not [p for p in host_pids if _alive(p)]


def test_the_daemon_survives_a_plugin_that_kills_its_host(tmp_path: Path, env: Env) -> None:
    """`os._exit(0)` in a plugin no longer stops the service (with status 0, so that
    Restart=on-failure would not even restart it): the host is replaced, the API answers."""
    factory = PluginFactory(tmp_path / "live-plugins")
    factory.write("faulty", plugin_id="test.faulty", code=FAULTY)
    with live_daemon(tmp_path / "d", plugins=factory.root, keys=env.keys) as d:
        status, body = d.request(
            "POST", "/api/v1/plugins/test.faulty/run", {"payload": {"do": "exit"}}
        )
        assert (status, body["error"]["code"]) == (502, "plugin_crashed")
        assert d.proc.poll() is None
        wait_until(lambda: d.events("plugin.host.restarting") or None, 10, "a restart")
        ok = wait_until(
            lambda: (
                (
                    (r := d.request("POST", "/api/v1/plugins/test.faulty/run", {"payload": {}}))[0]
                    == 200
                    and r
                )
                or None
            ),
            10,
            "the new host",
        )
        assert ok[1]["result"]["ok"] is True
        assert d.request("GET", "/healthz")[0] == 200
    assert next(e["reason"] for e in d.events("plugin.host.exited")) == "crashed"
