"""install_from_oci end to end: real registry, real signed packages, the HTTP route."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.api.errors import status_for
from aisoc_plugind.authoring.packaging import build_package
from aisoc_plugind.delivery.oci import push_package
from aisoc_plugind.errors import PluginDError
from tests.api_fixtures import serve_api
from tests.conftest import Env, ManagerFactory, PluginFactory
from tests.oci_registry import (  # noqa: F401 - the fixtures
    RunningRegistry,
    hermetic,  # autouse: no proxy, no Docker config
    oci_auth_registry_fixture,
    oci_registry_fixture,
)

pytestmark = pytest.mark.oci


def _push(
    registry: str,
    tmp: Path,
    repo: str,
    *,
    version: str = "1.0.0",
    sign: bool = True,
    code: str | None = None,
    **push_options: Any,
) -> str:
    src = PluginFactory(tmp / f"src-{repo}-{version}")
    plugin_dir = src.write("pkg", plugin_id="acme.installed", version=version, sign=sign, code=code)
    archive = tmp / f"{repo}-{version}.tar.gz"
    archive.write_bytes(build_package(plugin_dir).data)
    ref = f"{registry}/aisoc/{repo}:{version}"
    digest = push_package(archive, ref, **(push_options or {"insecure_registries": [registry]}))
    return f"{registry}/aisoc/{repo}@{digest}"  # pinned: oci.require_digest is on by default


def _leftovers(env: Env) -> list[str]:
    return [p.name for p in env.plugins.iterdir() if p.name.startswith(".")]


async def test_install_over_http_lands_enabled(
    oci_registry: str, env: Env, plugins: PluginFactory
) -> None:
    """POST install_from_oci: 201 with id/ref/digest; the plugin serves; events with actor."""
    ref = _push(oci_registry, env.tmp, "http-ok")
    async with serve_api(env, plugins, oci_allow_insecure_registries=(oci_registry,)) as api:
        status, body = await api.json(
            "POST", "/api/v1/plugins/install_from_oci", json={"oci_ref": ref}
        )
        assert status == 201, body
        assert body["plugin_id"] == "acme.installed" and body["digest"].startswith("sha256:")
        status, run = await api.json("POST", "/api/v1/plugins/acme.installed/run")
        assert (status, run["result"]["version"]) == (200, "1.0.0")
        done = api.events("plugin.install.completed")
        assert done[0]["actor"] == "root" and done[0]["digest"] == body["digest"]
    assert (env.plugins / "acme.installed" / "plugin.sig").exists()
    assert _leftovers(env) == []


async def test_unsigned_package_is_refused_and_nothing_is_placed(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """Strict mode: an unsigned package never reaches plugins.dir and its code never runs."""
    marker = env.tmp / "ran"
    ref = _push(
        oci_registry,
        env.tmp,
        "unsigned",
        sign=False,
        code=f"open({str(marker)!r}, 'w').close()\nclass Plugin:\n"
        "    def run(self, p, c): return {}\n",
    )
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert info.value.code == "signature_unsigned"
    assert not (env.plugins / "acme.installed").exists() and _leftovers(env) == []
    assert not marker.exists()
    assert "plugin.install.failed" in env.names()


async def test_existing_directory_is_never_overwritten(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """A second install of the same id is refused 409; the files on disk are untouched."""
    ref = _push(oci_registry, env.tmp, "twice")
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(ref)
    before = (env.plugins / "acme.installed" / "plugin.py").read_bytes()
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert (info.value.code, status_for(info.value)) == ("plugin_dir_exists", 409)
    assert (env.plugins / "acme.installed" / "plugin.py").read_bytes() == before
    assert _leftovers(env) == []


async def test_upgrade_by_install_after_removing_the_old_dir(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """Old dir removed (plugin keeps serving), install 2.0.0: the new version replaces it."""
    old, new = (_push(oci_registry, env.tmp, "upgrade", version=v) for v in ("1.0.0", "2.0.0"))
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    await manager.install_from_oci(old)
    shutil.rmtree(env.plugins / "acme.installed")
    await manager.install_from_oci(new)
    record = manager.get("acme.installed")
    assert record.version == "2.0.0" and not record.path_missing
    assert (await manager.run("acme.installed", {})).result["version"] == "2.0.0"


async def test_registry_not_allow_listed_is_refused(
    oci_registry: str, env: Env, make_manager: ManagerFactory
) -> None:
    """Plain HTTP to a registry not in oci.allow_insecure_registries fails; nothing placed."""
    ref = _push(oci_registry, env.tmp, "nohttp")
    manager = await make_manager()
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert info.value.code == "oci_insecure_registry"
    assert list(env.plugins.iterdir()) == []


async def test_install_from_a_tls_registry_with_credentials(
    oci_auth_registry: RunningRegistry, env: Env, make_manager: ManagerFactory
) -> None:
    """oci.ca_file and oci.docker_config reach the pull: TLS + htpasswd install lands enabled."""
    reg = oci_auth_registry
    config = reg.docker_config(env.tmp / "docker" / "config.json")
    ref = _push(reg.host, env.tmp, "tls-auth", ca_file=reg.ca_file, docker_config=config)
    manager = await make_manager(oci_ca_file=reg.ca_file, oci_docker_config=config)
    result = await manager.install_from_oci(ref)
    assert result.plugin_id == "acme.installed"
    assert manager.get("acme.installed").state == "enabled"
    assert "plugin.install.completed" in env.names()


async def test_refused_credentials_never_reach_the_events(
    oci_auth_registry: RunningRegistry, env: Env, make_manager: ManagerFactory
) -> None:
    """A wrong password fails the install `oci_unauthorized`; no event or log line holds it."""
    reg = oci_auth_registry
    good = reg.docker_config(env.tmp / "good.json")
    ref = _push(reg.host, env.tmp, "tls-bad-pw", ca_file=reg.ca_file, docker_config=good)
    secret = "wrong-but-secret-Pa55"
    bad = reg.docker_config(env.tmp / "bad.json", password=secret)
    manager = await make_manager(oci_ca_file=reg.ca_file, oci_docker_config=bad)
    with pytest.raises(PluginDError) as info:
        await manager.install_from_oci(ref)
    assert info.value.code == "oci_unauthorized"
    assert "plugin.install.failed" in env.names()
    for text in (env.audit.read_text(), env.stdout.getvalue(), str(info.value)):
        assert secret not in text and reg.password not in text
    assert list(env.plugins.iterdir()) == []
