"""Define the plugin package format: build it, extract it safely, inspect it (one module).

A package is a tar+gzip archive holding one top directory named by the plugin id, with only
regular files (0644) and directories (0755). `aisoc plugin package` builds it, `push` inspects
it, the daemon's OCI install and `aisoc plugin pull` extract it.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.delivery.limits import CHUNK, DEFAULT_LIMITS, MIB, Deadline, Limits, brief
from aisoc_plugind.delivery.tar_reader import Gunzip, StrictTarInfo, show_name
from aisoc_plugind.errors import ArchiveError, OciError

__all__ = [
    "Extracted",
    "archive_members",
    "build_package",
    "extract_package",
    "inspect_package",
    "member_path",
]

# Tar headers, PAX records and block padding the decompressed stream may hold on top of
# `extracted_bytes` (5000 entries * ~2 KiB each fits with room to spare).
TAR_METADATA_ALLOWANCE = 16 * MIB


@dataclass(frozen=True, slots=True, kw_only=True)
class Extracted:
    """What an extraction made: the top directory's name and the manifest as it streamed by."""

    top: str
    manifest_name: str
    manifest_bytes: bytes


def extract_package(layer: bytes, staging: Path, *, limits: Limits = DEFAULT_LIMITS) -> Extracted:
    """Unpack a package (tar+gzip, one top directory) into the empty dir `staging`.

    Only regular files (0644) and directories (0755) are created, with O_EXCL|O_NOFOLLOW
    relative to directory descriptors; every rule break raises ArchiveError. On error,
    `staging` may hold a partial tree: removing it is the caller's job.
    """
    deadline = Deadline(
        limits.deadline_s,
        lambda: ArchiveError(
            f"extraction took longer than {limits.deadline_s:g} s", code="archive_timeout"
        ),
    )
    stream = Gunzip(
        layer, budget=limits.extracted_bytes + TAR_METADATA_ALLOWANCE, deadline=deadline
    )
    with _archive_errors(staging):
        root = os.open(staging, _DIR_FLAGS)
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=StrictTarInfo) as tar:
                extractor = _Extractor(root, limits, deadline)
                for info in tar:
                    extractor.add(info, tar)
                return extractor.finish(tar)
        finally:
            os.close(root)


def inspect_package(data: bytes, limits: Limits = DEFAULT_LIMITS) -> manifest_mod.Manifest:
    """Extract a package into a private temporary directory and return its parsed manifest.

    Refuses (ArchiveError `archive_layout`) a package whose top directory is not named by its
    manifest id; nothing the daemon would refuse passes.
    """
    with tempfile.TemporaryDirectory(prefix="aisoc-package-") as tmp:
        staging = Path(tmp) / "package"
        staging.mkdir(mode=0o700)
        found = extract_package(data, staging, limits=limits)
    plugin = manifest_mod.parse(found.manifest_bytes, found.manifest_name)
    if found.top != plugin.id:
        raise ArchiveError(
            f"the package's top directory is {found.top!r} but the manifest id "
            f"is {plugin.id!r}; build it with `aisoc plugin package`",
            code="archive_layout",
        )
    return plugin


def build_package(top: str, contents: Mapping[str, bytes], *, mtime: int = 0) -> bytes:
    """Archive `contents` ({relative path: bytes}) under the directory `top`, reproducibly.

    Entries are sorted, parents before children; owners are 0/""; modes are 0644 (files) and
    0755 (directories); every mtime is `mtime`; the gzip header has mtime 0 and no file name.
    """
    return _tar_gz(archive_members(top, contents), mtime)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Top-level manifests, whose bytes the extractor keeps as they stream by (YAML wins).
_MANIFEST_PATHS = frozenset((name,) for name in manifest_mod.MANIFEST_NAMES)
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def _archive_errors(staging: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise ArchiveError(
            f"the package is not a valid tar+gzip archive: {brief(exc)}", code="archive_corrupt"
        ) from exc
    except OSError as exc:
        hint = " (it must be empty)" if exc.errno in (errno.EEXIST, errno.ELOOP) else ""
        raise OciError(
            f"cannot write into staging {staging}{hint}: {exc.strerror}", code="oci_staging_failed"
        ) from exc


_NAME_RULES: tuple[tuple[Callable[[str], bool], str, str], ...] = (
    (lambda n: not n, "archive_path_invalid", "is empty"),
    (lambda n: "\x00" in n, "archive_path_invalid", "holds a NUL byte"),
    (lambda n: "\\" in n, "archive_path_invalid", "holds a backslash"),
    (
        lambda n: any(ord(c) < 0x20 or ord(c) == 0x7F for c in n),
        "archive_path_invalid",
        "holds a control character",
    ),
    (
        lambda n: any(0xD800 <= ord(c) <= 0xDFFF for c in n),
        "archive_path_invalid",
        "is not valid UTF-8",
    ),
    (
        lambda n: not unicodedata.is_normalized("NFC", n),
        "archive_path_invalid",
        "is not in Unicode NFC form",
    ),
    (lambda n: n.startswith("/"), "archive_absolute_path", "is an absolute path"),
    (lambda n: ".." in n.split("/"), "archive_path_traversal", "has a '..' component"),
)


def member_path(name: str, limits: Limits) -> tuple[str, ...]:
    """Return the normalised components of an archive member name, or raise ArchiveError."""
    for broken, code, why in _NAME_RULES:
        if broken(name):
            raise ArchiveError(f"entry {show_name(name)} {why}", code=code)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise ArchiveError(f"entry {show_name(name)} names no file", code="archive_path_invalid")
    if len(name.encode()) > limits.path_length or len(parts) > limits.depth:
        raise ArchiveError(
            f"entry {show_name(name)} is longer than {limits.path_length} bytes or "
            f"deeper than {limits.depth} levels",
            code="archive_path_too_long",
        )
    return parts


class _Extractor:
    """Writes accepted members under one root fd and remembers what it made."""

    def __init__(self, root: int, limits: Limits, deadline: Deadline) -> None:
        self._root = root
        self._limits = limits
        self._deadline = deadline
        self._kinds: dict[tuple[str, ...], str] = {}  # path -> "file" | "dir" | "implicit"
        self._entries = 0
        self._declared = 0
        self._manifests: dict[str, bytes] = {}
        self.top: str | None = None

    def add(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self._deadline.left()
        self._entries += 1
        if self._entries > self._limits.entries:
            raise ArchiveError(
                f"the package has more than {self._limits.entries} entries",
                code="archive_too_many_entries",
            )
        rel = self._under_top(member_path(info.name, self._limits), info)
        if info.isdir():
            self._add_dir(rel)
        else:
            self._add_file(rel, info, tar)

    def _under_top(self, parts: tuple[str, ...], info: tarfile.TarInfo) -> tuple[str, ...]:
        top, rel = parts[0], parts[1:]
        if self.top is None:
            if not manifest_mod.ID_RE.match(top):
                raise ArchiveError(
                    f"the top directory {show_name(top)} is not a plugin id", code="archive_layout"
                )
            self.top = top
        elif top != self.top:
            raise ArchiveError(
                f"entries under two top-level names, {show_name(self.top)} and "
                f"{show_name(top)}; a package has one top directory",
                code="archive_layout",
            )
        if not rel and not info.isdir():
            raise ArchiveError(
                f"{show_name(info.name)} is a file at the top level; a package holds one directory",
                code="archive_layout",
            )
        return rel

    def _add_dir(self, rel: tuple[str, ...]) -> None:
        if self._kinds.get(rel) in ("file", "dir"):
            raise _duplicate(rel)
        os.close(self._open_dirs(rel))
        self._kinds[rel] = "dir"

    def _add_file(self, rel: tuple[str, ...], info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        if rel in self._kinds:
            raise _duplicate(rel)
        self._take_budget(info)
        source = tar.extractfile(info)
        if source is None:  # only for links and specials, refused before here
            raise ArchiveError(f"{show_name(info.name)} has no data", code="archive_corrupt")
        parent = self._open_dirs(rel[:-1])
        try:
            fd = os.open(rel[-1], _NEW_FILE_FLAGS, 0o644, dir_fd=parent)
        finally:
            os.close(parent)
        self._kinds[rel] = "file"
        keep: list[bytes] | None = [] if rel in _MANIFEST_PATHS else None
        try:
            os.fchmod(fd, 0o644)  # exact mode whatever the umask
            written = self._copy(source, fd, info, keep)
        finally:
            os.close(fd)
        if keep is not None:
            self._manifests[rel[0]] = b"".join(keep)
        if written != info.size:
            raise ArchiveError(f"{show_name(info.name)} is truncated", code="archive_corrupt")

    def _take_budget(self, info: tarfile.TarInfo) -> None:
        self._declared += info.size
        if info.size > self._limits.file_bytes:
            raise ArchiveError(
                f"{show_name(info.name)} is {info.size} bytes, the per-file limit "
                f"is {self._limits.file_bytes}",
                code="archive_too_large",
            )
        if self._declared > self._limits.extracted_bytes:
            raise ArchiveError(
                f"the package holds more than {self._limits.extracted_bytes} bytes of files",
                code="archive_too_large",
            )

    def _copy(
        self, source: IO[bytes], fd: int, info: tarfile.TarInfo, keep: list[bytes] | None
    ) -> int:
        written = 0
        while chunk := source.read(CHUNK):
            self._deadline.left()
            written += len(chunk)
            if written > min(info.size, self._limits.file_bytes):
                raise ArchiveError(
                    f"{show_name(info.name)} is longer than its header says", code="archive_corrupt"
                )
            if keep is not None:  # the manifest: at most its cap (+1, so "too large" shows)
                room = manifest_mod.MAX_MANIFEST_BYTES + 1 - (written - len(chunk))
                keep.append(chunk[: max(room, 0)])
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        return written

    def _open_dirs(self, rel: tuple[str, ...]) -> int:
        """Return an fd of the directory `rel`, creating missing levels (0755), never
        following a link."""
        fd = os.dup(self._root)
        try:
            for depth in range(1, len(rel) + 1):
                child = self._enter(fd, rel[:depth])
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, fd: int, path: tuple[str, ...]) -> int:
        kind = self._kinds.get(path)
        if kind == "file":
            raise _duplicate(path)
        if kind is None:
            os.mkdir(path[-1], 0o755, dir_fd=fd)
            self._kinds[path] = "implicit"
            child = os.open(path[-1], _DIR_FLAGS, dir_fd=fd)
            os.fchmod(child, 0o755)
            return child
        return os.open(path[-1], _DIR_FLAGS, dir_fd=fd)

    def finish(self, tar: tarfile.TarFile) -> Extracted:
        """Check the archive's end and its layout; say what was extracted."""
        while chunk := tar.fileobj.read(CHUNK):
            if chunk.strip(b"\0"):
                raise ArchiveError("data follows the end-of-archive marker", code="archive_corrupt")
        if self.top is None:
            raise ArchiveError("the package is empty", code="archive_layout")
        name = next((n for n in manifest_mod.MANIFEST_NAMES if n in self._manifests), None)
        if name is None:
            raise ArchiveError(
                f"{self.top}/ holds no {' or '.join(manifest_mod.MANIFEST_NAMES)}",
                code="archive_layout",
            )
        return Extracted(top=self.top, manifest_name=name, manifest_bytes=self._manifests[name])


def _duplicate(rel: tuple[str, ...]) -> ArchiveError:
    return ArchiveError(
        f"{show_name('/'.join(rel))} appears twice or as both file and directory",
        code="archive_duplicate",
    )


def archive_members(top: str, contents: Mapping[str, bytes]) -> list[tuple[str, bytes | None]]:
    """Return `(archive name, bytes or None for a directory)`, parents before children."""
    dirs = {"/".join(rel.split("/")[:i]) for rel in contents for i in range(1, rel.count("/") + 1)}
    entries: list[tuple[str, bytes | None]] = [(d, None) for d in dirs]
    entries += list(contents.items())
    entries.sort(key=lambda e: e[0].split("/"))
    return [(top, None)] + [(f"{top}/{rel}", data) for rel, data in entries]


def _tar_gz(members: Sequence[tuple[str, bytes | None]], mtime: int) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in members:
            tar.addfile(_tar_info(name, data, mtime), None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def _tar_info(name: str, data: bytes | None, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = len(data)
        info.mode = 0o644
    return info
