"""Say what an author's plugin directory holds: the tree, junk and doc files, safe I/O."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

from aisoc_plugind.engine.bundle import (
    Tree,
    read_plugin_file,
    scan_tree,
)
from aisoc_plugind.errors import (
    AuthoringError,
    BundleError,
)
from aisoc_plugind.files import replace_file, write_new

# Plugin files authors read whole (a package's largest file is 32 MiB).
_MAX_READ = 64 * 1024 * 1024

__all__ = [
    "DOC_FILES",
    "EXCLUDED_DIRS",
    "JUNK_FILES",
    "is_junk",
    "matches",
    "packaged",
    "read_file",
    "scan",
    "write_file",
    "write_new_file",
]

# Never scanned nor packaged: caches and VCS metadata.
EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".idea",
        ".vscode",
    }
)


# Never packaged (a `*.py` name always is, since the signature covers it): bytecode, editor
# swap/backup/lock files, desktop metadata.
JUNK_FILES = (
    "*.pyc",
    "*.pyo",
    ".DS_Store",
    "Thumbs.db",
    "*~",
    "*.swp",
    "*.swo",
    "*.swx",
    ".#*",
    "#*#",
)


# Side files that carry no behaviour; the "not covered by the signature" warning skips them.
DOC_FILES = ("README*", "LICENSE*", "LICENCE*", "COPYING*", "NOTICE*", "CHANGELOG*")


def _require_plugin_dir(root: Path) -> None:
    if root.is_symlink():
        raise AuthoringError(
            f"{root} is a symlink; the daemon refuses linked plugin directories, give the real path"
        )
    if not root.exists():
        raise AuthoringError(f"{root}: no such directory")
    if not root.is_dir():
        raise AuthoringError(f"{root} is not a directory")


def _name(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def matches(rel: str, patterns: Sequence[str]) -> bool:
    name = _name(rel)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_junk(rel: str) -> bool:
    return matches(rel, JUNK_FILES)


def scan(root: Path) -> Tree:
    """List a plugin directory as authors see it (caches and VCS folders skipped)."""
    _require_plugin_dir(root)
    return scan_tree(root, skip_dirs=EXCLUDED_DIRS)


def packaged(tree: Tree) -> tuple[str, ...]:
    """Return the files a package holds: everything but junk; every `*.py` file."""
    return tuple(f for f in tree.files if f.endswith(".py") or not is_junk(f))


def read_file(root: Path, rel: str, limit: int | None = None) -> bytes:
    """Read a file of the plugin at `root` as the daemon's reader does (no link followed).

    With `limit`, at most that many bytes are returned (the file may be larger).
    """
    try:
        if limit is None:
            return read_plugin_file(root, rel, cap=_MAX_READ)
        return read_plugin_file(root, rel, cap=limit, head=True)
    except BundleError as exc:
        raise AuthoringError(exc.message) from exc


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode`; never overwrite, never follow a link."""
    try:
        write_new(path, data, mode)
    except FileExistsError as exc:
        raise AuthoringError(f"{path} already exists; refusing to overwrite it") from exc


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` atomically: a temporary file beside it, then rename over it."""
    # The `~` suffix makes a leftover temporary file junk that packages leave out.
    replace_file(path, data, mode=mode, tmp_suffix="~")
