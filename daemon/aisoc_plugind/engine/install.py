"""Stage fetched packages inside `plugins.dir` and move verified ones into place.

The engine does not know registries: a `PackageFetcher` (the OCI client, wired in by the
service) returns a package that can unpack itself. Staging directories are hidden
(`.staging-*`), so discovery and the watcher never take them for plugins, and they are
removed whatever happens. A replaced version waits in `.previous/<id>@<version>/` (hidden
too). `pull_verified` is the same fetch, extraction and verification without a daemon
(`aisoc plugin pull`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import nacl.signing

from aisoc_plugind.core.signing import TrustDecision, TrustMode
from aisoc_plugind.engine.scan import scan
from aisoc_plugind.errors import PluginLoadError, PluginStateConflict, SignatureRefused
from aisoc_plugind.files import fsync_dir

__all__ = [
    "PREVIOUS_DIR",
    "Fetched",
    "FetchedPackage",
    "PackageFetcher",
    "PulledPlugin",
    "Staging",
    "Swap",
    "pull_verified",
]

PREVIOUS_DIR = ".previous"


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class FetchedPackage(Protocol):
    """A package pulled and checked by digest, not yet written anywhere."""

    @property
    def digest(self) -> str:
        """Return the digest of the manifest that named the package."""

    @property
    def pinned(self) -> bool:
        """Return True when the reference named a digest, not only a tag."""

    def extract_into(self, staging: Path) -> object:
        """Unpack into the empty directory `staging` (blocking; raises PluginDError)."""


class PackageFetcher(Protocol):
    """Fetch the package an OCI reference names (blocking; raises PluginDError)."""

    def __call__(self, ref: str) -> FetchedPackage:
        """Return the fetched package."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    """A package unpacked into its staging directory."""

    digest: str
    pinned: bool
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Swap:
    """A replacement in place: the new files at `target`, the old directory at `previous`."""

    staging: Path
    target: Path
    old: Path | None
    previous: Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PulledPlugin:
    """A package pulled, verified and placed by `pull_verified`."""

    plugin_id: str
    version: str
    digest: str
    path: Path
    decision: TrustDecision


class Staging:
    """Hidden staging directories under `plugins.dir`, and the moves into place."""

    def __init__(self, plugins_dir: Path, fetch: PackageFetcher) -> None:
        self.plugins_dir = plugins_dir
        self._fetch = fetch

    @asynccontextmanager
    async def fetched(self, ref: str) -> AsyncIterator[Fetched]:
        """Fetch `ref` and unpack it into a fresh staging directory.

        The staging directory is removed on the way out (a placed package was moved away).
        """
        package = await anyio.to_thread.run_sync(self._fetch, ref)
        staging = await anyio.to_thread.run_sync(self.make)
        try:
            await anyio.to_thread.run_sync(package.extract_into, staging)
            yield Fetched(digest=package.digest, pinned=package.pinned, path=staging)
        finally:
            await anyio.to_thread.run_sync(
                functools.partial(shutil.rmtree, staging, ignore_errors=True)
            )

    def make(self) -> Path:
        """Create an empty hidden staging directory (blocking)."""
        try:
            return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.plugins_dir))
        except OSError as exc:
            raise PluginLoadError(
                f"cannot stage an install in {self.plugins_dir}: {exc.strerror} (the "
                "service needs write access to plugins.dir to install from OCI)",
                code="plugin_dir_not_writable",
            ) from exc

    def place(self, staging: Path, plugin_id: str) -> Path:
        """Move a verified staging directory to `plugins.dir/<id>`; never overwrite."""
        target = self.plugins_dir / plugin_id
        if target.exists() or target.is_symlink():
            raise _dir_exists(target)
        staging.chmod(0o755)
        staging.rename(target)
        return target

    def swap(self, staging: Path, plugin_id: str, current: Path | None, version: str) -> Swap:
        """Move the directory holding `plugin_id` (`current`, else `plugins.dir/<id>`) to
        `.previous/<id>@<version>/` and the verified staging directory to `plugins.dir/<id>`.

        A `plugins.dir/<id>` that is not the plugin's current directory is never touched.
        Blocking; undo with `swap_back`.
        """
        target = self.plugins_dir / plugin_id
        old = current if current is not None and current.is_dir() else None
        taken = target.exists() or target.is_symlink()
        if taken and old is not None and target != old:
            raise _dir_exists(target)
        old = old or (target if taken else None)
        previous = self._previous(plugin_id, version) if old is not None else None
        if old is not None and previous is not None:
            old.rename(previous)
        try:
            staging.chmod(0o755)
            staging.rename(target)
        except OSError:
            if old is not None and previous is not None:
                previous.rename(old)
            raise
        self._sync(previous)
        return Swap(staging=staging, target=target, old=old, previous=previous)

    def swap_back(self, swap: Swap) -> None:
        """Undo `swap`: the new files back to staging, the old directory where it was."""
        with contextlib.suppress(FileNotFoundError):
            swap.target.rename(swap.staging)
        if swap.old is not None and swap.previous is not None:
            swap.previous.rename(swap.old)
        self._sync(swap.previous)

    def _previous(self, plugin_id: str, version: str) -> Path:
        """Return a free `.previous/<id>@<version>[~N]` path (the directory is created)."""
        parent = self.plugins_dir / PREVIOUS_DIR
        parent.mkdir(mode=0o755, exist_ok=True)
        name = f"{plugin_id}@{_UNSAFE.sub('_', version)[:64] or 'unknown'}"
        candidate, n = parent / name, 1
        while candidate.exists() or candidate.is_symlink():
            n += 1
            candidate = parent / f"{name}~{n}"
        return candidate

    def _sync(self, previous: Path | None) -> None:
        """Make the renames durable (best effort: a failed fsync does not undo a move)."""
        for directory in (self.plugins_dir, previous.parent if previous else None):
            if directory is not None:
                with contextlib.suppress(OSError):
                    fsync_dir(directory)


def _dir_exists(target: Path) -> PluginStateConflict:
    return PluginStateConflict(
        f"{target} already exists; remove it (or install with replace, or into a new "
        "directory and reload) — installed plugin files are never overwritten",
        code="plugin_dir_exists",
    )


def pull_verified(
    fetch: PackageFetcher,
    ref: str,
    into: Path,
    *,
    mode: TrustMode,
    keys: Mapping[str, nacl.signing.VerifyKey],
) -> PulledPlugin:
    """Fetch `ref`, unpack it into a hidden staging directory in `into`, verify it under
    `mode` as the daemon's load does (`engine.scan.scan`), and move it to `into/<id>`.

    Blocking. Nothing reaches `into/<id>` unless the trust mode allows it; an existing
    `into/<id>` is never overwritten. Raises PluginDError.
    """
    package = fetch(ref)
    staging = Staging(into, fetch)
    path = staging.make()
    try:
        package.extract_into(path)
        scanned = scan(path, mode, keys, compile_code=False)
        if scanned.error is not None:
            raise scanned.error
        assert scanned.manifest is not None
        assert scanned.decision is not None
        decision = scanned.decision
        if not decision.allowed:
            raise SignatureRefused(
                f"trust mode {mode.value} refuses a plugin whose signature is "
                f"{decision.status.value}: {decision.reason}",
                code=f"signature_{decision.status.value}",
            )
        target = staging.place(path, scanned.manifest.id)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    m = scanned.manifest
    return PulledPlugin(
        plugin_id=m.id, version=m.version, digest=package.digest, path=target, decision=decision
    )
