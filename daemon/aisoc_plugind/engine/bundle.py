"""Read plugin directories: the one reader of plugin trees, for the daemon and for authors.

`read_bundle` snapshots a plugin directory once, safely, into immutable bytes: every file is
opened relative to its parent directory's descriptor with O_NOFOLLOW, checked with fstat and
read in one go; nothing is reopened by path later. The loader executes exactly the bytes held
here, and the signature covers exactly them. Any symlink inside the plugin tree, or a plugin
directory that is itself a symlink, is refused: a link is how a writable path outside the
plugin smuggles code in. `scan_tree` lists the same tree with the same walker for the
authoring tools, collecting what the daemon would refuse instead of stopping at it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from aisoc_plugind.core.manifest import MANIFEST_NAMES, MAX_MANIFEST_BYTES
from aisoc_plugind.core.signing import MAX_SIGNATURE_FILE_BYTES
from aisoc_plugind.errors import BundleError
from aisoc_plugind.files import FileRefused, read_regular

__all__ = [
    "MAX_DEPTH",
    "SIGNATURE_FILE",
    "Bundle",
    "Refused",
    "Tree",
    "has_manifest",
    "read_bundle",
    "read_manifest",
    "read_plugin_file",
    "scan_tree",
]

SIGNATURE_FILE = "plugin.sig"
MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 32 * 1024 * 1024
MAX_FILES = 2000
MAX_DEPTH = 16

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REFUSED_CODES = {
    "symlink": "bundle_symlink",
    "not_regular": "bundle_not_regular",
    "too_large": "bundle_too_large",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """A plugin directory as read: the manifest, the signature and every `*.py` file."""

    path: Path
    manifest_name: str
    manifest_bytes: bytes
    signature: bytes | None
    sources: Mapping[str, bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """An entry of a plugin directory that no tool will read: a link or a special file."""

    path: str
    code: str
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """The entries of a plugin directory (minus skipped directories), as sorted posix paths."""

    root: Path
    dirs: tuple[str, ...]
    files: tuple[str, ...]
    refused: tuple[Refused, ...]

    @property
    def python_files(self) -> tuple[str, ...]:
        """Return the `*.py` files (what the signature covers when nothing is refused)."""
        return tuple(f for f in self.files if f.endswith(".py"))


@dataclass(frozen=True, slots=True)
class _Entry:
    """One directory entry met by the walker; `parent` is its directory's descriptor."""

    rel: str
    kind: str  # file | dir | link | special | deep
    parent: int
    name: str


def has_manifest(path: Path) -> bool:
    """Return True when `path` is a real directory (not a link) holding an entry named as a
    manifest (whatever it is: reading it then refuses a link, a FIFO or a directory)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return any(os.path.lexists(path / name) for name in MANIFEST_NAMES)


def read_manifest(path: Path) -> tuple[str, bytes]:
    """Read only the manifest of the plugin at `path` (YAML preferred over JSON)."""
    fd = _open_root(path)
    try:
        return _read_manifest_fd(fd, path)
    finally:
        os.close(fd)


def read_bundle(path: Path) -> Bundle:
    """Snapshot the plugin directory at `path`; raise BundleError when it is unsafe."""
    fd = _open_root(path)
    try:
        manifest_name, manifest_bytes = _read_manifest_fd(fd, path)
        signature = _read_optional(fd, SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES, path)
        sources = dict(_sources(fd, path))
    finally:
        os.close(fd)
    return Bundle(
        path=path,
        manifest_name=manifest_name,
        manifest_bytes=manifest_bytes,
        signature=signature,
        sources=MappingProxyType(dict(sorted(sources.items()))),
    )


def read_plugin_file(root: Path, rel: str, *, cap: int, head: bool = False) -> bytes:
    """Read one file of the plugin at `root`, following no link at any level of `rel`.

    For tools that read what the daemon does not (data files, a tree the daemon refuses):
    raises BundleError like `read_bundle` (FileNotFoundError when nothing is there). With
    `head`, only the first `cap` bytes of a larger file are read.
    """
    parts = rel.split("/")
    fd = _open_root(root)
    try:
        for depth, name in enumerate(parts[:-1]):
            sub = _open_subdir(fd, name, root.joinpath(*parts[: depth + 1]))
            os.close(fd)
            fd = sub
        return _read_file(fd, parts[-1], cap, root / rel, head=head)
    finally:
        os.close(fd)


def scan_tree(root: Path, *, skip_dirs: frozenset[str] = frozenset()) -> Tree:
    """List a plugin directory without following links, skipping directories named in
    `skip_dirs`; refused entries are collected, not raised. `root` must be a directory."""
    dirs: list[str] = []
    files: list[str] = []
    refused: list[Refused] = []
    fd = _open_root(root)
    try:
        for entry in _walk(fd, "", 0, root, skip_dirs):
            if entry.kind == "file":
                files.append(entry.rel)
            elif entry.kind == "dir":
                dirs.append(entry.rel)
            else:
                refused.append(_refusal(entry))
    finally:
        os.close(fd)
    return Tree(
        root=root,
        dirs=tuple(sorted(dirs)),
        files=tuple(sorted(files)),
        refused=tuple(sorted(refused, key=lambda r: r.path)),
    )


def _refusal(entry: _Entry) -> Refused:
    if entry.kind == "link":
        target = os.readlink(entry.name, dir_fd=entry.parent)
        return Refused(
            path=entry.rel, code="bundle_symlink", why=f"a symlink (to {target}); links are refused"
        )
    if entry.kind == "deep":
        return Refused(
            path=entry.rel, code="bundle_too_large", why=f"nested deeper than {MAX_DEPTH} levels"
        )
    return Refused(
        path=entry.rel,
        code="bundle_not_regular",
        why="not a regular file (a FIFO, socket or device)",
    )


def _open_root(path: Path) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: directory does not exist", code="plugin_dir_missing") from exc
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(
                f"{path}: the plugin directory is a symlink (to {os.readlink(path)}); refused",
                code="bundle_symlink",
            ) from exc
        raise BundleError(
            f"{path}: cannot open directory: {exc.strerror}", code="bundle_unreadable"
        ) from exc


def _read_manifest_fd(fd: int, path: Path) -> tuple[str, bytes]:
    for name in MANIFEST_NAMES:
        try:
            data = _read_optional(fd, name, MAX_MANIFEST_BYTES, path)
        except BundleError as exc:  # an oversized manifest is a manifest problem
            if exc.code != "bundle_too_large":
                raise
            raise BundleError(exc.message, code="manifest_too_large") from exc
        if data is not None:
            return name, data
    raise BundleError(f"{path}: no {' or '.join(MANIFEST_NAMES)}", code="manifest_missing")


def _read_optional(dir_fd: int, name: str, cap: int, root: Path) -> bytes | None:
    try:
        return _read_file(dir_fd, name, cap, root / name)
    except FileNotFoundError:
        return None


def _read_file(dir_fd: int, name: str, cap: int, shown: Path, *, head: bool = False) -> bytes:
    try:
        return read_regular(name, cap=cap, dir_fd=dir_fd, head=head)
    except FileNotFoundError:
        raise
    except FileRefused as exc:
        raise BundleError(f"{shown} {exc.detail}", code=_REFUSED_CODES[exc.reason]) from exc
    except OSError as exc:
        raise BundleError(
            f"{shown}: cannot open: {exc.strerror}", code="bundle_unreadable"
        ) from exc


def _sources(root_fd: int, root: Path) -> Iterator[tuple[str, bytes]]:
    """Yield every `*.py` file of the tree with its bytes; raise at the first refused entry."""
    files = total = 0
    for entry in _walk(root_fd, "", 0, root, frozenset()):
        if entry.kind in ("link", "deep"):
            refusal = _refusal(entry)
            sep = " is" if entry.kind == "link" else ":"
            raise BundleError(f"{root / entry.rel}{sep} {refusal.why}", code=refusal.code)
        if entry.kind == "dir" or not entry.name.endswith(".py"):
            continue
        data = _read_file(entry.parent, entry.name, MAX_SOURCE_BYTES, root / entry.rel)
        files, total = files + 1, total + len(data)
        if files > MAX_FILES:
            raise BundleError(
                f"{root / entry.rel}: more than {MAX_FILES} Python files", code="bundle_too_large"
            )
        if total > MAX_TOTAL_BYTES:
            raise BundleError(
                f"{root / entry.rel}: Python files exceed {MAX_TOTAL_BYTES} bytes in all",
                code="bundle_too_large",
            )
        yield entry.rel, data


def _walk(
    dir_fd: int, prefix: str, depth: int, root: Path, skip_dirs: frozenset[str]
) -> Iterator[_Entry]:
    """Yield the entries under `dir_fd` in name order, depth first, never following a link."""
    with os.scandir(dir_fd) as entries:
        found = sorted((e.name, _kind(e)) for e in entries)
    for name, kind in found:
        rel = f"{prefix}{name}"
        if kind != "dir":
            yield _Entry(rel, kind, dir_fd, name)
        elif name in skip_dirs:
            continue
        elif depth + 1 > MAX_DEPTH:
            yield _Entry(rel, "deep", dir_fd, name)
        else:
            yield _Entry(rel, "dir", dir_fd, name)
            sub = _open_subdir(dir_fd, name, root / rel)
            try:
                yield from _walk(sub, f"{rel}/", depth + 1, root, skip_dirs)
            finally:
                os.close(sub)


def _kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "link"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "file" if entry.is_file(follow_symlinks=False) else "special"


def _open_subdir(dir_fd: int, name: str, shown: Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise BundleError(
            f"{shown}: cannot open: {exc.strerror}", code="bundle_unreadable"
        ) from exc
