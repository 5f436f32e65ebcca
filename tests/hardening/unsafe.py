"""Make a trust-carrying file untrustworthy in one named way (the tests run as root:
"another unprivileged user" is uid 65534, nobody)."""

from __future__ import annotations

import os
from pathlib import Path

NOBODY = 65534


def spoil(path: Path, kind: str, outside: Path | None = None) -> None:
    """Make `path` untrustworthy: `group-writable`, `world-writable`, `nobody` (owned by
    another user), `fifo` or `directory` (replacing whatever is there), or `link-outside`
    (moved to `outside`, with a link to it left at `path`)."""
    if kind == "group-writable":
        path.chmod(0o660)
    elif kind == "world-writable":
        path.chmod(0o602)
    elif kind == "nobody":
        os.chown(path, NOBODY, NOBODY)
    elif kind in ("fifo", "directory"):
        path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        else:
            path.mkdir()
    elif kind == "link-outside":
        assert outside is not None
        outside.parent.mkdir(parents=True, exist_ok=True)
        path.rename(outside)
        path.symlink_to(outside)
    else:
        raise ValueError(f"unknown kind {kind!r}")
