"""Tell whether a file may have changed, without a `stat()` per question: inotify on Linux.

`ChangeFlag.changed()` answers True when the file may have changed since it was last asked
(and then the caller looks: `stat()`, re-read). With inotify attached to the event loop, the
directory holding the file (and, for a symlink, the directory of its target) is watched and
any event in it raises the flag, except writes to other files (a busy neighbour such as an
audit file in the same directory would otherwise raise it on every write): a write counts only
when it names the file or its symlink's target, or when the file has other hard links (a
write through one of them is reported under that name: then every write counts). Creations,
renames, deletions and attribute changes always count (that is how symlink swaps such as
kubelet's `..data` show). The loop reads the events before it runs the handlers of the
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
# Writes to a file: they count only when they name the watched file (or its target).
_WRITES = _IN_MODIFY | _IN_CLOSE_WRITE


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
        # Names whose writes count; None: every write counts (see the module docstring).
        self._names: frozenset[bytes] | None = None
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
        names = {os.fsencode(self.path.name)}
        linked = False
        with contextlib.suppress(OSError, RuntimeError):
            target = self.path.resolve()
            wanted.add(str(target.parent))
            names.add(os.fsencode(target.name))
            linked = os.stat(target).st_nlink > 1  # a write through another link: its name
        self._names = None if linked else frozenset(names)
        for directory in wanted - self._watched:
            if libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) < 0:
                return False
            self._watched.add(directory)
        return True

    def _drain(self) -> None:
        """Read every queued event (the loop's reader callback); an event that may concern
        the file raises the flag (see the module docstring)."""
        fd = self._fd
        if fd is None:
            return
        lost = raised = False
        names = self._names
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
            concern, gone = _read_events(data, names)
            raised, lost = raised or concern, lost or gone
        if lost:
            raised = True
            self.close()
        if raised:
            self._dirty = True
            if self._on_change is not None:
                self._on_change()


def _read_events(data: bytes, names: frozenset[bytes] | None) -> tuple[bool, bool]:
    """Return (whether an event may concern the file, whether the watch is lost) for a read
    of inotify events. Writes count only under `names` (None: all count); a watched
    directory gone or events lost means the watch is lost."""
    concern = lost = False
    offset = 0
    while offset + _EVENT.size <= len(data):
        _, mask, _, size = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        offset = start + size
        if mask & ~_WRITES or names is None or data[start:offset].rstrip(b"\0") in names:
            concern = True
        lost = lost or bool(mask & (_IN_IGNORED | _IN_Q_OVERFLOW | _IN_DELETE_SELF))
    return concern, lost
