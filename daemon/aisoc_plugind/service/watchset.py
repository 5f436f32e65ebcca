"""Decide what the plugins-dir watcher watches and which changes mean work.

The watch is never recursive in inotify's sense: the watcher walks `plugins.dir` itself and
watches each real directory it finds, one non-recursive watch each. A symlink is never
followed (a link to `/usr` or `/` under `plugins.dir` costs nothing, and no plugin reads
through a link anyway: `engine.bundle` refuses them), hidden and temporary directories are
never watched, and the walk stops at `MAX_WATCHED_DIRS` directories and `MAX_DEPTH` levels.

Changes are sorted per plugin directory (`root/<first component>`):

- a *content* change (a file or directory with an ordinary name) asks for a sync;
- *activity* (a hidden or temporary name inside a plugin directory: rsync's `.name.XXXXXX`,
  ansible's `.ansible_tmp*`, editors' swap files, `sed -i`'s `sedXXXXXX`) only says a deploy
  is under way there: a sync already asked for waits until it stops;
- a top-level hidden or temporary name (`.tmp-<id>/` being filled, `.staging-*`,
  `.previous/`) is never a plugin: nothing in it is looked at until it is renamed into place.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from watchfiles import Change

__all__ = [
    "MAX_DEPTH",
    "MAX_WATCHED_DIRS",
    "ChangeFilter",
    "FileChange",
    "Sorted",
    "WatchSet",
    "absolute",
    "plugin_dirs",
    "relevant_parts",
    "root_deleted",
    "sort_changes",
    "temp_name",
    "watch_set",
]

# Directories watched at most; a plugin tree deeper than the bundle reader's limit (16) is
# refused anyway.
MAX_WATCHED_DIRS = 4096
MAX_DEPTH = 17

FileChange = tuple[Change, str]

# Never plugin content: hidden names (rsync's `.name.XXXXXX`, ansible's `.ansible_tmp*`,
# vim's `.swp`/`.swx`, emacs' `.#lock`, `.git`, `.staging-*`), editor backups (`name~`),
# emacs autosaves (`#name#`), vim's `4913` write probe, bytecode, the suffixes of atomic
# writers, downloads and package managers, `sed -i`'s `sedXXXXXX`, Python's `tmpXXXXXXXX`.
_TEMP = re.compile(
    r"^\.|~$|^#.*#$|^4913$|^__pycache__$"
    r"|\.(?:pyc|tmp|temp|part|partial|swp|swx|bak|orig|rej)$"
    r"|\.dpkg-(?:new|old|tmp|dist|bak)$|\.rpm(?:new|save|orig)$"
    r"|^sed[A-Za-z0-9]{6}$|^tmp[a-z0-9_]{8}$"
)


_SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def temp_name(name: str) -> bool:
    """Return True for a hidden, temporary, backup or bytecode name (never plugin content)."""
    return _TEMP.search(name) is not None


def absolute(root: Path) -> str:
    """Return `root` as an absolute path string without a trailing slash (not resolved)."""
    return str(root.absolute()).rstrip("/") or "/"


def _placed(path: str, root: str) -> tuple[str, bool] | None:
    """Return (plugin directory name, True for content) for a change under `root`."""
    if not path.startswith(root + "/"):
        return None
    parts = PurePosixPath(path[len(root) + 1 :]).parts
    if not parts or temp_name(parts[0]):
        return None
    return parts[0], not any(temp_name(part) for part in parts[1:])


def relevant_parts(path: str, root: str) -> tuple[str, ...] | None:
    """Return `path`'s components under `root` when a change there asks for a sync, else
    None (temporary names, top-level hidden ones, paths outside). Both are absolute."""
    placed = _placed(path, root)
    if placed is None or not placed[1]:
        return None
    return PurePosixPath(path[len(root) + 1 :]).parts


@dataclass(frozen=True, slots=True)
class Sorted:
    """One batch of changes, per plugin directory."""

    changed: set[Path] = field(default_factory=set)  # content changed: sync
    active: set[Path] = field(default_factory=set)  # only temporary names moved: wait
    moved: set[str] = field(default_factory=set)  # entries that appeared or vanished

    def regrows(self, watched: Iterable[str]) -> bool:
        """Return True when the batch changes which directories there are (blocking: an
        `lstat` per entry that appeared): one appeared, or a watched one vanished."""
        gone = set(watched) & self.moved
        return bool(gone) or any(_real_dir_at(path) for path in self.moved - gone)


def sort_changes(changes: Iterable[FileChange], root: Path) -> Sorted:
    """Sort a batch into plugin directories to sync and directories with deploy activity."""
    base = absolute(root)
    changed: set[Path] = set()
    active: set[Path] = set()
    moved: set[str] = set()
    for change, path in changes:
        placed = _placed(path, base)
        if placed is None:
            continue
        name, content = placed
        (changed if content else active).add(root / name)
        if content and change is not Change.modified:
            moved.add(path)
    return Sorted(changed, active - changed, moved)


def plugin_dirs(changes: Iterable[FileChange], root: Path) -> set[Path]:
    """Group content changes by plugin directory: `root / <first component>`."""
    return sort_changes(changes, root).changed


def root_deleted(changes: Iterable[FileChange], root: Path) -> bool:
    """Return True when the batch says the watched directory itself went away."""
    return (Change.deleted, absolute(root)) in set(changes)


class ChangeFilter:
    """`awatch` filter: pass changes under a plugin directory (content or activity), and
    the root itself."""

    def __init__(self, root: Path) -> None:
        self._root = absolute(root)

    def __call__(self, change: Change, path: str) -> bool:
        """Return True when the change may need work."""
        return path == self._root or _placed(path, self._root) is not None


@dataclass(frozen=True, slots=True)
class WatchSet:
    """The directories to watch (absolute, sorted; the root first) and what was left out."""

    dirs: tuple[str, ...]
    truncated: bool = False  # MAX_WATCHED_DIRS reached
    unnamable: tuple[str, ...] = ()  # directories whose names are not UTF-8: not watched

    def plugin_dirs_of(self, dirs: Iterable[str], root: Path) -> set[Path]:
        """Return the plugin directories that hold any of `dirs`."""
        base = absolute(root)
        found: set[Path] = set()
        for path in dirs:
            placed = _placed(path, base)
            if placed is not None:
                found.add(root / placed[0])
        return found


def watch_set(root: Path, limit: int = MAX_WATCHED_DIRS) -> WatchSet:
    """Walk `root` (blocking) and return the real directories to watch: never a symlink, a
    hidden or temporary directory, one that cannot be read, or more than `limit`. Raises
    OSError when the daemon runs out of descriptors or memory while walking."""
    base = absolute(root)
    found: list[str] = [base]
    unnamable: list[str] = []
    stack = [(base, 0)]
    while stack:
        path, depth = stack.pop()
        for sub in _subdirs(path, unnamable) if depth < MAX_DEPTH else ():
            if len(found) >= limit:
                return WatchSet(_ordered(found), True, tuple(unnamable))
            found.append(sub)
            stack.append((sub, depth + 1))
    return WatchSet(_ordered(found), False, tuple(unnamable))


def _ordered(found: list[str]) -> tuple[str, ...]:
    return (found[0], *sorted(found[1:]))


def _subdirs(path: str, unnamable: list[str]) -> list[str]:
    """Return the watchable subdirectories of `path` (none when it cannot be listed).

    Raises OSError when the daemon itself lacks descriptors or memory: a walk cut short by
    that would drop watches that work.
    """
    try:
        with os.scandir(path) as entries:
            candidates = [e for e in entries if not temp_name(e.name) and _real_dir(e)]
    except OSError as exc:
        if exc.errno in _SHORT_OF:
            raise
        return []
    out = []
    for entry in candidates:
        if not _utf8(entry.name):
            unnamable.append(entry.path)
        elif os.access(entry.path, os.R_OK | os.X_OK):  # inotify needs to read it
            out.append(entry.path)
    return sorted(out)


def _real_dir_at(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as surrogates by os.fsdecode
        return False
    return True
