"""Enter `aisoc-plugind`: hold the daemon's signals before anything heavy is imported.

`aisoc-plugind run` must not die of a SIGHUP or SIGTERM that arrives while its modules load
(about half a second): this entry point installs the holding handlers (`service.signals`)
before it imports the command tree. When the daemon is done and plugin threads that cannot
be stopped are left (`isolation.mode = "none"`: a hung sync `run()` or `teardown()`), the
process exits without waiting for them, after flushing its output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["JOIN_S", "lingering_threads", "plugind"]

# How long the threads left at exit may take to end before the process leaves without them.
JOIN_S = 0.25


def plugind(argv: Sequence[str] | None = None) -> None:
    """Entry point of `aisoc-plugind` (and `python -m aisoc_plugind`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    daemon = args[:1] == ["run"]
    if daemon:
        from aisoc_plugind.service.signals import hold

        hold()
    from aisoc_plugind.cli.main import main

    try:
        main(args)
    except SystemExit as done:
        if daemon and lingering_threads(JOIN_S):
            _leave(done.code)
        raise


def lingering_threads(wait_s: float = 0.0) -> list[threading.Thread]:
    """Return the non-daemon threads other than this one still alive after `wait_s` (the
    interpreter would wait for each of them at exit; idle worker threads end at once)."""
    current = threading.current_thread()
    deadline = time.monotonic() + wait_s
    found = [t for t in threading.enumerate() if t is not current and not t.daemon]
    for thread in found:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in found if t.is_alive()]


def _leave(code: object) -> None:
    """Flush what was printed and end the process now, without joining threads."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)
