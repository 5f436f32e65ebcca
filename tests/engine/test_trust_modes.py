"""The trust-mode table of INTERFACE §5, case by case, through the real manager."""

from __future__ import annotations

import shutil
from pathlib import Path

import nacl.signing
import pytest

from aisoc_plugind.core.signing import TrustMode, private_key_pem
from tests.conftest import Env, ManagerFactory, PluginFactory

# (mode, case) -> (state, signature_status, event)
TABLE = {
    ("strict", "unsigned"): ("failed", "unsigned", "plugin.load.failed"),
    ("strict", "invalid"): ("failed", "invalid", "plugin.signature.invalid"),
    ("strict", "untrusted"): ("failed", "invalid", "plugin.signature.invalid"),
    ("strict", "valid"): ("enabled", "verified", "plugin.signature.verified"),
    ("warn", "unsigned"): ("enabled", "unsigned", "plugin.signature.unsigned"),
    ("warn", "invalid"): ("enabled", "invalid", "plugin.signature.invalid"),
    ("warn", "untrusted"): ("enabled", "invalid", "plugin.signature.invalid"),
    ("warn", "valid"): ("enabled", "verified", "plugin.signature.verified"),
    ("disabled", "unsigned"): ("enabled", "skipped", "plugin.signature.skipped"),
    ("disabled", "invalid"): ("enabled", "skipped", "plugin.signature.skipped"),
    ("disabled", "untrusted"): ("enabled", "skipped", "plugin.signature.skipped"),
    ("disabled", "valid"): ("enabled", "skipped", "plugin.signature.skipped"),
}


def _make(case: str, plugins: PluginFactory, tmp: Path) -> Path:
    if case == "unsigned":
        return plugins.write("p", sign=False)
    if case == "untrusted":
        key = tmp / "other.key"
        key.write_bytes(private_key_pem(nacl.signing.SigningKey.generate()))
        return plugins.write("p", key_file=key)
    path = plugins.write("p")
    if case == "invalid":  # signed, then the code changed
        (path / "plugin.py").write_text((path / "plugin.py").read_text() + "\n# tampered\n")
    return path


@pytest.mark.parametrize(("mode", "case"), sorted(TABLE))
async def test_trust_table(
    mode: str, case: str, env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Each mode x signature case ends in the state and status the contract gives."""
    _make(case, plugins, env.tmp)
    manager = await make_manager(TrustMode(mode))
    result = await manager.discover()
    state, status, event = TABLE[(mode, case)]
    record = manager.get("test.p")
    assert (record.state.value, record.signature_status) == (state, status)
    assert event in env.names()
    assert (result.discovered == ["test.p"]) is (state == "enabled")
    if state == "failed":
        assert record.error is not None
        assert record.error["code"] == f"signature_{status}"
        assert result.failed[0].to_json()["code"] == f"signature_{status}"


async def test_refused_plugin_never_executes(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """In strict mode an unverified plugin's module code never runs (no side effects)."""
    marker = env.tmp / "ran"
    plugins.write(
        "p",
        sign=False,
        code=f"open({str(marker)!r}, 'w').close()\n"
        "class Plugin:\n    def run(self, p, c): return {}\n",
    )
    manager = await make_manager(TrustMode.STRICT)
    await manager.discover()
    assert manager.get("test.p").state.value == "failed"
    assert not marker.exists()


async def test_verified_records_key_id(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """signing_key_id is the stem of the key file that verified the plugin."""
    plugins.write("p")
    manager = await make_manager()
    await manager.discover()
    assert manager.get("test.p").signing_key_id == "vector-signer"


async def test_any_trusted_key_is_enough(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """With several keys, the one that verifies is named."""
    other = nacl.signing.SigningKey.generate()
    key = env.tmp / "second.key"
    key.write_bytes(private_key_pem(other))
    from aisoc_plugind.core.signing import public_key_pem

    (env.keys / "second.pub").write_bytes(public_key_pem(other.verify_key))
    plugins.write("p", key_file=key)
    manager = await make_manager()
    await manager.discover()
    assert manager.get("test.p").signing_key_id == "second"


async def test_vector_plugins_load_verified(env: Env, make_manager: ManagerFactory) -> None:
    """Both vector plugins load verified in strict mode and run."""
    from tests.conftest import VECTORS, copy_tree

    for name in ("geoip-enricher", "legacy-connector"):
        copy_tree(VECTORS / "plugins" / name, env.plugins / name)
    manager = await make_manager()
    result = await manager.discover()
    assert sorted(result.discovered) == ["example.geoip-enricher", "example.legacy-connector"]
    geo = await manager.run("example.geoip-enricher", {"ip": "1.1.1.1"})
    assert geo.result == {"ip": "1.1.1.1", "country": "AU"}
    legacy = await manager.run("example.legacy-connector", {})
    assert legacy.result == {"result": "pong"}


async def test_vector_plugins_refused_under_untrusted_key(
    env: Env, make_manager: ManagerFactory
) -> None:
    """With only the untrusted key, strict mode refuses both vectors as invalid."""
    from tests.conftest import UNTRUSTED_PUB, VECTORS, copy_tree

    for name in ("geoip-enricher", "legacy-connector"):
        copy_tree(VECTORS / "plugins" / name, env.plugins / name)
    (env.keys / "vector-signer.pem").unlink()
    shutil.copy(UNTRUSTED_PUB, env.keys / "untrusted-signer.pem")
    manager = await make_manager()
    result = await manager.discover()
    assert result.discovered == []
    assert {r.signature_status for r in manager.records()} == {"invalid"}
