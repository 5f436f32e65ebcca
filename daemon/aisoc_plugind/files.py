"""Read and write files safely: no link followed, regular files only, size caps, atomic writes.

Every reader and writer of a file that carries trust (plugin code, keys, tokens, packages,
signatures) goes through here, so the rules are coded once: open with O_NOFOLLOW (and
O_NONBLOCK, so a FIFO planted under a trusted name cannot hang the open), check the open file
with fstat, read it whole under a cap; create with O_EXCL; replace through a temporary file,
fsync and rename. Callers turn `FileRefused` into their own coded error at their boundary.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = [
    "FileRefused",
    "fsync_dir",
    "is_link",
    "read_regular",
    "replace_file",
    "write_new",
]

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16


class FileRefused(Exception):
    """A file that is not read as asked; `detail` completes "<path> ..." for a message.

    `reason` is one of `symlink`, `not_regular`, `too_large`, `unsafe_mode`.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_link(name: str | Path, *, dir_fd: int | None = None) -> bool:
    """Return True when `name` (relative to `dir_fd` when given) is a symbolic link."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def read_regular(
    name: str | Path,
    *,
    cap: int,
    dir_fd: int | None = None,
    head: bool = False,
    owner_only: bool = False,
) -> bytes:
    """Return the whole content of a regular file of at most `cap` bytes.

    The last path component is never followed when it is a link. Raises FileNotFoundError
    when there is nothing at `name`, FileRefused for a link, a non-regular file or a file
    over `cap` (also one that grows past `cap` while read), and OSError otherwise. With
    `head`, a larger file is not refused: its first `cap` bytes are returned. With
    `owner_only`, a file that group or others may write is refused (`unsafe_mode`).
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if is_link(name, dir_fd=dir_fd):
            target = os.readlink(name, dir_fd=dir_fd)
            raise FileRefused("symlink", f"is a symlink (to {target}); links are refused") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("not_regular", "is not a regular file")
        if owner_only and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise FileRefused(
                "unsafe_mode", f"is writable by group or others ({stat.filemode(st.st_mode)})"
            )
        if head:
            return _read_all(fd, cap, head=True)
        if st.st_size > cap:
            raise FileRefused("too_large", f"is {st.st_size} bytes, the limit is {cap}")
        return _read_all(fd, cap)
    finally:
        os.close(fd)


def _read_all(fd: int, cap: int, *, head: bool = False) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, min(_CHUNK, cap + 1 - total)):
        total += len(chunk)
        if total > cap:
            if head:
                chunks.append(chunk[: len(chunk) - (total - cap)])
                break
            raise FileRefused("too_large", f"exceeds {cap} bytes")  # it grew after fstat
        chunks.append(chunk)
    return b"".join(chunks)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` holding `data` with exactly `mode`; never overwrite, never follow a link.

    Raises FileExistsError when anything (a link too) is at `path`.
    """
    fd = os.open(path, _NEW_FLAGS, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not decide the mode of a key file
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path,
    data: bytes,
    *,
    mode: int,
    keep_owner: bool = False,
    tmp_suffix: str = ".tmp",
    sync_dir: bool = False,
) -> None:
    """Replace `path` atomically: write a temporary file beside it, fsync, rename over it.

    `keep_owner` copies the uid and gid of the file being replaced (where permitted);
    `sync_dir` also fsyncs the directory so the rename itself is durable.
    """
    try:
        previous: os.stat_result | None = path.stat()
    except FileNotFoundError:
        previous = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=tmp_suffix)
    try:
        os.fchmod(fd, mode)
        if keep_owner and previous is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, previous.st_uid, previous.st_gid)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename or create inside it) to stable storage."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
