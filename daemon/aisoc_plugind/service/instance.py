"""Make sure one daemon runs per configuration: an exclusive lock next to its audit file.

The lock file is `.<audit file name>.lock` in the audit file's directory
(`/var/log/aisoc-plugind/.audit.jsonl.lock` under systemd, `.quickstart/.audit.jsonl.lock`
for the quickstart): the audit file is what two daemons must never share, and its directory
is writable wherever the daemon works. The daemon takes it (`flock`, non-blocking) before it
touches anything: a second daemon on the same configuration stops with `already_running`
before it opens the audit file or reads the tokens file. The kernel releases the lock when
the process ends, however it ends; the file itself stays (it holds the last holder's PID).

When the lock cannot be taken for another reason (the directory cannot be created or
written), the daemon runs without it and says so (`config.warning`,
`instance_lock_unavailable`): the audit file is then failing too, and the daemon keeps its
documented fail-closed behaviour for that case.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.errors import AlreadyRunning

__all__ = ["InstanceLock", "lock_path"]

_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # no FIFO can block us, no link followed
_MAX_PID_TEXT = 32


def lock_path(audit_path: Path) -> Path:
    """Return the instance lock file of the daemon whose audit file is `audit_path`."""
    return audit_path.parent / f".{audit_path.name}.lock"


@dataclass(eq=False)
class InstanceLock:
    """The instance lock, held while `fd` is open; `problem` says why it is not held."""

    path: Path
    fd: int | None = None
    problem: str | None = None

    @classmethod
    def acquire(cls, audit_path: Path) -> InstanceLock:
        """Take the lock of `audit_path`'s daemon; raise AlreadyRunning when another
        process holds it. Any other failure gives a lock that is not held, with `problem`."""
        path = lock_path(audit_path)
        try:
            fd = _open(path)
        except OSError as exc:
            return cls(path, problem=f"{path}: {exc.strerror or exc}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(
                    f"another aisoc-plugind{holder} is running with this configuration: it "
                    f"holds {path} (the lock of audit.path {audit_path}); stop it first"
                ) from exc
            return cls(path, problem=f"{path}: {exc.strerror or exc}")
        _note_pid(fd)
        return cls(path, fd=fd)

    @property
    def held(self) -> bool:
        """Return True while this process holds the lock."""
        return self.fd is not None

    def release(self) -> None:
        """Release the lock (closing the file releases it; the file stays)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open(path: Path) -> int:
    """Open (creating it, and its directory 0750 like the audit file's) the lock file."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
    except PermissionError:  # a lock file another user made: reading is enough to flock
        fd = os.open(path, os.O_RDONLY | _OPEN)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _note_pid(fd: int) -> None:
    """Write our PID into the lock file, for the message a second daemon prints."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    """Return ` (pid N)` naming the lock's holder as it wrote itself, or ``."""
    try:
        text = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
