"""Bind the three Landlock system calls with ctypes: probe the ABI, build a ruleset, enforce it.

Why a ctypes binding: Landlock is three system calls and two small structs; the PyPI bindings
are thin, little maintained and would be a dependency on the most security-sensitive path of
the daemon, and a C extension would add a compiler to the build. ctypes is stdlib, and the
kernel's own ABI versioning (``LANDLOCK_CREATE_RULESET_VERSION``) tells us at run time which
access rights exist, so nothing here is decided at build time.

Contracts:

* `probe()` never raises: it answers `Available(abi)` or `Unavailable(reason, detail)`, where
  `reason` is one of `UNAVAILABLE_REASONS` (a kernel without Landlock, Landlock disabled at
  boot, the syscalls blocked by a seccomp filter, an unknown CPU architecture, ...).
* `enforce(rules, abi=...)` never raises for the kernel's or the filesystem's reasons: it
  answers `Enforced` (what was granted, which paths were skipped because they do not exist or
  cannot be opened) or `Failed` (the step and errno). Only after `Enforced` is the calling
  thread restricted; it stays restricted for life, and so do its future children.
* Every filesystem right the ABI knows is *handled*, so whatever no rule grants is denied.
  Network rights are never handled (the isolation contract leaves the network open). From
  ABI 6 on, both scopes are handled: no signals to, and no abstract UNIX sockets of,
  processes outside the sandbox (the daemon, systemd's ``NOTIFY_SOCKET``).
* Landlock restricts the calling *thread* (and what it starts afterwards): call `enforce` while
  the process is single-threaded, after ``PR_SET_NO_NEW_PRIVS`` (or the kernel refuses).

Reference: the kernel's ``include/uapi/linux/landlock.h`` and Documentation/userspace-api/
landlock.rst. The syscall numbers are the generic ones (444-446) shared by x86_64 and
aarch64 (``include/uapi/asm-generic/unistd.h``; x86_64's ``syscall_64.tbl`` uses the same).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import platform
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "SYSCALL_NUMBERS",
    "UNAVAILABLE_REASONS",
    "Access",
    "Available",
    "Enforced",
    "Failed",
    "PathRule",
    "Scope",
    "Skipped",
    "Unavailable",
    "enforce",
    "handled_access",
    "handled_scopes",
    "probe",
    "ruleset_attr_size",
    "unavailable_reason",
]


class Access(enum.IntFlag):
    """Filesystem access rights (``LANDLOCK_ACCESS_FS_*``), with the ABI that introduced each."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13  # ABI 2: link/rename across directories
    TRUNCATE = 1 << 14  # ABI 3: truncate(2), ftruncate(2), open(O_TRUNC)
    IOCTL_DEV = 1 << 15  # ABI 5: ioctl(2) on character and block devices


class Scope(enum.IntFlag):
    """IPC scopes (``LANDLOCK_SCOPE_*``, ABI 6): deny reaching processes outside the sandbox."""

    ABSTRACT_UNIX_SOCKET = 1 << 0
    SIGNAL = 1 << 1


# (landlock_create_ruleset, landlock_add_rule, landlock_restrict_self) by `platform.machine()`.
SYSCALL_NUMBERS: Final[dict[str, tuple[int, int, int]]] = {
    "x86_64": (444, 445, 446),
    "aarch64": (444, 445, 446),
    "arm64": (444, 445, 446),
}

UNAVAILABLE_REASONS: Final = (
    "kernel_without_landlock",  # ENOSYS: built without CONFIG_SECURITY_LANDLOCK (or too old)
    "landlock_disabled",  # EOPNOTSUPP: built in but not in the boot-time `lsm=` list
    "landlock_blocked",  # EPERM/EACCES: a seccomp filter refuses the syscall
    "unsupported_architecture",  # no syscall numbers known for this machine
    "libc_unavailable",  # no C library to call syscall(2) through
    "probe_failed",  # any other answer to the version probe
)

_CREATE_RULESET_VERSION: Final = 1 << 0
_RULE_PATH_BENEATH: Final = 1

_V1_ACCESS: Final = Access(
    Access.EXECUTE
    | Access.WRITE_FILE
    | Access.READ_FILE
    | Access.READ_DIR
    | Access.REMOVE_DIR
    | Access.REMOVE_FILE
    | Access.MAKE_CHAR
    | Access.MAKE_DIR
    | Access.MAKE_REG
    | Access.MAKE_SOCK
    | Access.MAKE_FIFO
    | Access.MAKE_BLOCK
    | Access.MAKE_SYM
)
# The rights that mean something on a file rather than a directory; a rule on a file may
# carry only these (the kernel answers EINVAL otherwise).
_FILE_ACCESS: Final = Access(
    Access.EXECUTE | Access.WRITE_FILE | Access.READ_FILE | Access.TRUNCATE | Access.IOCTL_DEV
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Available:
    """The kernel enforces Landlock at this ABI version (1 or more)."""

    abi: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Unavailable:
    """Landlock cannot be used here; `reason` is one of `UNAVAILABLE_REASONS`."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PathRule:
    """Grant `access` on `path` and everything beneath it (symlinks in `path` are followed)."""

    path: Path
    access: Access


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    """A rule left out because its path could not be opened (`reason` is the errno name)."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Enforced:
    """The calling thread is now restricted: what was handled, granted and skipped."""

    abi: int
    handled: Access
    scopes: Scope
    granted: tuple[PathRule, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """A Landlock call failed at `step`; the thread is not restricted."""

    step: str
    errno: int
    detail: str


class _PathBeneathAttr(ctypes.Structure):
    # struct landlock_path_beneath_attr is __attribute__((packed)): 12 bytes.
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


def handled_access(abi: int) -> Access:
    """Return every filesystem right that ABI `abi` knows (0 for no ABI)."""
    if abi < 1:
        return Access(0)
    access = _V1_ACCESS
    for since, right in ((2, Access.REFER), (3, Access.TRUNCATE), (5, Access.IOCTL_DEV)):
        if abi >= since:
            access |= right
    return access


def handled_scopes(abi: int) -> Scope:
    """Return the IPC scopes ABI `abi` can enforce (both from ABI 6, none before)."""
    return Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL if abi >= 6 else Scope(0)


def ruleset_attr_size(abi: int) -> int:
    """Return how many bytes of `struct landlock_ruleset_attr` ABI `abi` reads."""
    if abi >= 6:
        return 24  # + scoped
    return 16 if abi >= 4 else 8  # + handled_access_net from ABI 4


def unavailable_reason(err: int) -> str:
    """Name why the version probe failed with errno `err` (one of `UNAVAILABLE_REASONS`)."""
    if err == errno.ENOSYS:
        return "kernel_without_landlock"
    if err == errno.EOPNOTSUPP:
        return "landlock_disabled"
    if err in (errno.EPERM, errno.EACCES):
        return "landlock_blocked"
    return "probe_failed"


class _Syscalls:
    """The three syscalls through libc's `syscall(2)`, with errno captured after each call."""

    def __init__(self, numbers: tuple[int, int, int]) -> None:
        self._create, self._add, self._restrict = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def _call(self, *args: int | ctypes.c_void_p | None) -> tuple[int, int]:
        # syscall(2) is variadic: every integer goes as a full `long`, so no register half
        # is left undefined.
        c_args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        ctypes.set_errno(0)
        result = int(self._libc.syscall(*c_args))
        return result, ctypes.get_errno() if result < 0 else 0

    def abi_version(self) -> tuple[int, int]:
        return self._call(self._create, None, 0, _CREATE_RULESET_VERSION)

    def create_ruleset(self, attr: _RulesetAttr, size: int) -> tuple[int, int]:
        return self._call(self._create, _address(attr), size, 0)

    def add_path_rule(self, ruleset_fd: int, attr: _PathBeneathAttr) -> tuple[int, int]:
        return self._call(self._add, ruleset_fd, _RULE_PATH_BENEATH, _address(attr), 0)

    def restrict_self(self, ruleset_fd: int) -> tuple[int, int]:
        return self._call(self._restrict, ruleset_fd, 0)


def _address(struct: ctypes.Structure) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.addressof(struct))


def _syscalls(machine: str) -> _Syscalls | Unavailable:
    numbers = SYSCALL_NUMBERS.get(machine)
    if numbers is None:
        return Unavailable(reason="unsupported_architecture", detail=f"machine {machine!r}")
    try:
        return _Syscalls(numbers)
    except (OSError, AttributeError) as exc:
        return Unavailable(reason="libc_unavailable", detail=str(exc))


def probe(machine: str | None = None) -> Available | Unavailable:
    """Ask the kernel which Landlock ABI it enforces; never raises.

    `machine` defaults to `platform.machine()`; tests pass another to see the refusal.
    """
    calls = _syscalls(machine or platform.machine())
    if isinstance(calls, Unavailable):
        return calls
    abi, err = calls.abi_version()
    if abi >= 1:
        return Available(abi=abi)
    return Unavailable(reason=unavailable_reason(err), detail=_describe(err))


def enforce(
    rules: Iterable[PathRule], *, abi: int, machine: str | None = None
) -> Enforced | Failed:
    """Restrict the calling thread to `rules` under ABI `abi` (from `probe`); never raises.

    Each rule's rights are cut to what the ABI handles and, for a file, to the file rights.
    A path that cannot be opened is skipped (and listed), never fatal: the rights it would
    have granted stay denied.
    """
    calls = _syscalls(machine or platform.machine())
    if isinstance(calls, Unavailable):
        return Failed(step="syscalls", errno=0, detail=calls.detail)
    handled, scopes = handled_access(abi), handled_scopes(abi)
    attr = _RulesetAttr(handled_access_fs=int(handled), handled_access_net=0, scoped=int(scopes))
    ruleset_fd, err = calls.create_ruleset(attr, ruleset_attr_size(abi))
    if ruleset_fd < 0:
        return Failed(step="create_ruleset", errno=err, detail=_describe(err))
    try:
        return _fill_and_restrict(calls, ruleset_fd, rules, abi=abi)
    finally:
        os.close(ruleset_fd)


def _fill_and_restrict(
    calls: _Syscalls, ruleset_fd: int, rules: Iterable[PathRule], *, abi: int
) -> Enforced | Failed:
    granted: list[PathRule] = []
    skipped: list[Skipped] = []
    for rule in rules:
        outcome = _add_rule(calls, ruleset_fd, rule, handled_access(abi))
        if isinstance(outcome, Failed):
            return outcome
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            granted.append(outcome)
    result, err = calls.restrict_self(ruleset_fd)
    if result < 0:
        return Failed(step="restrict_self", errno=err, detail=_describe(err))
    return Enforced(
        abi=abi,
        handled=handled_access(abi),
        scopes=handled_scopes(abi),
        granted=tuple(granted),
        skipped=tuple(skipped),
    )


def _add_rule(
    calls: _Syscalls, ruleset_fd: int, rule: PathRule, handled: Access
) -> PathRule | Skipped | Failed:
    try:
        # O_PATH follows symlinks: the rule lands on the target (a venv's bin/python, a
        # merged-/usr /lib), which is what Landlock checks accesses against.
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        return Skipped(path=rule.path, reason=errno.errorcode.get(exc.errno or 0, str(exc)))
    try:
        access = rule.access & handled
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_ACCESS
        if not access:
            return Skipped(path=rule.path, reason="no_applicable_rights")
        result, err = calls.add_path_rule(ruleset_fd, _PathBeneathAttr(int(access), fd))
    finally:
        os.close(fd)
    if result < 0:
        return Failed(step="add_rule", errno=err, detail=f"{rule.path}: {_describe(err)}")
    return PathRule(path=rule.path, access=Access(access))


def _describe(err: int) -> str:
    name = errno.errorcode.get(err, str(err))
    return f"{name}: {os.strerror(err)}"
