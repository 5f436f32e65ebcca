"""Sandbox the current process (a plugin host) before any plugin byte runs.

`build_spec` decides the policy, purely, from its inputs; `apply(spec)` carries it out on the
calling process, in the order of INTERFACE §8, and answers a `SandboxReport`:

1. parent-death signal (SIGKILL), then a check that the parent is still the expected pid
   (it may have died before the signal was armed: `sandbox_parent_gone`);
2. ``PR_SET_NO_NEW_PRIVS`` (no set-uid gain through exec; Landlock needs it) and
   ``PR_SET_DUMPABLE`` 0 (no core, no ptrace or ``/proc/<pid>/mem`` by same-uid processes);
3. every inherited descriptor closed except `keep_fds`; 0-2, unless kept, point at
   /dev/null, so a later ``open()`` can never become the daemon's stdout;
4. the environment replaced by exactly `environment` (C ``environ`` too);
5. rlimits: ``RLIMIT_AS`` (the memory budget), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` 0 and, when
   given, ``RLIMIT_NPROC`` (which the kernel does not enforce for root). Soft = hard, so
   the plugin cannot raise them again without CAP_SYS_RESOURCE;
6. Landlock (`landlock` mode): reads of the Python installation, system libraries, TLS roots,
   name-service files, time zone data, /etc/mime.types and a few devices, plus the caller's
   read paths (the plugins' own directories, ``isolation.read_paths``); writes only to the
   caller's write paths (``state_dir/<id>/``, a private temp dir). Everything else is neither
   readable nor writable, and, from ABI 6, the host cannot signal the daemon or reach its
   abstract UNIX sockets. The network is not restricted.

Modes: `"auto"` uses Landlock when the kernel has it and reports why not otherwise;
`"require"` raises `sandbox_landlock_unavailable` instead; `"off"` skips it. Any other failure
raises `SandboxError` (`sandbox_failed`) in every mode: a host that is half sandboxed must not
run plugin code. Call `apply` while the process is single-threaded (Landlock and no_new_privs
apply to the calling thread); it refuses otherwise. `make_non_dumpable` is for the supervisor.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import resource
import signal
import site
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from aisoc_plugind.engine.hosts import landlock, seccomp
from aisoc_plugind.engine.hosts.landlock import Access, PathRule
from aisoc_plugind.errors import SandboxError

__all__ = [
    "DEVICE_READ_WRITE",
    "LANDLOCK_MODES",
    "READ",
    "READ_EXEC",
    "READ_WRITE",
    "SYSTEM_READ_EXEC_PATHS",
    "SYSTEM_READ_PATHS",
    "LandlockMode",
    "LandlockProbe",
    "Limits",
    "SandboxReport",
    "SandboxSpec",
    "apply",
    "build_spec",
    "host_environment",
    "interpreter_paths",
    "make_non_dumpable",
]

LandlockMode = Literal["auto", "require", "off"]
LANDLOCK_MODES: Final = ("auto", "require", "off")
# What `apply` asks for the kernel's Landlock ABI: `landlock.probe`, or a test's stand-in.
LandlockProbe = Callable[[], landlock.Available | landlock.Unavailable]

READ: Final = Access.READ_FILE | Access.READ_DIR
READ_EXEC: Final = READ | Access.EXECUTE
# No EXECUTE (nothing written can be run) and no MAKE_CHAR/MAKE_BLOCK: a host that still holds
# CAP_MKNOD could otherwise create a device node for a disk and read it through the write grant.
READ_WRITE: Final = (
    READ
    | Access.WRITE_FILE
    | Access.TRUNCATE
    | Access.REMOVE_DIR
    | Access.REMOVE_FILE
    | Access.MAKE_DIR
    | Access.MAKE_REG
    | Access.MAKE_SOCK
    | Access.MAKE_FIFO
    | Access.MAKE_SYM
    | Access.REFER
)
# open(os.devnull, "w") asks for O_TRUNC, which Landlock (ABI 3+) checks as TRUNCATE.
DEVICE_READ_WRITE: Final = Access.READ_FILE | Access.WRITE_FILE | Access.TRUNCATE

# Shared libraries and the dynamic loader (/lib64/ld-linux-x86-64.so.2, /lib/ld-linux-
# aarch64.so.1): execute too, so an exec'd interpreter can still be loaded.
SYSTEM_READ_EXEC_PATHS: Final = ("/usr/lib", "/usr/lib64", "/lib", "/lib64")
SYSTEM_READ_PATHS: Final = (
    # the loader's cache: how dlopen() finds libssl, libsqlite3, libnss_* by soname
    "/etc/ld.so.cache",
    # TLS roots
    "/etc/ssl",
    "/etc/pki",
    "/usr/share/ca-certificates",
    "/etc/ca-certificates",
    # name service (getaddrinfo, getservbyname, getprotobyname)
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/gai.conf",
    "/etc/host.conf",
    # time zones
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/etc/timezone",
    # file types: mimetypes.init() opens it when it exists and raises if it cannot read it
    "/etc/mime.types",
    # randomness (os.urandom uses getrandom(2); some C libraries still open these)
    "/dev/urandom",
    "/dev/random",
)
_DEVICE_WRITE_PATHS: Final = ("/dev/null",)

# Never handed to plugin code: systemd's notification, socket-activation and credentials
# hand-offs, and the daemon's own settings and tokens.
_REFUSED_VARIABLES: Final = frozenset(
    {
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "CREDENTIALS_DIRECTORY",
    }
)
_PASSED_VARIABLES: Final = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_MIN_OPEN_FILES: Final = 16
_MIB: Final = 1024 * 1024

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_DUMPABLE: Final = 4
_PR_SET_NO_NEW_PRIVS: Final = 38


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Resource limits in their units: bytes of address space, descriptors, processes."""

    address_space: int | None
    open_files: int
    processes: int | None
    core: int = 0

    def to_json(self) -> dict[str, int | None]:
        """Return the limits as a JSON-ready dict."""
        return {
            "address_space": self.address_space,
            "open_files": self.open_files,
            "processes": self.processes,
            "core": self.core,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    """Everything `apply` does to a host process; built by `build_spec`, never by hand."""

    parent_pid: int
    keep_fds: tuple[int, ...]
    environment: tuple[tuple[str, str], ...]
    limits: Limits
    landlock: LandlockMode
    rules: tuple[PathRule, ...]
    allow_subprocesses: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxReport:
    """What `apply` put in place; `landlock_status` is "enforced", "off" or why it is not.

    `landlock_abi` is 0 when Landlock is not enforced. `granted` and `skipped` name the rule
    paths the kernel accepted and those left out because they could not be opened.
    """

    landlock_abi: int
    landlock_status: str
    scopes: tuple[str, ...]
    # "denied" (the seccomp filter of `seccomp.py`), "allowed" (isolation.allow_subprocesses)
    # or why the filter is not there.
    subprocesses: str
    limits: Limits
    kept_fds: tuple[int, ...]
    granted: tuple[str, ...]
    skipped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (for the host's start event)."""
        return {
            "landlock_abi": self.landlock_abi,
            "landlock_status": self.landlock_status,
            "scopes": list(self.scopes),
            "subprocesses": self.subprocesses,
            "limits": self.limits.to_json(),
            "kept_fds": list(self.kept_fds),
            "granted": list(self.granted),
            "skipped": list(self.skipped),
        }


def interpreter_paths() -> tuple[Path, ...]:
    """Return the running interpreter's installation, symlinks resolved, deduplicated.

    The prefixes (a venv's and its base interpreter's), stdlib, site-packages, the binary
    behind ``sys.executable`` (a venv's ``bin/python`` link, a pyenv version) and this
    package's own directory (an editable install lives outside site-packages).
    """
    paths = sysconfig.get_paths()
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        sys.executable,
        *(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths),
        *site.getsitepackages(),
        str(Path(__file__).resolve().parents[2]),  # .../aisoc_plugind
    ]
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user_site in sys.path:
        candidates.append(user_site)
    resolved = dict.fromkeys(os.path.realpath(p) for p in candidates if p)
    return tuple(Path(p) for p in resolved)


def host_environment(source: Mapping[str, str], *, tmp_dir: Path, home: Path) -> dict[str, str]:
    """Return a host's environment: PATH, LANG, LC_ALL, LC_CTYPE, TZ from `source`, and
    TMPDIR and HOME pointing at the host's own directories. Nothing else passes."""
    picked = {name: source[name] for name in _PASSED_VARIABLES if name in source}
    return {**picked, "TMPDIR": str(tmp_dir), "HOME": str(home)}


def build_spec(
    *,
    parent_pid: int,
    keep_fds: Iterable[int],
    environment: Mapping[str, str],
    python_paths: Iterable[Path],
    plugin_dirs: Iterable[Path] = (),
    read_paths: Iterable[Path] = (),
    write_paths: Iterable[Path] = (),
    memory_mb: int | None = 512,
    max_open_files: int = 256,
    max_processes: int | None = None,
    landlock: LandlockMode = "auto",
    protected: Iterable[Path] = (),
    allow_subprocesses: bool = False,
) -> SandboxSpec:
    """Decide a host's sandbox from its inputs; no I/O.

    `python_paths` is `interpreter_paths()` in a real host. `plugin_dirs` and `read_paths`
    become read-only, `write_paths` read-write. `protected` names what must stay out of
    reach (tokens file, audit file, keys, config): a granted path that is, or contains, one of
    them refuses the policy. Paths are compared as given, after normalisation (no symlink
    resolution: pass resolved paths). Raises SandboxError (`sandbox_policy_invalid`).
    """
    rules = _rules(
        python_paths=python_paths,
        read=[*plugin_dirs, *read_paths],
        write=write_paths,
    )
    _check_protected(rules, protected)
    return SandboxSpec(
        parent_pid=parent_pid,
        keep_fds=_check_fds(keep_fds),
        environment=_check_environment(environment),
        limits=_check_limits(memory_mb, max_open_files, max_processes),
        landlock=_check_mode(landlock),
        rules=rules,
        allow_subprocesses=bool(allow_subprocesses),
    )


def _rules(
    *, python_paths: Iterable[Path], read: Iterable[Path], write: Iterable[Path]
) -> tuple[PathRule, ...]:
    grants: dict[Path, Access] = {}
    groups: list[tuple[Iterable[Path | str], Access]] = [
        (python_paths, READ_EXEC),
        (SYSTEM_READ_EXEC_PATHS, READ_EXEC),
        (SYSTEM_READ_PATHS, READ),
        (_DEVICE_WRITE_PATHS, DEVICE_READ_WRITE),
        (read, READ),
        (write, READ_WRITE),
    ]
    for paths, access in groups:
        for path in paths:
            key = _normalised(path)
            grants[key] = grants.get(key, Access(0)) | access
    return tuple(PathRule(path=p, access=a) for p, a in grants.items())


def _normalised(path: Path | str) -> Path:
    if not os.path.isabs(path):
        raise SandboxError(
            f"sandbox path {str(path)!r} is not absolute", code="sandbox_policy_invalid"
        )
    return Path(os.path.normpath(path))


def _check_protected(rules: Iterable[PathRule], protected: Iterable[Path]) -> None:
    for secret in (_normalised(p) for p in protected):
        holders = {secret, *secret.parents}  # a set: this runs in every host's start
        for rule in rules:
            if rule.path in holders:
                raise SandboxError(
                    f"sandbox would grant {rule.path} which holds protected {secret}",
                    code="sandbox_policy_invalid",
                )


def _check_fds(keep_fds: Iterable[int]) -> tuple[int, ...]:
    kept = tuple(sorted(set(keep_fds)))
    if any(fd < 0 for fd in kept):
        raise SandboxError(f"negative descriptor in {kept}", code="sandbox_policy_invalid")
    return kept


def _check_environment(environment: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    refused = sorted(name for name in environment if _refused_variable(name))
    if refused:
        raise SandboxError(
            f"variables not allowed in a host's environment: {', '.join(refused)}",
            code="sandbox_policy_invalid",
        )
    return tuple(sorted(environment.items()))


def _refused_variable(name: str) -> bool:
    upper = name.upper()
    return upper in _REFUSED_VARIABLES or upper.startswith("AISOC_") or "TOKEN" in upper


def _check_limits(memory_mb: int | None, open_files: int, processes: int | None) -> Limits:
    if memory_mb is not None and memory_mb <= 0:
        raise SandboxError(f"memory budget {memory_mb} MiB", code="sandbox_policy_invalid")
    if open_files < _MIN_OPEN_FILES:
        raise SandboxError(
            f"max_open_files {open_files} < {_MIN_OPEN_FILES}", code="sandbox_policy_invalid"
        )
    if processes is not None and processes <= 0:
        raise SandboxError(f"max_processes {processes}", code="sandbox_policy_invalid")
    return Limits(
        address_space=None if memory_mb is None else memory_mb * _MIB,
        open_files=open_files,
        processes=processes,
    )


def _check_mode(mode: str) -> LandlockMode:
    if mode in LANDLOCK_MODES:
        return cast(LandlockMode, mode)
    raise SandboxError(
        f"landlock mode {mode!r} not in {LANDLOCK_MODES}", code="sandbox_policy_invalid"
    )


def apply(spec: SandboxSpec, *, probe: LandlockProbe = landlock.probe) -> SandboxReport:
    """Sandbox the calling process as `spec` says, in order; irreversible.

    `probe` answers which Landlock ABI the kernel has (tests inject an unavailable one).
    Raises SandboxError: `sandbox_parent_gone`, `sandbox_landlock_unavailable` (mode
    "require"), `sandbox_failed` (anything else, including a multi-threaded caller).
    """
    try:
        _require_single_thread()
        _set_parent_death_signal(spec.parent_pid)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        _prctl(_PR_SET_DUMPABLE, 0)
        kept = _close_inherited_fds(spec.keep_fds)
        _replace_environment(dict(spec.environment))
        limits = _set_limits(spec.limits)
        processes = _deny_processes(spec)
        return _apply_landlock(spec, probe, kept=kept, limits=limits, processes=processes)
    except (OSError, ValueError, MemoryError) as exc:
        raise SandboxError(f"sandbox step failed: {exc!r}", code="sandbox_failed") from exc


def _deny_processes(spec: SandboxSpec) -> str:
    """Install the seccomp filter that denies new processes (not threads), unless allowed;
    return what the report says. A kernel or machine without it is reported, not fatal."""
    if spec.allow_subprocesses:
        return "allowed"
    missing = seccomp.supported()
    if missing is not None:
        return f"unavailable: {missing.reason}"
    try:
        seccomp.deny_new_processes()
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):  # built without seccomp filters
            return f"unavailable: {exc.strerror}"
        raise
    return "denied"


def make_non_dumpable() -> None:
    """Make the calling process non-dumpable (the supervisor): no core, no same-uid ptrace.

    Raises SandboxError (`sandbox_failed`) when the kernel refuses.
    """
    _prctl(_PR_SET_DUMPABLE, 0)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = [ctypes.c_ulong(v) for v in (value, 0, 0, 0)]
    if libc.prctl(ctypes.c_int(option), *args) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl({option}) failed: {os.strerror(err)}", code="sandbox_failed")


def _require_single_thread() -> None:
    try:
        count = len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: only Python's own threads can be counted
        count = threading.active_count()
    if count != 1:
        raise SandboxError(
            f"the process has {count} threads; sandbox it before starting any",
            code="sandbox_failed",
        )


def _set_parent_death_signal(parent_pid: int) -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between our fork and the line above: the signal will never
    # come, and we would be an orphan nobody supervises.
    actual = os.getppid()
    if actual != parent_pid:
        raise SandboxError(
            f"expected parent {parent_pid}, found {actual}: the supervisor is gone",
            code="sandbox_parent_gone",
        )


def _close_inherited_fds(keep_fds: tuple[int, ...]) -> tuple[int, ...]:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep_fds and fd != devnull:
            os.dup2(devnull, fd)
    ceiling = _fd_ceiling()
    low = 3
    for fd in sorted(k for k in keep_fds if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low, ceiling))
    return keep_fds


def _fd_ceiling() -> int:
    # os.closerange uses close_range(2) and is then instant; on kernels without it, it closes
    # one by one, so stop at the hard limit (no descriptor can be above it unless it was
    # lowered after the descriptor was opened).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def _replace_environment(environment: dict[str, str]) -> None:
    os.environ.clear()  # unsetenv(3) each name: the C environ is cleared too
    os.environ.update(environment)
    tempfile.tempdir = None  # re-read TMPDIR on next use rather than a cached /tmp


def _set_limits(limits: Limits) -> Limits:
    memory, processes = limits.address_space, limits.processes
    return Limits(
        address_space=None if memory is None else _set_limit(resource.RLIMIT_AS, memory),
        open_files=_set_limit(resource.RLIMIT_NOFILE, limits.open_files),
        processes=None if processes is None else _set_limit(resource.RLIMIT_NPROC, processes),
        core=_set_limit(resource.RLIMIT_CORE, limits.core),
    )


def _set_limit(which: int, value: int) -> int:
    """Set soft = hard = `value`, lowered to the current hard limit; return what was set."""
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
    return value


def _apply_landlock(
    spec: SandboxSpec,
    probe: LandlockProbe,
    *,
    kept: tuple[int, ...],
    limits: Limits,
    processes: str = "allowed",
) -> SandboxReport:
    report = SandboxReport(
        landlock_abi=0,
        landlock_status="off",
        scopes=(),
        subprocesses=processes,
        limits=limits,
        kept_fds=kept,
        granted=(),
        skipped=(),
    )
    if spec.landlock == "off":
        return report
    support = probe()
    if isinstance(support, landlock.Unavailable):
        if spec.landlock == "require":
            raise SandboxError(
                f"Landlock is required but unavailable: {support.reason} ({support.detail})",
                code="sandbox_landlock_unavailable",
            )
        return dataclasses.replace(report, landlock_status=support.reason)
    return _enforced(report, landlock.enforce(spec.rules, abi=support.abi))


def _enforced(report: SandboxReport, outcome: landlock.Enforced | landlock.Failed) -> SandboxReport:
    if isinstance(outcome, landlock.Failed):
        raise SandboxError(
            f"Landlock {outcome.step} failed: {outcome.detail}", code="sandbox_failed"
        )
    return dataclasses.replace(
        report,
        landlock_abi=outcome.abi,
        landlock_status="enforced",
        scopes=tuple(s.name.lower() for s in landlock.Scope if s in outcome.scopes and s.name),
        granted=tuple(str(r.path) for r in outcome.granted),
        skipped=tuple(str(s.path) for s in outcome.skipped),
    )
