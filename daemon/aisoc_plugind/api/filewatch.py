"""Tell whether a file may have changed, without a `stat()` per question: inotify on Linux.

`ChangeFlag.changed()` answers True when the file may have changed since it was last asked
(and then the caller looks: `stat()`, re-read). With inotify attached to the event loop, the
directory holding the file (and, for a symlink, the directory of its target) is watched and
any event in it raises the flag; the loop reads the events before it runs the handlers of the
requests that arrived with them, so a change made before a request is seen by that request.
Without inotify (another OS, no watch possible, the directory went away) every question is
answered True: the caller stats as before. Either way a caller may also look on its own
schedule (`TokenStore` looks at least once a second) for setups inotify cannot see.
`on_change`, when given, is called (on the loop) each time events raise the flag, for a
caller that waits for changes instead of asking (the revocation list's watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["ChangeFlag"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of name)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


class ChangeFlag:
    """Whether one file may have changed; see the module docstring."""

    def __init__(self, path: Path, on_change: Callable[[], None] | None = None) -> None:
        self.path = path
        self._on_change = on_change
        self._fd: int | None = None
        self._libc: ctypes.CDLL | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: set[str] = set()
        self._dirty = True

    @property
    def watching(self) -> bool:
        """Return True while inotify answers (False: every question is answered True)."""
        return self._fd is not None

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Start watching from `loop`; return False when inotify is not available here."""
        libc = _libc()
        if libc is None or self._fd is not None:
            return self._fd is not None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return False
        self._fd, self._libc, self._loop = fd, libc, loop
        if not self._watch_dirs(libc):
            self.close()
            return False
        loop.add_reader(fd, self._drain)
        return True

    def changed(self) -> bool:
        """Return True when the file may have changed since the last call (then look)."""
        if self._fd is None:
            return True
        if not self._dirty:
            return False
        self._dirty = False
        if self._libc is None or not self._watch_dirs(self._libc):  # a symlink may point
            self.close()  # elsewhere now, and its new directory could not be watched
        return True

    def close(self) -> None:
        """Stop watching (every later question is answered True)."""
        fd, self._fd = self._fd, None
        self._watched.clear()
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _watch_dirs(self, libc: ctypes.CDLL) -> bool:
        """Watch the file's directory and that of its resolved target; False on failure."""
        assert self._fd is not None
        wanted = {str(self.path.parent)}
        with contextlib.suppress(OSError, RuntimeError):
            wanted.add(str(self.path.resolve().parent))
        for directory in wanted - self._watched:
            if libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) < 0:
                return False
            self._watched.add(directory)
        return True

    def _drain(self) -> None:
        """Read every queued event (the loop's reader callback); any event raises the flag."""
        fd = self._fd
        if fd is None:
            return
        lost = False
        while True:
            try:
                data = os.read(fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError as exc:
                lost = exc.errno != errno.EINTR
                break
            if not data:
                break
            self._dirty = True
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + size
                # A watched directory is gone (or events were lost): watch nothing, answer
                # True to every question from now on.
                lost = lost or bool(mask & (_IN_IGNORED | _IN_Q_OVERFLOW | _IN_DELETE_SELF))
        if lost:
            self._dirty = True
            self.close()
        if self._dirty and self._on_change is not None:
            self._on_change()
