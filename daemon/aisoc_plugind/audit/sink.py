"""Open, repair, append to and watch the audit file; keep the chain head across restarts.

Used only by the writer thread. The file is opened `O_APPEND` (never `O_TRUNC`), created
0600 (its directory 0750) when missing, and refused when the path is a link or not a regular
file. Opening reads the tail: a partial last line (a torn write, a crash) is closed with a
newline at once, and the hash of the last complete line becomes the chain head, so the chain
continues across restarts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.audit.chain import is_hash, line_hash

__all__ = ["AuditFile", "HeadStore", "Opened", "WriteFailed"]

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_TAIL_BYTES = 32 * 1024  # lines are at most 8 KiB: the last complete one is in here
# How long a renamed audit file is kept writing while its path is missing: logrotate renames
# the file, then creates the new one (O_EXCL). Creating the path ourselves in between makes
# logrotate move our new file aside as `<name>-<date>.backup`, where no shipper reads it.
ROTATION_GRACE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """What opening the audit file found."""

    created: bool
    dir_created: bool
    tail_hash: str | None  # hash of the last complete line; None for an empty file
    fragment: bytes | None  # a partial last line, now closed with a newline


class WriteFailed(OSError):
    """A write stopped after `written` bytes (maybe 0); `cause` is the error."""

    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.written = written
        self.cause = cause


class AuditFile:
    """The audit file at one path, as the writer thread sees it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._grace_s = ROTATION_GRACE_S
        self._renamed_at: float | None = None  # when the path was first seen missing

    @property
    def is_open(self) -> bool:
        """Return True while a descriptor is held."""
        return self._fd is not None

    def open(self) -> Opened:
        """(Re)open the path for append, creating what is missing; raise OSError."""
        self.close()
        dir_created = self._ensure_dir()
        fd, created = self._open_file()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{self.path} is not a regular file")
            tail_hash, fragment = _read_tail(fd, st.st_size)
            if fragment is not None:
                _write_all(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._renamed_at = None
        return Opened(
            created=created, dir_created=dir_created, tail_hash=tail_hash, fragment=fragment
        )

    def _ensure_dir(self) -> bool:
        parent = self.path.parent
        if parent.is_dir():
            return False
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        return True

    def _open_file(self) -> tuple[int, bool]:
        try:
            return os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            return os.open(self.path, _OPEN_FLAGS), False

    def moved(self) -> str | None:
        """Return why the path no longer names the open file (rotated, deleted), or None.

        A path that is missing because the open file was just renamed (a rotation between
        its rename and its `create`) is not a reason yet: the file is still written under
        its new name for up to `ROTATION_GRACE_S`, until the new file appears (then
        "rotated") or the grace ends (then "file_missing": we create it)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                return "directory_missing"
            return None if self._renamed_moment_ago() else "file_missing"
        except NotADirectoryError:
            return "directory_missing"
        except OSError:
            return "unreachable"
        self._renamed_at = None
        if not stat.S_ISREG(st.st_mode):
            return "replaced"
        return "rotated" if (st.st_dev, st.st_ino) != self._ident else None

    def rotating(self) -> bool:
        """Return True while the path is missing because the open file was renamed a
        moment ago (see `moved`): a reopen now would race the rotator's `create`."""
        return (
            not os.path.lexists(self.path)
            and self.path.parent.is_dir()
            and self._renamed_moment_ago()
        )

    def _renamed_moment_ago(self) -> bool:
        """The open file still has a name (renamed, not deleted: a deleted one takes every
        later line with it, so it is replaced at once), and the grace has not ended."""
        if self._fd is None or self._grace_s <= 0:
            return False
        try:
            if os.fstat(self._fd).st_nlink == 0:
                return False
        except OSError:
            return False
        now = time.monotonic()
        if self._renamed_at is None:
            self._renamed_at = now
        return now - self._renamed_at < self._grace_s

    def write(self, data: bytes) -> None:
        """Append `data`; raise WriteFailed saying how many bytes were written."""
        if self._fd is None:
            raise WriteFailed(0, OSError(errno.EBADF, "the audit file is not open"))
        _write_all(self._fd, data)

    def fsync(self) -> None:
        """Force what was written to stable storage; raise OSError."""
        if self._fd is None:
            raise OSError(errno.EBADF, "the audit file is not open")
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor (a failed final flush is ignored: the file may be gone)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view, written = memoryview(data), 0
    while written < len(data):
        try:
            n = os.write(fd, view[written:])
        except OSError as exc:
            raise WriteFailed(written, exc) from exc
        if n == 0:
            raise WriteFailed(written, OSError(errno.ENOSPC, "no space left on device"))
        written += n


def _read_tail(fd: int, size: int) -> tuple[str | None, bytes | None]:
    """Return (hash of the last complete line, the partial last line or None)."""
    if size == 0:
        return None, None
    start = max(size - _TAIL_BYTES, 0)
    tail = os.pread(fd, size - start, start)
    if tail.endswith(b"\n"):
        body, fragment = tail[:-1], None
    else:
        cut = tail.rfind(b"\n")
        body, fragment = (tail[:cut], tail[cut + 1 :]) if cut >= 0 else (b"", tail)
    if not body or (start > 0 and b"\n" not in body):
        return None, fragment  # no complete line in reach (not a file we wrote)
    return line_hash(body.rsplit(b"\n", 1)[-1]), fragment


class HeadStore:
    """The chain head kept in the daemon's state directory, for a file that starts empty.

    When the audit file was rotated or removed while the daemon was stopped, the new file's
    first line still names the last line written before. Best effort: the store is written
    after each batch (no fsync) and synced at shutdown; any problem disables it silently.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def load(self) -> str | None:
        """Return the stored head, or None when there is none or it cannot be read."""
        try:
            data = json.loads(self.path.read_bytes().rstrip(b"\0 \n") or b"{}")
        except (OSError, ValueError):
            return None
        head = data.get("head") if isinstance(data, dict) else None
        return head if is_hash(head) else None

    def save(self, head: str) -> None:
        """Write the head in place (one small pwrite at offset 0)."""
        try:
            if self._fd is None:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.pwrite(self._fd, json.dumps({"head": head}).encode().ljust(96) + b"\n", 0)
        except OSError:
            self.close()

    def close(self, *, sync: bool = False) -> None:
        """Close the store, syncing it first when asked."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if sync:
                os.fsync(fd)
            os.close(fd)
