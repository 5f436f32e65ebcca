"""A signed plugin that attacks the daemon from its host process gets nowhere (INTERFACE §8).

Real host processes (zygote, sandbox, Landlock where the kernel has it), real files, a real
trust decision in the supervisor. The attacking plugin is signed by the trusted key: the
question is what a plugin that was legitimately approved can still do.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.hosts import landlock, seccomp
from aisoc_plugind.errors import PluginDError
from tests.conftest import Env, ManagerFactory, PluginFactory

LANDLOCK = landlock.probe()
needs_landlock = pytest.mark.skipif(
    not isinstance(LANDLOCK, landlock.Available),
    reason="the kernel has no Landlock: file access is not limited in hosts",
)

PROBE = textwrap.dedent(
    """
    import gc, os
    class Plugin:
        def __init__(self, config):
            self.config = config
        def run(self, payload, context):
            report = {}
            def attempt(name, action):
                try:
                    action()
                    report[name] = "done"
                except BaseException as exc:
                    report[name] = type(exc).__name__
            for name, path in payload.get("read", {}).items():
                attempt("read:" + name, lambda p=path: open(p, "rb").read(1))
            for name, path in payload.get("list", {}).items():
                attempt("list:" + name, lambda p=path: os.listdir(p))
            for name, path in payload.get("write", {}).items():
                attempt("write:" + name, lambda p=path: open(p, "a").write("x"))
            root = os.environ.get("PLUGIN_STATE_ROOT", "")
            mine = os.path.join(root, payload.get("me", ""), "mine.txt")
            attempt("own_state", lambda: open(mine, "w").write("ok"))
            if "signal" in payload:
                attempt("signal", lambda: os.kill(payload["signal"], 0))
            secret = payload.get("secret")
            if secret:
                found = any(isinstance(o, dict) and secret in map(str, o.values())
                            for o in gc.get_objects())
                report["secret_in_memory"] = found
            report["environment"] = sorted(os.environ)
            report["config"] = self.config
            return report
    """
)


def _layout(env: Env) -> dict[str, Path]:
    """The daemon's sensitive files, as a real daemon has them."""
    (env.tmp / "tokens.toml").write_text("[tokens]\n")
    (env.tmp / "config.toml").write_text('environment = "development"\n')
    daemon = env.tmp / "state" / ".daemon"
    daemon.mkdir(parents=True, exist_ok=True)
    (daemon / "audit.head").write_text('{"head": "0"}')
    other = env.tmp / "state" / "test.other"
    other.mkdir(parents=True, exist_ok=True)
    (other / "secret.txt").write_text("the other plugin's state")
    return {
        "tokens": env.tmp / "tokens.toml",
        "config": env.tmp / "config.toml",
        "key": next(env.keys.iterdir()),
        "audit": env.audit,
        "head": daemon / "audit.head",
        "other_state": other / "secret.txt",
        "shadow": Path("/etc/shadow"),
    }


@needs_landlock
async def test_a_plugin_cannot_read_or_write_what_is_not_its_own(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    files = _layout(env)
    plugins.write("probe", plugin_id="test.probe", code=PROBE)
    plugins.write("other", plugin_id="test.other")
    manager = await make_manager(isolation_group="plugin")
    await manager.discover()
    report = (
        await manager.run(
            "test.probe",
            {
                "me": "test.probe",
                "read": {k: str(v) for k, v in files.items()},
                "list": {"keys": str(env.keys), "state_root": str(env.tmp / "state")},
                "write": {
                    "plugins_dir": str(env.plugins / "planted.py"),
                    "own_code": str(env.plugins / "probe" / "plugin.py"),
                    "other_state": str(files["other_state"]),
                    "keys": str(env.keys / "mine.pem"),
                    "audit": str(env.audit),
                },
            },
        )
    ).result
    denied = {k: v for k, v in report.items() if k.startswith(("read:", "list:", "write:"))}
    assert all(v in ("PermissionError", "FileNotFoundError") for v in denied.values()), denied
    assert report["own_state"] == "done"
    assert (env.tmp / "state" / "test.probe" / "mine.txt").read_text() == "ok"
    assert not (env.plugins / "planted.py").exists()
    assert (env.keys / "mine.pem").exists() is False
    assert files["other_state"].read_text() == "the other plugin's state"


async def test_a_host_gets_a_clean_environment_and_only_its_own_configuration(
    env: Env,
    plugins: PluginFactory,
    make_manager: ManagerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AISOC_PLUGIND_TOKEN_FOR_TEST", "do-not-leak")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    plugins.write("probe", plugin_id="test.probe", code=PROBE)
    plugins.write("other", plugin_id="test.other", code=PROBE)
    manager = await make_manager(
        isolation_group="plugin",
        plugin_config={"test.probe": {"mine": "a"}, "test.other": {"theirs": "other-secret-42"}},
    )
    await manager.discover()
    report = (
        await manager.run("test.probe", {"me": "test.probe", "secret": "other-secret-42"})
    ).result
    assert report["config"] == {"mine": "a"}
    assert report["secret_in_memory"] is False  # never sent to this host
    assert not [n for n in report["environment"] if "AISOC" in n or "TOKEN" in n]
    assert "NOTIFY_SOCKET" not in report["environment"]
    assert {"PLUGIN_STATE_ROOT", "TMPDIR", "HOME"} <= set(report["environment"])


@needs_landlock
async def test_a_plugin_cannot_signal_the_daemon(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Landlock's signal scope (ABI 6+): not even signal 0 reaches the supervisor."""
    if isinstance(LANDLOCK, landlock.Available) and LANDLOCK.abi < 6:
        pytest.skip(f"Landlock ABI {LANDLOCK.abi} has no signal scoping (needs 6)")
    plugins.write("probe", plugin_id="test.probe", code=PROBE)
    manager = await make_manager()
    await manager.discover()
    report = (await manager.run("test.probe", {"me": "test.probe", "signal": os.getpid()})).result
    assert report["signal"] == "PermissionError"


PATCHER = textwrap.dedent(
    """
    import sys
    # Forge every trust decision and silence every event, as far as this process reaches.
    import aisoc_plugind.core.signing as signing
    import aisoc_plugind.audit.log as log
    def forged(**kwargs):
        return signing.TrustDecision(
            status=signing.SignatureStatus.VERIFIED, key_id="vector-signer", allowed=True,
            reason="forged", digest_hex=kwargs["digest"].hex())
    signing.decide = forged
    log.EventLog.emit = lambda self, *a, **k: 0
    # Stand in for the modules of the next loads of this process.
    import types
    evil = types.ModuleType("evil")
    exec("class Plugin:\\n    def run(self, p, c):\\n        return {'owned': 1}\\n", vars(evil))
    # Its own name shows the counter, not the random part of the next ones: guess both.
    mine = int(__name__.split(".")[1][1:].split("_")[0])
    for n in range(mine + 1, mine + 200):
        for guess in (f"g{n}", f"g{n}_" + "0" * 16, f"g{n}_" + __name__.split("_")[-1]):
            sys.modules[f"_aisoc_plugins.{guess}"] = evil
            sys.modules[f"_aisoc_plugins.{guess}.plugin"] = evil
    class Plugin:
        def run(self, payload, context):
            return {"patched": signing.decide is forged}
    """
)


async def test_a_signed_plugin_cannot_switch_verification_off_or_hide_from_the_audit(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """It patches verification and the event log at import, in its own host: an unsigned
    plugin discovered afterwards is still refused (strict), and everything is audited."""
    plugins.write("patcher", plugin_id="test.patcher", code=PATCHER)
    manager = await make_manager()
    await manager.discover()
    assert (await manager.run("test.patcher")).result == {"patched": True}
    plugins.write("unsigned", plugin_id="test.unsigned", sign=False)
    await manager.discover()
    record = manager.get("test.unsigned")
    assert record.state.value == "failed" and record.error is not None
    assert record.error["code"] == "signature_unsigned"
    failed = [e for e in env.audit_events() if e.get("plugin_id") == "test.unsigned"]
    assert [e["event"] for e in failed][-1] == "plugin.load.failed"


async def test_a_plugin_cannot_stand_in_for_another_ones_modules(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Seeding `sys.modules` with the names the next loads will use changes nothing: not in
    another plugin's host (never reached), not in its own (each load clears its names)."""
    plugins.write("patcher", plugin_id="test.patcher", code=PATCHER)
    plugins.write("victim", plugin_id="test.victim")
    for group in ("plugin", "signer"):
        manager = await make_manager(isolation_group=group)
        await manager.discover()
        await manager.run("test.patcher")  # its import seeded the names
        for _ in range(3):
            await manager.reload("test.victim")
            result = (await manager.run("test.victim", {"x": 1})).result
            assert result == {"version": "1.0.0", "echo": {"x": 1}}, group


async def test_records_show_where_the_code_runs(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    plugins.write("a", plugin_id="test.a")
    plugins.write("b", plugin_id="test.b")
    plugins.write("u", plugin_id="test.u", sign=False)
    signer = await make_manager(trust_mode=TrustMode.WARN)
    await signer.discover()
    hosts = {i: signer.host_of(i) for i in ("test.a", "test.b", "test.u")}
    assert all(h is not None and h.isolated and h.pid != os.getpid() for h in hosts.values())
    assert hosts["test.a"] == hosts["test.b"]  # one trusted key: one host
    assert hosts["test.u"] is not None and hosts["test.u"].pid != hosts["test.a"].pid  # type: ignore[union-attr]
    assert hosts["test.u"].group.startswith("plugin:test.u")  # type: ignore[union-attr]


async def test_dedicated_and_plugin_grouping_give_own_hosts(
    plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    for name in ("a", "b", "c"):
        plugins.write(name, plugin_id=f"test.{name}")
    manager = await make_manager(isolation_dedicated=("test.c",))
    await manager.discover()
    pids: dict[str, Any] = {i: manager.host_of(i).pid for i in ("test.a", "test.b", "test.c")}  # type: ignore[union-attr]
    assert pids["test.a"] == pids["test.b"] != pids["test.c"]
    alone = await make_manager(isolation_group="plugin")
    await alone.discover()
    assert len({alone.host_of(i).pid for i in ("test.a", "test.b", "test.c")}) == 3  # type: ignore[union-attr]


FORKER = textwrap.dedent(
    """
    import os, subprocess, threading

    class Plugin:
        def run(self, payload, context):
            if payload.get("how") == "subprocess":
                done = subprocess.run(["/bin/true"])
                return {"returncode": done.returncode}
            if payload.get("how") == "threads":
                seen = []
                workers = [threading.Thread(target=seen.append, args=(i,)) for i in range(8)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                return {"threads": len(seen)}
            forked = 0
            try:
                while forked < 200:  # a fork bomb, bounded here only so that it can end
                    if os.fork() == 0:
                        os._exit(0)
                    forked += 1
                    os.wait()
            except OSError as exc:
                return {"forked": forked, "errno": exc.errno}
            return {"forked": forked, "errno": 0}
    """
)


needs_seccomp = pytest.mark.skipif(
    seccomp.supported() is not None, reason="no seccomp filter for this architecture"
)


@needs_seccomp
@pytest.mark.parametrize("group", ["signer", "plugin"])
async def test_a_fork_bomb_cannot_start_a_single_process(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, group: str
) -> None:
    """By default a host cannot create processes (seccomp; root included, where RLIMIT_NPROC
    does nothing): fork, subprocess and the like fail with EPERM, threads still work, and
    the daemon and the other plugins go on serving."""
    plugins.write("forker", plugin_id="test.forker", code=FORKER)
    plugins.write("other", plugin_id="test.other")
    manager = await make_manager(isolation_group=group)
    await manager.discover()
    assert (await manager.run("test.forker", {})).result == {"forked": 0, "errno": 1}
    with pytest.raises(PluginDError) as refused:
        await manager.run("test.forker", {"how": "subprocess"})
    assert refused.value.code == "plugin_error"
    assert refused.value.message == "plugin raised PermissionError"
    assert (await manager.run("test.forker", {"how": "threads"})).result == {"threads": 8}
    assert (await manager.run("test.other", {"x": 1})).result["echo"] == {"x": 1}
    started = [e for e in env.audit_events() if e["event"] == "plugin.host.started"]
    assert started and {e["subprocesses"] for e in started} == {"denied"}
    assert {e["level"] for e in started} == {"info"}


async def test_subprocesses_can_be_allowed(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """`isolation.allow_subprocesses = true`: no filter (and the start event says so); the
    host may fork. (Running another program also needs Landlock to let it execute.)"""
    plugins.write("forker", plugin_id="test.forker", code=FORKER)
    manager = await make_manager(isolation_allow_subprocesses=True)
    await manager.discover()
    assert (await manager.run("test.forker", {})).result == {"forked": 200, "errno": 0}
    started = [e for e in env.audit_events() if e["event"] == "plugin.host.started"]
    assert [e["subprocesses"] for e in started] == ["allowed"]
