"""Read and write files safely: no link followed, regular files only, size caps, atomic writes.

Every reader and writer of a file that carries trust (plugin code, keys, tokens, packages,
signatures) goes through here, so the rules are coded once: open with O_NOFOLLOW (and
O_NONBLOCK, so a FIFO planted under a trusted name cannot hang the open), check the open file
with fstat, read it whole under a cap; create with O_EXCL; replace through a temporary file,
fsync and rename. Callers turn `FileRefused` into their own coded error at their boundary.

A file that decides what is trusted (a trusted key, the tokens file, the revocation list) is
read with `read_trusted`: it must also be a regular file that neither group nor others may
write, owned by root or by the daemon's own user; links are followed only where every one of
them, and every directory on the way, stays inside one directory (kubelet's `..data` layout
of a Secret or ConfigMap mount).
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
    "private_file_status",
    "read_regular",
    "read_trusted",
    "readable_by_others",
    "replace_file",
    "trust_problem",
    "write_new",
]

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16
_MAX_LINKS = 16  # links followed on the way to one trusted file


class FileRefused(Exception):
    """A file that is not read as asked; `detail` completes "<path> ..." for a message.

    `reason` is one of `symlink`, `not_regular`, `too_large`, `unsafe_mode`, `unsafe_owner`.
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
    `owner_only`, a file that group or others may write is refused (`unsafe_mode`), and so
    is one owned by another user than root or this process's (`unsafe_owner`).
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
        problem = trust_problem(st) if owner_only else None
        if problem is not None:
            raise problem
        if head:
            return _read_all(fd, cap, head=True)
        if st.st_size > cap:
            raise FileRefused("too_large", f"is {st.st_size} bytes, the limit is {cap}")
        return _read_all(fd, cap)
    finally:
        os.close(fd)


def trust_problem(st: os.stat_result) -> FileRefused | None:
    """Return why a file (or directory) with this status cannot carry trust, or None.

    Writable by group or others (a directory with the sticky bit is fine: others cannot
    replace what they do not own), or owned by a user other than root and this process's.
    """
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (kind == "directory" and st.st_mode & stat.S_ISVTX):
        return FileRefused(
            "unsafe_mode", f"is writable by group or others ({stat.filemode(st.st_mode)})"
        )
    if st.st_uid not in (0, os.geteuid()):
        return FileRefused(
            "unsafe_owner",
            f"is owned by uid {st.st_uid}, neither root nor this daemon's user "
            f"(uid {os.geteuid()})",
        )
    return None


def read_trusted(path: Path, *, cap: int, links_within: Path | None = None) -> bytes:
    """Return the content of a file that carries trust; see the module docstring.

    Raises FileNotFoundError when nothing is at `path`, FileRefused when it may not be
    trusted (`symlink`, `not_regular`, `too_large`, `unsafe_mode`, `unsafe_owner`), OSError
    otherwise. A symlink is refused unless `links_within` is given and `path` lies in it:
    then each link on the way must be owned by root or this user and lead inside
    `links_within`. Never blocks on a FIFO: it is refused by its type.
    """
    target, st = _trusted_target(path, links_within)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise FileRefused("not_regular", "is not a regular file")
    return read_regular(target, cap=cap, owner_only=True)


def _trusted_target(path: Path, links_within: Path | None) -> tuple[Path, os.stat_result]:
    """Return the file a trusted path stands for (links followed only inside
    `links_within`, as kubelet lays them out) and its status (not following a link)."""
    target = path
    if links_within is not None and is_link(path):
        target = _follow_inside(path, links_within)
    return target, os.stat(target, follow_symlinks=False)


def private_file_status(path: Path) -> os.stat_result:
    """Check a file holding a private key (the audit signing key, the TLS key) as one that
    carries trust: a regular file (a link only as kubelet lays out a mounted Secret, inside
    its directory), not writable by group or others, owned by root or this user. Return its
    status, so that the caller can also look at who may read it.

    Raises FileNotFoundError, FileRefused (`symlink`, `not_regular`, `unsafe_mode`,
    `unsafe_owner`) or OSError.
    """
    _, st = _trusted_target(path, path.parent)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("not_regular", "is not a regular file")
    refused = trust_problem(st)
    if refused is not None:
        raise refused
    return st


def readable_by_others(st: os.stat_result) -> bool:
    """Return True when users outside the owner and the group may read the file."""
    return bool(st.st_mode & stat.S_IROTH)


def _follow_inside(path: Path, root: Path) -> Path:
    """Resolve `path` (under `root`) link by link, as kubelet lays out a mounted Secret:
    `key.pem -> ..data/key.pem`, `..data -> ..2026_01_01_...`. Return the real path."""
    walk = _Walk(root)
    walk.parts = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).split(os.sep)
    while walk.parts:
        walk.step()
    return Path(walk.base, *walk.resolved)


class _Walk:
    """The state of `_follow_inside`: the parts still to go and those resolved (real)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = os.path.realpath(root)
        self.prefixes = (self.base, os.path.abspath(root))
        self.parts: list[str] = []
        self.resolved: list[str] = []
        self.hops = 0

    def step(self) -> None:
        part = self.parts.pop(0)
        if part in ("", "."):
            return
        if part == "..":
            if not self.resolved:
                raise FileRefused("symlink", f"is a symlink that leads outside {self.root}")
            self.resolved.pop()
            return
        here = os.path.join(self.base, *self.resolved, part)
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            self.follow(here, st)
            return
        if self.parts:  # a directory on the way: nobody else may swap what it holds
            _check_dir(st, here)
        self.resolved.append(part)

    def follow(self, here: str, st: os.stat_result) -> None:
        self.hops += 1
        if self.hops > _MAX_LINKS:
            raise FileRefused("symlink", f"is a symlink chain longer than {_MAX_LINKS} links")
        problem = _link_problem(st, here)
        if problem is not None:
            raise problem
        link = os.readlink(here)
        if os.path.isabs(link):
            inside = next((p for p in self.prefixes if link.startswith(p + os.sep)), None)
            if inside is None:
                raise FileRefused(
                    "symlink", f"is a symlink (to {link}) that leads outside {self.root}"
                )
            self.resolved = []
            link = os.path.relpath(link, inside)
        self.parts = link.split(os.sep) + self.parts


def _link_problem(st: os.stat_result, shown: str) -> FileRefused | None:
    """Return why a symlink on the way to a trusted file cannot be followed, or None."""
    if st.st_uid not in (0, os.geteuid()):
        return FileRefused(
            "unsafe_owner", f"leads through a symlink ({shown}) owned by uid {st.st_uid}"
        )
    return None


def _check_dir(st: os.stat_result, shown: str) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise FileRefused("not_regular", f"leads through {shown}, which is not a directory")
    problem = trust_problem(st)
    if problem is not None:
        raise FileRefused(problem.reason, f"leads through {shown}, which {problem.detail}")


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
