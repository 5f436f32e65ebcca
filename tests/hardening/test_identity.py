"""Identity and trust state: who owns an id, what a returning key restores, what records show.

An unverified or failed directory never owns an id against one that loads (strict and warn:
a verified directory wins; once serving, the first loaded keeps it). A key removed and put
back, with a SIGHUP each time, disables and then restores the plugins it verified (to the
state they had) and retries those that failed for want of it. A record's `manifest` is the
signed manifest part of the admitted version, nothing else.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.loads import verified_first
from aisoc_plugind.engine.scan import scan
from tests.conftest import VECTOR_PUB, Env, ManagerFactory, PluginFactory
from tests.live import LiveDaemon, live_daemon, wait_until

pytestmark = pytest.mark.timeout(120)

WHO = """
class Plugin:
    def run(self, payload, context):
        return {{"who": {who!r}}}
"""
KEY_FILE = "vector-signer.pem"


def _pair(plugins: PluginFactory, plugin_id: str, *, squatter: dict[str, Any]) -> None:
    """A signed directory (`b-real`) and a squatter (`a-squat`, sorting first), one id."""
    plugins.write("a-squat", plugin_id=plugin_id, code=WHO.format(who="squatter"), **squatter)
    plugins.write("b-real", plugin_id=plugin_id, code=WHO.format(who="real"))


def _run(d: LiveDaemon, plugin_id: str) -> tuple[int, Any]:
    return d.request("POST", f"/api/v1/plugins/{plugin_id}/run", {"payload": {}})


def _records_at(d: LiveDaemon, path: Path) -> list[dict[str, Any]]:
    return [r for r in d.request("GET", "/api/v1/plugins")[1]["plugins"] if r["path"] == str(path)]


SQUATTERS: dict[str, dict[str, Any]] = {
    "unsigned": {"sign": False},
    "forged": {"sign": False, "files": {"plugin.sig": "00" * 64}},
}


@pytest.mark.parametrize("mode", ["strict", "warn"])
@pytest.mark.parametrize("kind", sorted(SQUATTERS))
def test_an_unverified_directory_cannot_squat_a_verified_id(
    tmp_path: Path, env: Env, plugins: PluginFactory, mode: str, kind: str
) -> None:
    """The squatter sorts (and is scanned) first: the verified directory owns the id
    anyway, the squatter is a failed duplicate, and runs reach the verified code."""
    _pair(plugins, "acme.x", squatter=SQUATTERS[kind])
    with live_daemon(
        tmp_path / "d", plugins=env.plugins, keys=env.keys, trust_extra=f'mode = "{mode}"\n'
    ) as d:
        record = d.request("GET", "/api/v1/plugins/acme.x")[1]
        assert record["path"] == str(env.plugins / "b-real"), record
        assert (record["state"], record["signature_status"]) == ("enabled", "verified")
        assert _run(d, "acme.x")[1]["result"] == {"who": "real"}
        squat = _records_at(d, env.plugins / "a-squat")
        assert [r["state"] for r in squat] == ["failed"], squat
        assert squat[0]["manifest"] == {}
        duplicate = d.wait_for("plugin.duplicate_id", plugin_id="acme.x")
        assert duplicate[0]["path"] == str(env.plugins / "a-squat")


def test_a_failed_squatter_gives_the_id_up(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """An unsigned directory failed alone (strict); the signed one appears later: it loads
    and owns the id, the squatter stays listed as failed."""
    plugins.write("a-squat", plugin_id="acme.x", code=WHO.format(who="squatter"), sign=False)
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        assert d.request("GET", "/api/v1/plugins/acme.x")[1]["state"] == "failed"
        plugins.write("b-real", plugin_id="acme.x", code=WHO.format(who="real"))
        status, body = d.request("POST", "/api/v1/plugins/discover")
        assert status == 200 and body["discovered"] == ["acme.x"], body
        record = d.request("GET", "/api/v1/plugins/acme.x")[1]
        assert (record["state"], record["path"]) == ("enabled", str(env.plugins / "b-real"))
        assert [r["state"] for r in _records_at(d, env.plugins / "a-squat")] == ["failed"]
        assert _run(d, "acme.x")[1]["result"] == {"who": "real"}


def test_a_squatter_arriving_later_is_a_duplicate(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """Once a verified plugin serves, an unsigned directory with its id (seen by the
    watcher) is a duplicate; nothing about the serving plugin changes."""
    plugins.write("b-real", plugin_id="acme.x", code=WHO.format(who="real"))
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, watch=True) as d:
        plugins.write("a-squat", plugin_id="acme.x", code=WHO.format(who="squatter"), sign=False)
        d.wait_for("plugin.duplicate_id", plugin_id="acme.x", timeout=30)
        record = d.request("GET", "/api/v1/plugins/acme.x")[1]
        assert (record["state"], record["path"]) == ("enabled", str(env.plugins / "b-real"))
        assert _run(d, "acme.x")[1]["result"] == {"who": "real"}


def _state(d: LiveDaemon, plugin_id: str) -> tuple[str, str | None, str | None]:
    record = d.request("GET", f"/api/v1/plugins/{plugin_id}")[1]
    error = record["error"]["code"] if record["error"] else None
    return record["state"], record["signature_status"], error


def _sighup_and_wait(d: LiveDaemon, count: int) -> None:
    d.signal(signal.SIGHUP)
    d.wait_for("daemon.reloading", count=count)
    wait_until(
        lambda: len(d.events("api.tokens.loaded")) > count or None, 30, "the SIGHUP to finish"
    )


def test_a_returning_key_restores_what_its_removal_disabled(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """Strict: the key goes (SIGHUP) -> its plugins are disabled (`signing_key_removed`); a
    plugin signed meanwhile fails; the key comes back (SIGHUP) -> the disabled ones are
    enabled again, the one the operator had disabled stays disabled, the failed one loads."""
    plugins.write("one", plugin_id="acme.one")
    plugins.write("two", plugin_id="acme.two")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        assert d.request("POST", "/api/v1/plugins/acme.two/disable")[0] == 200
        (env.keys / KEY_FILE).unlink()
        _sighup_and_wait(d, 1)
        assert _state(d, "acme.one") == ("disabled", "invalid", "signing_key_removed")
        assert _state(d, "acme.two") == ("disabled", "invalid", "signing_key_removed")
        assert _run(d, "acme.one")[0] == 409
        plugins.write("three", plugin_id="acme.three")
        assert d.request("POST", "/api/v1/plugins/discover")[0] == 200
        assert _state(d, "acme.three") == ("failed", "invalid", "signature_invalid")
        shutil.copy(VECTOR_PUB, env.keys / KEY_FILE)
        _sighup_and_wait(d, 2)
        assert _state(d, "acme.one") == ("enabled", "verified", None)
        assert _state(d, "acme.two") == ("disabled", "verified", None)
        assert _state(d, "acme.three") == ("enabled", "verified", None)
        assert _run(d, "acme.one")[0] == 200
        restored = d.events("plugin.signature.verified")
        assert {e["plugin_id"] for e in restored if e.get("decision") == "restore"} == {
            "acme.one",
            "acme.two",
        }
        enabled = [e for e in d.events("plugin.enabled") if e["plugin_id"] == "acme.one"]
        assert [e["from_state"] for e in enabled][-1] == "disabled"


def test_a_returning_key_clears_the_warning_in_warn_mode(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """Warn: the key goes -> invalid but serving; the key returns -> verified, no error."""
    plugins.write("one", plugin_id="acme.one")
    with live_daemon(
        tmp_path / "d", plugins=env.plugins, keys=env.keys, trust_extra='mode = "warn"\n'
    ) as d:
        (env.keys / KEY_FILE).unlink()
        _sighup_and_wait(d, 1)
        assert _state(d, "acme.one") == ("enabled", "invalid", "signing_key_removed")
        shutil.copy(VECTOR_PUB, env.keys / KEY_FILE)
        _sighup_and_wait(d, 2)
        assert _state(d, "acme.one") == ("enabled", "verified", None)


def test_records_show_only_the_signed_manifest(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """`signature`/`trust` keys are not shown; a changed file that fails to verify shows
    nothing of itself (the serving version's manifest stays); a refused one shows none."""
    extra = {"x_vendor": {"tier": "gold"}, "signature": "by me", "trust": {"level": "root"}}
    path = plugins.write("one", plugin_id="acme.one", manifest_extra=extra)
    plugins.write("unsigned", plugin_id="acme.unsigned", sign=False)
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        record = d.request("GET", "/api/v1/plugins/acme.one")[1]
        assert sorted(record["manifest"]) == ["id", "name", "plugin_type", "version", "x_vendor"]
        listed = d.request("GET", "/api/v1/plugins")[1]["plugins"]
        assert all("signature" not in r["manifest"] for r in listed)
        manifest = (path / "plugin.yaml").read_text().replace('"x_vendor"', '"x_evil": 1, "x_v"')
        (path / "plugin.yaml").write_text(manifest)
        status, body = d.request("POST", "/api/v1/plugins/acme.one/reload")
        assert status == 409 and body["error"]["code"] == "signature_invalid", body
        record = d.request("GET", "/api/v1/plugins/acme.one")[1]
        assert "x_evil" not in record["manifest"] and "x_vendor" in record["manifest"]
        assert d.request("GET", "/api/v1/plugins/acme.unsigned")[1]["manifest"] == {}


# ---- in process ----------------------------------------------------------------------------


def test_verified_first_orders_only_directories_sharing_an_id(
    env: Env, plugins: PluginFactory
) -> None:
    """Verified directories move ahead of unverified ones of their id; others stay put."""
    plugins.write("a-squat", plugin_id="acme.x", sign=False)
    plugins.write("b-other", plugin_id="acme.y", sign=False)
    plugins.write("c-real", plugin_id="acme.x")
    plugins.write("d-broken", sign=False, plugin_id="acme.z")
    (env.plugins / "d-broken" / "plugin.yaml").write_text("- not a mapping\n")
    keys = dict(load_keyring(env.keys).keys)
    items = [
        scan(env.plugins / n, TrustMode.WARN, keys, compile_code=False)
        for n in ("a-squat", "b-other", "c-real", "d-broken")
    ]
    ordered = [i.path.name for i in verified_first(items)]
    assert ordered == ["c-real", "b-other", "a-squat", "d-broken"]


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_in_process_warn_discovery_prefers_the_verified_directory(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, isolation: str
) -> None:
    """Across scan chunks too (more directories than one chunk holds)."""
    plugins.write("a-squat", plugin_id="acme.x", sign=False)
    for n in range(20):
        plugins.write(f"m-filler-{n:02d}", plugin_id=f"acme.filler{n}")
    plugins.write("z-real", plugin_id="acme.x")
    manager = await make_manager(TrustMode.WARN, isolation_mode=isolation)
    await manager.discover()
    record = manager.get("acme.x")
    assert (record.path, record.signature_status) == (str(env.plugins / "z-real"), "verified")


async def test_a_failed_directory_in_the_same_scan_gives_the_id_up(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Two signed directories, one id: the first one scanned fails to import, so the
    second (waiting for that outcome) takes the id instead of being a duplicate."""
    plugins.write("a-broken", plugin_id="acme.x", code="raise ImportError('broken')\n")
    plugins.write("b-good", plugin_id="acme.x")
    manager = await make_manager(isolation_mode="none")
    result = await manager.discover()
    assert result.discovered == ["acme.x"]
    assert manager.get("acme.x").path == str(env.plugins / "b-good")
    broken = [r for r in manager.records(state="failed") if r.path.endswith("a-broken")]
    assert broken and broken[0].error is not None


async def test_adopting_keyrings_restores_and_retries(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """adopt_keyring: removal disables, the same key under another id re-verifies (a new
    signer id, nothing else changes), the original back restores; failures are retried."""
    plugins.write("one", plugin_id="acme.one")
    manager = await make_manager(isolation_mode="none")
    await manager.discover()
    assert await manager.adopt_keyring(load_keyring(env.keys)) == []  # the same keys
    (env.keys / KEY_FILE).unlink()
    assert await manager.adopt_keyring(load_keyring(env.keys)) == ["acme.one"]
    assert manager.get("acme.one").state.value == "disabled"
    assert await manager.adopt_keyring(load_keyring(env.keys)) == []  # no new event
    plugins.write("two", plugin_id="acme.two")
    await manager.discover()
    assert manager.get("acme.two").state.value == "failed"
    shutil.copy(VECTOR_PUB, env.keys / "renamed.pem")
    assert await manager.adopt_keyring(load_keyring(env.keys)) == ["acme.one"]
    one = manager.get("acme.one")
    assert (one.state.value, one.signing_key_id, one.error) == ("enabled", "renamed", None)
    assert manager.get("acme.two").state.value == "enabled"
    shutil.copy(VECTOR_PUB, env.keys / KEY_FILE)
    (env.keys / "renamed.pem").unlink()
    assert await manager.adopt_keyring(load_keyring(env.keys)) == ["acme.one", "acme.two"]
    assert manager.get("acme.one").signing_key_id == "vector-signer"


async def test_disabled_trust_mode_never_rechecks(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """With signatures off, removing a key changes nothing about loaded plugins."""
    plugins.write("one", plugin_id="acme.one")
    manager = await make_manager(TrustMode.DISABLED, isolation_mode="none")
    await manager.discover()
    (env.keys / KEY_FILE).unlink()
    assert await manager.adopt_keyring(load_keyring(env.keys)) == []
    assert manager.get("acme.one").state.value == "enabled"
