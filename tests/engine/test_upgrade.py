"""OCI installs under the delivery policy, and upgrades in place with `replace` (real registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aisoc_plugind.api.errors import status_for
from aisoc_plugind.errors import PluginDError
from aisoc_plugind.service.watcher import relevant_parts
from tests.api_fixtures import serve_api
from tests.conftest import Env, ManagerFactory, PluginFactory
from tests.delivery.pushes import PLUGIN_ID, failing_setup, push_plugin
from tests.oci_registry import (  # noqa: F401 - the fixtures
    RunningRegistry,
    hermetic,  # autouse: no proxy, no Docker config
    oci_registry_fixture,
    oci_tls_registry_fixture,
)

pytestmark = pytest.mark.oci


def _tag(pinned_ref: str, tag: str) -> str:
    return f"{pinned_ref.partition('@')[0]}:{tag}"


def _hidden(env: Env) -> list[str]:
    return sorted(p.name for p in env.plugins.iterdir() if p.name.startswith("."))


def _previous(env: Env) -> list[str]:
    previous = env.plugins / ".previous"
    return sorted(p.name for p in previous.iterdir()) if previous.is_dir() else []


def _version_on_disk(path: Path) -> str:
    return str(json.loads((path / "plugin.yaml").read_text())["version"])


async def test_a_tag_is_refused_by_default_naming_the_setting(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """oci.require_digest (default true): a tag is 400 oci_tag_not_pinned; nothing placed."""
    ref = _tag(push_plugin(oci_registry, env.tmp, "pin", "1.0.0"), "1.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert (info.value.code, status_for(info.value)) == ("oci_tag_not_pinned", 400)
    assert "oci.require_digest" in info.value.message
    assert list(env.plugins.iterdir()) == []
    failed = [e for e in env.audit_events() if e["event"] == "plugin.install.failed"]
    assert failed[0]["error_code"] == "oci_tag_not_pinned"


async def test_a_digest_installs_without_the_unpinned_warning(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """A pinned reference installs; no plugin.install.unpinned."""
    ref = push_plugin(oci_registry, env.tmp, "pinned", "1.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    result = await manager.install_from_oci(ref)
    assert result.digest == ref.partition("@")[2]
    assert "plugin.install.unpinned" not in env.names()


async def test_a_tag_installs_with_a_warning_when_allowed(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """oci.require_digest = false: the tag installs, and plugin.install.unpinned says so."""
    pinned = push_plugin(oci_registry, env.tmp, "unpinned", "1.0.0")
    manager = await make_manager(
        oci_allow_insecure_registries=(oci_registry,), oci_require_digest=False
    )
    await manager.install_from_oci(_tag(pinned, "1.0.0"))
    assert manager.get(PLUGIN_ID).state == "enabled"
    warned = [e for e in env.audit_events() if e["event"] == "plugin.install.unpinned"]
    assert warned[0]["level"] == "warning"
    assert warned[0]["digest"] == pinned.partition("@")[2]
    assert warned[0]["oci_ref"] == _tag(pinned, "1.0.0")


async def test_a_registry_outside_the_allow_list_is_403(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """A non-empty oci.allowed_registries refuses other registries before any request."""
    ref = push_plugin(oci_registry, env.tmp, "allow", "1.0.0")
    manager = await make_manager(
        oci_allow_insecure_registries=(oci_registry,),
        oci_allowed_registries=("registry.example.org",),
    )
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert (info.value.code, status_for(info.value)) == ("oci_registry_not_allowed", 403)
    assert "oci.allowed_registries" in info.value.message
    assert list(env.plugins.iterdir()) == []


async def test_a_listed_registry_installs(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """The registry named in oci.allowed_registries installs (host:port, any case)."""
    ref = push_plugin(oci_registry, env.tmp, "listed", "1.0.0")
    manager = await make_manager(
        oci_allow_insecure_registries=(oci_registry,),
        oci_allowed_registries=("registry.example.org", oci_registry.upper()),
    )
    assert (await manager.install_from_oci(ref)).plugin_id == PLUGIN_ID


async def test_the_api_answers_policy_refusals_with_their_status(
    oci_registry: str, env: Env, plugins: PluginFactory
) -> None:
    """POST install_from_oci: a tag is 400 oci_tag_not_pinned; a non-bool replace is 400."""
    pinned = push_plugin(oci_registry, env.tmp, "api-pin", "1.0.0")
    async with serve_api(env, plugins, oci_allow_insecure_registries=(oci_registry,)) as api:
        path = "/api/v1/plugins/install_from_oci"
        status, body = await api.json("POST", path, json={"oci_ref": _tag(pinned, "1.0.0")})
        assert (status, body["error"]["code"]) == (400, "oci_tag_not_pinned")
        assert "oci.require_digest" in body["error"]["message"]
        status, body = await api.json("POST", path, json={"oci_ref": pinned, "replace": "yes"})
        assert (status, body["error"]["code"]) == (400, "invalid_body")
        status, body = await api.json("POST", path, json={"oci_ref": pinned, "replace": True})
        assert status == 201, body


async def test_a_tls_registry_needs_its_ca(
    oci_tls_registry: RunningRegistry, env: Env, make_manager: ManagerFactory
) -> None:
    """Without oci.ca_file a private-CA registry is 502 oci_tls_error; with it, it installs."""
    reg = oci_tls_registry
    ref = push_plugin(reg.host, env.tmp, "tls-ca", "1.0.0", ca_file=reg.ca_file)
    manager = await make_manager()
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert (info.value.code, status_for(info.value)) == ("oci_tls_error", 502)
    assert "oci.ca_file" in info.value.message
    assert list(env.plugins.iterdir()) == []
    trusting = await make_manager(oci_ca_file=reg.ca_file)
    assert (await trusting.install_from_oci(ref)).plugin_id == PLUGIN_ID


async def test_replace_upgrades_and_keeps_the_old_directory(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """replace: the new version serves from plugins.dir/<id>; the old one waits in .previous."""
    old = push_plugin(oci_registry, env.tmp, "up", "1.0.0", version="1.0.0")
    new = push_plugin(oci_registry, env.tmp, "up", "2.0.0", version="2.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    assert (await manager.run(PLUGIN_ID, {})).result["version"] == "1.0.0"
    result = await manager.install_from_oci(new, replace=True)
    assert result.digest == new.partition("@")[2]
    assert (await manager.run(PLUGIN_ID, {})).result["version"] == "2.0.0"
    record = manager.get(PLUGIN_ID)
    assert (record.version, record.path) == ("2.0.0", str(env.plugins / PLUGIN_ID))
    assert _version_on_disk(env.plugins / PLUGIN_ID) == "2.0.0"
    assert _previous(env) == [f"{PLUGIN_ID}@1.0.0"]
    assert _version_on_disk(env.plugins / ".previous" / f"{PLUGIN_ID}@1.0.0") == "1.0.0"
    assert _hidden(env) == [".previous"]
    names = env.names()
    assert "plugin.reload.completed" in names and "plugin.install.completed" in names


async def test_without_replace_an_installed_id_is_still_refused(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """Installing an id that is installed, without replace, is 409 plugin_dir_exists."""
    old = push_plugin(oci_registry, env.tmp, "norep", "1.0.0", version="1.0.0")
    new = push_plugin(oci_registry, env.tmp, "norep", "2.0.0", version="2.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(new)
    assert (info.value.code, status_for(info.value)) == ("plugin_dir_exists", 409)
    assert _version_on_disk(env.plugins / PLUGIN_ID) == "1.0.0"


async def test_a_failed_upgrade_leaves_the_old_version_serving_where_it_was(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """A new version whose setup() fails: the old one serves on, its directory unmoved."""
    old = push_plugin(oci_registry, env.tmp, "bad-up", "1.0.0", version="1.0.0")
    broken = push_plugin(
        oci_registry, env.tmp, "bad-up", "2.0.0", version="2.0.0", code=failing_setup("2.0.0")
    )
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    with pytest.raises(PluginDError):
        await manager.install_from_oci(broken, replace=True)
    assert (await manager.run(PLUGIN_ID, {})).result["version"] == "1.0.0"
    assert manager.get(PLUGIN_ID).state == "enabled"
    assert _version_on_disk(env.plugins / PLUGIN_ID) == "1.0.0"
    assert _previous(env) == []
    assert [n for n in _hidden(env) if n != ".previous"] == []
    assert "plugin.reload.failed" in env.names()


async def test_an_unsigned_upgrade_touches_nothing(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """Strict mode refuses an unsigned build in staging: no move, old version serving."""
    old = push_plugin(oci_registry, env.tmp, "unsigned-up", "1.0.0", version="1.0.0")
    unsigned = push_plugin(
        oci_registry, env.tmp, "unsigned-up", "2.0.0", version="2.0.0", sign=False
    )
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(unsigned, replace=True)
    assert info.value.code == "signature_unsigned"
    assert (await manager.run(PLUGIN_ID, {})).result["version"] == "1.0.0"
    assert _hidden(env) == []


async def test_replace_of_an_id_not_installed_is_a_plain_install(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """replace with nothing to replace installs into plugins.dir/<id>; nothing in .previous."""
    ref = push_plugin(oci_registry, env.tmp, "fresh", "1.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(ref, replace=True)
    assert manager.get(PLUGIN_ID).state == "enabled"
    assert _previous(env) == []


async def test_previous_versions_are_never_discovered(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """After an upgrade, discovery (in this and in a new daemon) ignores `.previous/`."""
    old = push_plugin(oci_registry, env.tmp, "prev", "1.0.0", version="1.0.0")
    new = push_plugin(oci_registry, env.tmp, "prev", "2.0.0", version="2.0.0")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    await manager.install_from_oci(new, replace=True)
    result = await manager.discover()
    assert (result.discovered, result.failed) == ([], [])
    fresh = await make_manager()
    result = await fresh.discover()
    assert (result.discovered, result.failed) == ([PLUGIN_ID], [])
    assert [r.version for r in fresh.records()] == ["2.0.0"]
    assert "plugin.duplicate_id" not in env.names()


def test_the_watcher_ignores_previous_versions() -> None:
    """Changes under `.previous/` never reach the watcher's sync."""
    root = "/srv/plugins"
    assert relevant_parts(f"{root}/.previous/acme@1.0.0/plugin.py", root) is None
    assert relevant_parts(f"{root}/.previous", root) is None
    assert relevant_parts(f"{root}/acme/plugin.py", root) == ("acme", "plugin.py")
