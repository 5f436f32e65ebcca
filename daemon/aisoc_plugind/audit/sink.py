"""Append whole JSON lines to the audit file (O_APPEND, one write per line), reopen on rotation."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aisoc_plugind.config.settings import FsyncPolicy

__all__ = ["AuditSink"]


class AuditSink:
    """Append whole JSON lines to the audit file; reopen it after rotation."""

    def __init__(self, path: Path, fsync: FsyncPolicy = FsyncPolicy.MUTATIONS) -> None:
        self.path = path
        self.fsync = fsync
        self.failure: str | None = None
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def open(self) -> None:
        """Open (creating 0600, and the parent dir 0750) for append."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        old, self._fd, self._ident = self._fd, fd, (st.st_dev, st.st_ino)
        if old is not None:
            os.close(old)

    def reopen(self) -> None:
        """Open the path again (after logrotate's `create` moved the old file away)."""
        self.open()

    def close(self) -> None:
        """Flush to disk and close."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def write(self, line: str, *, durable: bool) -> None:
        """Append one line in a single write; raises OSError on failure."""
        if self._fd is None or self._rotated():
            self.open()
        assert self._fd is not None
        data = (line + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to audit file ({written} of {len(data)} bytes)")
        if self.fsync is FsyncPolicy.ALWAYS or (durable and self.fsync is FsyncPolicy.MUTATIONS):
            os.fsync(self._fd)

    def probe(self) -> str | None:
        """Check (one stat) that the path still names an open, writable file; return the failure.

        A moved or vanished file is reopened here, so a gone directory is noticed before a
        change is made rather than after. A full disk shows only on the next write.
        """
        if self._fd is None or self._rotated():
            try:
                self.open()
            except OSError as exc:
                self.failure = f"{self.path}: {exc}"
                return self.failure
            self.failure = None  # reopened: the next write says whether it really works
        return self.failure

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:  # gone, or a path component is no longer a directory
            return True
        return (st.st_dev, st.st_ino) != self._ident
