"""Read a plugin directory once, safely, into an immutable snapshot of bytes.

Every file is opened relative to its parent directory's descriptor with O_NOFOLLOW, checked
with fstat (regular file, size cap) and read in one go; nothing is reopened by path later.
The loader executes exactly the bytes held here, and the signature covers exactly them.
Any symlink inside the plugin tree, or a plugin directory that is itself a symlink, is
refused: a link is how a writable path outside the plugin smuggles code in.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from aisoc_plugind.core.manifest import MANIFEST_NAMES, MAX_MANIFEST_BYTES
from aisoc_plugind.core.signing import MAX_SIGNATURE_FILE_BYTES
from aisoc_plugind.errors import BundleError

SIGNATURE_FILE = "plugin.sig"
MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 32 * 1024 * 1024
MAX_FILES = 2000
MAX_DEPTH = 16

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK so that a FIFO planted as `x.py` cannot hang the open; fstat then refuses it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """A plugin directory as read: the manifest, the signature and every `*.py` file."""

    path: Path
    manifest_name: str
    manifest_bytes: bytes
    signature: bytes | None
    sources: Mapping[str, bytes]


def has_manifest(path: Path) -> bool:
    """Return True when `path` is a real directory (not a link) holding a manifest file."""
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / name).is_file() for name in MANIFEST_NAMES)


def read_manifest(path: Path) -> tuple[str, bytes]:
    """Read only the manifest of the plugin at `path` (YAML preferred over JSON)."""
    fd = _open_dir(path)
    try:
        return _read_manifest_fd(fd, path)
    finally:
        os.close(fd)


def read_bundle(path: Path) -> Bundle:
    """Snapshot the plugin directory at `path`; raise BundleError when it is unsafe."""
    fd = _open_dir(path)
    try:
        manifest_name, manifest_bytes = _read_manifest_fd(fd, path)
        signature = _read_optional(fd, SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES, path)
        sources = dict(_walk_sources(fd, "", 0, path, _Budget()))
    finally:
        os.close(fd)
    return Bundle(path=path, manifest_name=manifest_name, manifest_bytes=manifest_bytes,
                  signature=signature, sources=MappingProxyType(dict(sorted(sources.items()))))


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: directory does not exist", code="plugin_dir_missing") from exc
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(f"{path}: the plugin directory is a symlink (to "
                              f"{os.readlink(path)}); refused", code="bundle_symlink") from exc
        raise BundleError(f"{path}: cannot open directory: {exc.strerror}",
                          code="bundle_unreadable") from exc


def _read_manifest_fd(fd: int, path: Path) -> tuple[str, bytes]:
    for name in MANIFEST_NAMES:
        data = _read_optional(fd, name, MAX_MANIFEST_BYTES, path)
        if data is not None:
            return name, data
    raise BundleError(f"{path}: no {' or '.join(MANIFEST_NAMES)}", code="manifest_missing")


def _read_optional(dir_fd: int, name: str, cap: int, root: Path) -> bytes | None:
    try:
        return _read_file(dir_fd, name, cap, root / name)
    except FileNotFoundError:
        return None


def _read_file(dir_fd: int, name: str, cap: int, shown: Path) -> bytes:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if _is_link(dir_fd, name):
            target = os.readlink(name, dir_fd=dir_fd)
            raise BundleError(f"{shown} is a symlink (to {target}); links are refused",
                              code="bundle_symlink") from exc
        raise BundleError(f"{shown}: cannot open: {exc.strerror}",
                          code="bundle_unreadable") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{shown} is not a regular file", code="bundle_not_regular")
        if st.st_size > cap:
            raise BundleError(f"{shown} is {st.st_size} bytes, the limit is {cap}",
                              code="bundle_too_large")
        return _read_all(fd, cap, shown)
    finally:
        os.close(fd)


def _read_all(fd: int, cap: int, shown: Path) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, 1 << 16):
        total += len(chunk)
        if total > cap:  # the file grew after fstat
            raise BundleError(f"{shown} exceeds {cap} bytes", code="bundle_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class _Budget:
    """Running totals that cap how much one plugin directory may make us read."""

    __slots__ = ("bytes", "files")

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0

    def take(self, size: int, shown: Path) -> None:
        self.files += 1
        self.bytes += size
        if self.files > MAX_FILES:
            raise BundleError(f"{shown}: more than {MAX_FILES} Python files",
                              code="bundle_too_large")
        if self.bytes > MAX_TOTAL_BYTES:
            raise BundleError(f"{shown}: Python files exceed {MAX_TOTAL_BYTES} bytes in all",
                              code="bundle_too_large")


def _walk_sources(
    dir_fd: int, prefix: str, depth: int, root: Path, budget: _Budget
) -> Iterator[tuple[str, bytes]]:
    if depth > MAX_DEPTH:
        raise BundleError(f"{root / prefix}: nested deeper than {MAX_DEPTH} levels",
                          code="bundle_too_large")
    with os.scandir(dir_fd) as entries:
        names = sorted((e.name, e.is_symlink(), e.is_dir(follow_symlinks=False))
                       for e in entries)
    for name, is_link, is_dir in names:
        rel = f"{prefix}{name}"
        if is_link:
            target = os.readlink(name, dir_fd=dir_fd)
            raise BundleError(f"{root / rel} is a symlink (to {target}); links are refused",
                              code="bundle_symlink")
        if is_dir:
            yield from _walk_subdir(dir_fd, name, rel, depth, root, budget)
        elif not is_dir and name.endswith(".py"):
            data = _read_file(dir_fd, name, MAX_SOURCE_BYTES, root / rel)
            budget.take(len(data), root / rel)
            yield rel, data


def _walk_subdir(
    dir_fd: int, name: str, rel: str, depth: int, root: Path, budget: _Budget
) -> Iterator[tuple[str, bytes]]:
    try:
        sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise BundleError(f"{root / rel}: cannot open: {exc.strerror}",
                          code="bundle_unreadable") from exc
    try:
        yield from _walk_sources(sub, f"{rel}/", depth + 1, root, budget)
    finally:
        os.close(sub)
