"""The manager under a revocation list: what is disabled, what is restored, per trust mode."""

from __future__ import annotations

from aisoc_plugind.core.revocation import EMPTY, RevocationList
from aisoc_plugind.core.signing import TrustMode
from tests.conftest import Env, ManagerFactory, PluginFactory


async def test_warn_mode_revokes_an_unsigned_digest_and_restores_it(
    make_manager: ManagerFactory, plugins: PluginFactory, env: Env
) -> None:
    """In warn mode a listed digest disables even an unsigned plugin; lifting re-enables it."""
    plugins.write("a", sign=False)
    manager = await make_manager(TrustMode.WARN)
    await manager.discover()
    digest = manager.get("test.a").digest
    assert digest is not None
    outcome = await manager.adopt_revocations(RevocationList(digests=frozenset({digest})))
    assert outcome.revoked == ["test.a"]
    record = manager.get("test.a")
    assert (record.state.value, record.signature_status) == ("disabled", "revoked")
    outcome = await manager.adopt_revocations(EMPTY)
    assert outcome.restored == ["test.a"]
    record = manager.get("test.a")
    assert (record.state.value, record.signature_status) == ("enabled", "unsigned")
    assert "plugin.revoked" in env.names()


async def test_disabled_mode_revokes_nothing(
    make_manager: ManagerFactory, plugins: PluginFactory
) -> None:
    """With signatures not checked, the revocation list does not apply."""
    plugins.write("a")
    manager = await make_manager(TrustMode.DISABLED)
    await manager.discover()
    digest = manager.get("test.a").digest
    assert digest is not None
    outcome = await manager.adopt_revocations(RevocationList(digests=frozenset({digest})))
    assert outcome.revoked == []
    assert manager.get("test.a").state.value == "enabled"


async def test_a_revoked_key_id_that_signs_nothing_changes_nothing(
    make_manager: ManagerFactory, plugins: PluginFactory
) -> None:
    """Revoking an unrelated key id leaves plugins another key verifies serving."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    outcome = await manager.adopt_revocations(RevocationList(keys=frozenset({"other"})))
    assert (outcome.revoked, manager.get("test.a").state.value) == ([], "enabled")


async def test_new_keyring_keeps_a_revoked_plugin_revoked(
    make_manager: ManagerFactory, plugins: PluginFactory
) -> None:
    """A SIGHUP key re-check does not turn a revoked plugin into a merely `invalid` one."""
    plugins.write("a")
    manager = await make_manager()
    await manager.discover()
    await manager.adopt_revocations(RevocationList(keys=frozenset({"vector-signer"})))
    await manager.adopt_keyring(manager.keyring)
    assert manager.get("test.a").signature_status == "revoked"
