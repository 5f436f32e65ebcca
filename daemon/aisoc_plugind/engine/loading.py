"""Prepare one plugin version: read once, parse, decide trust, check config, load in a host.

Nothing here changes what serves: the result is a `Prepared` version, which the manager swaps
in (or tears down when something else failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
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
from aisoc_plugind.engine.scan import Scanned
from aisoc_plugind.engine.scanpool import ScanPool, Session, default_workers, scan_here
from aisoc_plugind.engine.trust import TrustGate
from aisoc_plugind.errors import BundleError, PluginDError, PluginLoadError

__all__ = ["Prepared", "Preparer", "read_and_parse"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A version that was read, verified, loaded and set up in a host, ready to serve."""

    bundle: Bundle
    manifest: Manifest
    decision: TrustDecision
    plugin: LoadedPlugin


class Preparer:
    """Turn a plugin directory into a prepared version, or a coded error."""

    def __init__(
        self, settings: Settings, trust: TrustGate, host: PluginHost, pool: ScanPool | None = None
    ) -> None:
        self.settings = settings
        self.trust = trust
        self.host = host
        workers = settings.scan_workers if settings.scan_workers is not None else default_workers()
        self.pool = pool or ScanPool(workers)

    async def read(self, path: Path) -> tuple[Bundle, Manifest]:
        """Snapshot the directory and parse its manifest, both in a worker thread: the
        manifest is hostile until verified, and parsing is never done on the event loop."""
        return await anyio.to_thread.run_sync(read_and_parse, path)

    async def scan(self, path: Path) -> Scanned:
        """Read, parse, check the signature of (and, in process, compile) one directory."""
        found = await anyio.to_thread.run_sync(
            scan_here,
            [path],
            self.trust.mode,
            self.trust.keys,
            self.host.wants_code,
            self.host.state_root,
        )
        return found[0]

    def session(self, paths: Sequence[Path]) -> AbstractAsyncContextManager[Session]:
        """Scan many directories (worker processes when there are many); see ScanPool."""
        return self.pool.session(
            paths,
            self.trust.mode,
            self.trust.keys,
            compile_code=self.host.wants_code,
            state_root=self.host.state_root,
        )

    def admit(self, scanned: Scanned, caller: Caller) -> LoadRequest:
        """Emit the scan's trust decision and check the configuration; return what the host
        loads. Raises SignatureRefused or PluginLoadError."""
        bundle, manifest, decision = _parts(scanned)
        self.trust.admit(decision, bundle, manifest, caller)
        return LoadRequest(
            plugin_id=manifest.id,
            version=manifest.version,
            root=bundle.path,
            sources=bundle.sources,
            entry_point=manifest.entry_point,
            config=self.config_for(manifest, schema_checked=scanned.schema_checked),
            group=_group(manifest.id, decision),
            code=scanned.code,
        )

    async def prepare(self, scanned: Scanned, caller: Caller) -> Prepared:
        """Admit one scanned version and load it in the host; raise PluginDError."""
        request = self.admit(scanned, caller)
        return _prepared(scanned, await self.host.load(request))

    async def load_many(
        self, admitted: Sequence[tuple[Scanned, LoadRequest]]
    ) -> list[Prepared | PluginDError]:
        """Load admitted versions in the host together; one outcome each, in order."""
        if not admitted:
            return []
        loaded = await self.host.load_many([request for _, request in admitted])
        return [
            outcome if isinstance(outcome, PluginDError) else _prepared(scanned, outcome)
            for (scanned, _), outcome in zip(admitted, loaded, strict=True)
        ]

    def config_for(self, manifest: Manifest, *, schema_checked: bool = False) -> dict[str, Any]:
        """Return the plugin's `[plugin_config]`, checked against its `config_schema`
        (`schema_checked`: the scan found the schema valid already)."""
        config = self.settings.config_for(manifest.id)
        schema = manifest.plain.get("config_schema")
        if not isinstance(schema, dict):
            return config
        try:
            problem = config_problem(schema, config, checked=schema_checked)
        except ValueError as exc:
            raise PluginLoadError(str(exc), code="manifest_bad_config_schema") from exc
        if problem is not None:
            raise PluginLoadError(
                f'[plugin_config."{manifest.id}"] does not match config_schema: {problem}',
                code="plugin_config_invalid",
            )
        return config


def read_and_parse(path: Path) -> tuple[Bundle, Manifest]:
    """Snapshot the directory at `path` and parse its manifest (blocking)."""
    try:
        bundle = read_bundle(path)
    except OSError as exc:  # e.g. a subdirectory that cannot be listed
        raise BundleError(
            f"{path}: cannot read: {exc.strerror or exc}", code="bundle_unreadable"
        ) from exc
    return bundle, parse_manifest(bundle.manifest_bytes, bundle.manifest_name)


def _parts(scanned: Scanned) -> tuple[Bundle, Manifest, TrustDecision]:
    bundle, manifest, decision = scanned.bundle, scanned.manifest, scanned.decision
    if scanned.error is not None:
        raise scanned.error
    if bundle is None or manifest is None or decision is None:  # pragma: no cover - scan()
        raise PluginLoadError(f"{scanned.path}: scan gave no result", code="plugin_load_error")
    return bundle, manifest, decision


def _prepared(scanned: Scanned, plugin: LoadedPlugin) -> Prepared:
    bundle, manifest, decision = _parts(scanned)
    return Prepared(bundle=bundle, manifest=manifest, decision=decision, plugin=plugin)


def _group(plugin_id: str, decision: TrustDecision) -> str:
    """Return the host group: plugins signed by one trusted key may share a host."""
    if decision.key_id is not None:
        return f"signer:{decision.key_id}"
    return f"plugin:{plugin_id}"
