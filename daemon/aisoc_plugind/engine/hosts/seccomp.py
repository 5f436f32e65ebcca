"""Deny a plugin host the creation of processes (seccomp-bpf), while threads still work.

A fork bomb in a plugin must not take the machine down, and rlimits cannot stop it where it
matters most: the kernel does not enforce ``RLIMIT_NPROC`` for root, and containers often run
as root. So, unless `isolation.allow_subprocesses` is set, a host installs a small seccomp
filter before any plugin byte runs:

- ``fork`` and ``vfork`` fail with EPERM;
- ``clone`` fails with EPERM unless it creates a thread (``CLONE_THREAD`` set: Python's
  threads, the host's worker pool);
- ``clone3`` fails with ENOSYS, so that the C library falls back to ``clone`` for threads
  (the filter cannot look into ``clone3``'s argument structure);
- system calls of another ABI (32-bit ``int 0x80`` on x86_64, x32) fail with ENOSYS, so the
  filter cannot be stepped around.

Everything else is allowed: this is not a general system call filter. The filter is inherited
by every thread the host starts and cannot be removed (no_new_privs is set first). Only x86_64
and aarch64 are known; elsewhere the host reports the filter unavailable.

A small ctypes binding of ``prctl(PR_SET_SECCOMP)`` and a hand-assembled BPF program (14
instructions), rather than libseccomp's Python binding: that binding is not on PyPI, and the
program is short enough to read whole (`_program`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

__all__ = ["Unavailable", "deny_new_processes", "supported"]

# <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>, <linux/sched.h>
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data (little-endian)


@dataclass(frozen=True, slots=True)
class _Arch:
    audit_arch: int
    clone: int
    clone3: int
    forks: tuple[int, ...]  # fork, vfork (aarch64 has neither)


_ARCHES = {
    "x86_64": _Arch(audit_arch=0xC000003E, clone=56, clone3=435, forks=(57, 58)),
    "aarch64": _Arch(audit_arch=0xC00000B7, clone=220, clone3=435, forks=()),
}


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why the filter cannot be installed here."""

    reason: str


def supported() -> Unavailable | None:
    """Return None when this machine's architecture is known, else why not."""
    if platform.machine() not in _ARCHES or struct.calcsize("P") != 8:
        return Unavailable(f"no seccomp filter for {platform.machine()}")
    return None


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def _program(arch: _Arch) -> list[tuple[int, int, int, int]]:
    """Return the BPF program as (code, jt, jf, k); jumps are relative to the next one."""
    deny = _RET_ERRNO | errno.EPERM
    nosys = _RET_ERRNO | errno.ENOSYS
    forks = list(arch.forks)
    # Layout: 0 arch, 1 nr, 2 x32, 3 clone3, 4.. forks, clone, ALLOW, flags, JSET, ALLOW,
    # DENY, NOSYS. Targets below are absolute indices, turned into relative jumps.
    body: list[tuple[int, int | str, int | str, int]] = [
        (_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        (_JEQ_K, 0, "nosys", arch.audit_arch),  # another ABI: nothing of it
        (_LD_W_ABS, 0, 0, _OFFSET_NR),
        (_JGE_K, "nosys", 0, _X32_BIT),  # x32 numbers
        (_JEQ_K, "nosys", 0, arch.clone3),
        *[(_JEQ_K, "deny", 0, nr) for nr in forks],
        (_JEQ_K, "flags", "allow", arch.clone),
    ]
    labels_at = len(body)
    labels = {
        "allow": labels_at,
        "flags": labels_at + 1,
        "deny": labels_at + 4,
        "nosys": labels_at + 5,
    }
    tail: list[tuple[int, int | str, int | str, int]] = [
        (_RET_K, 0, 0, _RET_ALLOW),  # allow
        (_LD_W_ABS, 0, 0, _OFFSET_ARG0),  # flags: clone's first argument (low 32 bits)
        (_JSET_K, 0, "deny", _CLONE_THREAD),
        (_RET_K, 0, 0, _RET_ALLOW),  # a thread
        (_RET_K, 0, 0, deny),  # deny
        (_RET_K, 0, 0, nosys),  # nosys
    ]
    out: list[tuple[int, int, int, int]] = []
    for index, (code, jt, jf, k) in enumerate(body + tail):

        def rel(target: int | str, here: int = index) -> int:
            if isinstance(target, int):
                return target
            jump = labels[target] - here - 1
            assert 0 <= jump < 256
            return jump

        out.append((code, rel(jt), rel(jf), k))
    return out


def deny_new_processes() -> None:
    """Install the filter on the calling thread (sandbox it while single-threaded, after
    no_new_privs). Raises OSError when the kernel refuses, ValueError on an unknown arch."""
    arch = _ARCHES.get(platform.machine())
    if arch is None or supported() is not None:
        raise ValueError(f"no seccomp filter for {platform.machine()}")
    instructions = _program(arch)
    filters = (_Filter * len(instructions))(*[_Filter(*i) for i in instructions])
    program = _Program(len(instructions), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(program), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
