"""Prepare one plugin version: read once, parse, decide trust, check config, load in a host.

Nothing here changes what serves: the result is a `Prepared` version, which the manager swaps
in (or tears down when something else failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.config_schema import config_problem
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.core.signing import TrustDecision
from aisoc_plugind.engine.bundle import Bundle, read_bundle
from aisoc_plugind.engine.hosts import LoadedPlugin, LoadRequest, PluginHost
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.engine.trust import TrustGate
from aisoc_plugind.errors import BundleError, PluginLoadError

__all__ = ["Prepared", "Preparer"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A version that was read, verified, loaded and set up in a host, ready to serve."""

    bundle: Bundle
    manifest: Manifest
    decision: TrustDecision
    plugin: LoadedPlugin


class Preparer:
    """Turn a plugin directory into a prepared version, or a coded error."""

    def __init__(self, settings: Settings, trust: TrustGate, host: PluginHost) -> None:
        self.settings = settings
        self.trust = trust
        self.host = host

    async def read(self, path: Path) -> tuple[Bundle, Manifest]:
        """Snapshot the directory (in a worker thread) and parse its manifest."""
        try:
            bundle = await anyio.to_thread.run_sync(read_bundle, path)
        except OSError as exc:  # e.g. a subdirectory that cannot be listed
            raise BundleError(
                f"{path}: cannot read: {exc.strerror or exc}", code="bundle_unreadable"
            ) from exc
        return bundle, parse_manifest(bundle.manifest_bytes, bundle.manifest_name)

    async def prepare(self, bundle: Bundle, manifest: Manifest, caller: Caller) -> Prepared:
        """Verify, configure, import, construct and set up one version; raise PluginDError."""
        decision = self.trust.require(bundle, manifest, caller)
        request = LoadRequest(
            plugin_id=manifest.id,
            version=manifest.version,
            root=bundle.path,
            sources=bundle.sources,
            entry_point=manifest.entry_point,
            config=self.config_for(manifest),
            group=_group(manifest.id, decision),
        )
        plugin = await self.host.load(request)
        return Prepared(bundle=bundle, manifest=manifest, decision=decision, plugin=plugin)

    def config_for(self, manifest: Manifest) -> dict[str, Any]:
        """Return the plugin's `[plugin_config]`, checked against its `config_schema`."""
        config = self.settings.config_for(manifest.id)
        schema = manifest.as_json().get("config_schema")
        if not isinstance(schema, dict):
            return config
        try:
            problem = config_problem(schema, config)
        except ValueError as exc:
            raise PluginLoadError(str(exc), code="manifest_bad_config_schema") from exc
        if problem is not None:
            raise PluginLoadError(
                f'[plugin_config."{manifest.id}"] does not match config_schema: {problem}',
                code="plugin_config_invalid",
            )
        return config


def _group(plugin_id: str, decision: TrustDecision) -> str:
    """Return the host group: plugins signed by one trusted key may share a host."""
    if decision.key_id is not None:
        return f"signer:{decision.key_id}"
    return f"plugin:{plugin_id}"
