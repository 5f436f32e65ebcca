"""Push real plugin packages to a test registry: signed or not, working or broken setup()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisoc_plugind.authoring.packaging import build_package
from aisoc_plugind.delivery.oci import push_package
from tests.conftest import PluginFactory

PLUGIN_ID = "acme.delivered"

FAILING_SETUP = """
VERSION = {version!r}
class Plugin:
    async def setup(self):
        raise RuntimeError("this build cannot start")
    def run(self, payload, context):
        return {{"version": VERSION}}
"""


def push_plugin(
    registry: str,
    tmp: Path,
    repo: str,
    tag: str,
    *,
    version: str = "1.0.0",
    sign: bool = True,
    code: str | None = None,
    plugin_id: str = PLUGIN_ID,
    **push_options: Any,
) -> str:
    """Package a plugin of `version` and push it to `registry/aisoc/<repo>:<tag>`.

    Returns the pinned reference `registry/aisoc/<repo>@sha256:...`. Without `push_options`
    the registry is reached over plain HTTP (the plain fixture).
    """
    src = PluginFactory(tmp / f"src-{repo}-{tag}-{version}-{'s' if sign else 'u'}")
    plugin_dir = src.write("pkg", plugin_id=plugin_id, version=version, sign=sign, code=code)
    archive = tmp / f"{repo}-{tag}-{version}.tar.gz"
    archive.write_bytes(build_package(plugin_dir).data)
    options = push_options or {"insecure_registries": [registry]}
    digest = push_package(archive, f"{registry}/aisoc/{repo}:{tag}", **options)
    return f"{registry}/aisoc/{repo}@{digest}"


def failing_setup(version: str) -> str:
    """Return plugin code whose setup() raises (a build that never becomes ready)."""
    return FAILING_SETUP.format(version=version)
