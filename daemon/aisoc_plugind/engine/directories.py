"""Find plugin directories under `plugins.dir`: new candidates, and where an id lives now."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.engine.bundle import has_manifest, read_manifest
from aisoc_plugind.errors import PluginDError

__all__ = ["candidate_dirs", "find_plugin_dir", "manifest_id"]


def candidate_dirs(root: Path, serving: Iterable[Path]) -> list[Path]:
    """Return the plugin directories under `root` that no serving plugin was loaded from.

    Hidden directories are never plugins (OCI installs stage in `.staging-*`, replaced
    versions wait in `.previous/`). An unreadable root gives no candidates.
    """
    try:
        dirs = sorted(p for p in root.iterdir() if not p.name.startswith(".") and has_manifest(p))
    except OSError:
        return []
    taken = set(serving)
    return [p for p in dirs if p not in taken]


def manifest_id(path: Path) -> str | None:
    """Return the id the manifest in `path` declares, or None when it cannot be read."""
    try:
        name, data = read_manifest(path)
        return parse_manifest(data, name).id
    except PluginDError:
        return None


def find_plugin_dir(plugin_id: str, current: Path, others: Iterable[Path]) -> Path | None:
    """Return where `plugin_id` lives now: `current` if it still holds it, else the first of
    `others` that does (the seed's upgrade flow: a new directory, the old one removed).

    A manifest at `current` that cannot be read keeps it `current`: loading from it then says
    what is wrong with it, rather than that the plugin is gone.
    """
    if has_manifest(current) and manifest_id(current) in (plugin_id, None):
        return current
    for path in others:
        if has_manifest(path) and manifest_id(path) == plugin_id:
            return path
    return None
