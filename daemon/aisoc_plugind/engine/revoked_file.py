"""Read `trust.revoked_file` like every file that carries trust, and tell when it changed.

The file is opened without following a link, must be a regular file that neither group nor
others may write, and is read whole under a cap (`files.read_regular`). A missing file is an
empty list: nothing is revoked. Any other problem raises RevocationFileError with a code; the
caller keeps the last good list (fail closed).
"""

from __future__ import annotations

import os
from pathlib import Path

from aisoc_plugind.core.revocation import EMPTY, RevocationList, parse_revocations
from aisoc_plugind.errors import RevocationFileError
from aisoc_plugind.files import FileRefused, read_regular

__all__ = ["MAX_REVOKED_FILE_BYTES", "FileIdentity", "file_identity", "read_revocations"]

MAX_REVOKED_FILE_BYTES = 4 * 1024 * 1024

# (device, inode, size, mtime in ns, mode): a change to any of them is a change of the file.
FileIdentity = tuple[int, int, int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """Return the identity of what is at `path` (a link itself, not its target), or None."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def read_revocations(path: Path) -> RevocationList:
    """Return the revocation list in `path` (empty when there is no file)."""
    try:
        data = read_regular(path, cap=MAX_REVOKED_FILE_BYTES, owner_only=True)
    except FileNotFoundError:
        return EMPTY
    except FileRefused as exc:
        code = "revoked_file_unreadable" if exc.reason == "too_large" else "revoked_file_unsafe"
        raise RevocationFileError(f"{path} {exc.detail}", code=code) from exc
    except OSError as exc:
        raise RevocationFileError(
            f"{path} cannot be read: {exc.strerror or exc}", code="revoked_file_unreadable"
        ) from exc
    try:
        return parse_revocations(data)
    except RevocationFileError as exc:
        raise RevocationFileError(f"{path}: {exc.message}", code=exc.code) from exc
