"""Stage fetched packages inside `plugins.dir` and move verified ones into place.

The engine does not know registries: a `PackageFetcher` (the OCI client, wired in by the
service) returns a package that can unpack itself. Staging directories are hidden
(`.staging-*`), so discovery and the watcher never take them for plugins, and they are
removed whatever happens.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import anyio

from aisoc_plugind.errors import PluginLoadError, PluginStateConflict

__all__ = ["FetchedPackage", "PackageFetcher", "Staging"]


class FetchedPackage(Protocol):
    """A package pulled and checked by digest, not yet written anywhere."""

    @property
    def digest(self) -> str:
        """Return the digest of the manifest that named the package."""

    def extract_into(self, staging: Path) -> object:
        """Unpack into the empty directory `staging` (blocking; raises PluginDError)."""


class PackageFetcher(Protocol):
    """Fetch the package an OCI reference names (blocking; raises PluginDError)."""

    def __call__(self, ref: str) -> FetchedPackage:
        """Return the fetched package."""


class Staging:
    """Hidden staging directories under `plugins.dir`, and the move into place."""

    def __init__(self, plugins_dir: Path, fetch: PackageFetcher) -> None:
        self.plugins_dir = plugins_dir
        self._fetch = fetch

    @asynccontextmanager
    async def fetched(self, ref: str) -> AsyncIterator[tuple[str, Path]]:
        """Fetch `ref` and unpack it into a fresh staging directory; yield (digest, dir).

        The staging directory is removed on the way out (a placed package was moved away).
        """
        package = await anyio.to_thread.run_sync(self._fetch, ref)
        staging = await anyio.to_thread.run_sync(self._make)
        try:
            await anyio.to_thread.run_sync(package.extract_into, staging)
            yield package.digest, staging
        finally:
            await anyio.to_thread.run_sync(
                functools.partial(shutil.rmtree, staging, ignore_errors=True)
            )

    def _make(self) -> Path:
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
            raise PluginStateConflict(
                f"{target} already exists; remove it (or install into a new directory and "
                "reload) — installed plugin files are never overwritten",
                code="plugin_dir_exists",
            )
        staging.chmod(0o755)
        staging.rename(target)
        return target
