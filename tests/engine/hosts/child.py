"""Run inside a test's child process: sandbox it as the job says, run one probe, send results.

Started as ``python child.py <hex of marshal(job)>`` by `tests.engine.hosts.children`. Only
the standard library and `aisoc_plugind` are imported before the sandbox goes up; `marshal`
(built into the interpreter) carries the job in and the results out, so the runtime probe
can tell that json, ssl, asyncio and friends are imported *after* the sandbox.

Results go over the kept descriptor ``job["result_fd"]`` as length-prefixed marshal frames.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aisoc_plugind.engine.hosts import landlock, sandbox
from aisoc_plugind.errors import SandboxError

Result = dict[str, Any]

RUNTIME_MODULES = (
    "json",
    "hashlib",
    "ssl",
    "asyncio",
    "decimal",
    "sqlite3",
    "zoneinfo",
    "mimetypes",
)
_PR_GET_DUMPABLE = 3
_PR_SET_NO_NEW_PRIVS = 38


def send(fd: int, value: object) -> None:
    """Write one length-prefixed marshal frame."""
    data = marshal.dumps(value)
    os.write(fd, len(data).to_bytes(4, "big") + data)


def outcome(action: Callable[[], object]) -> str:
    """Run `action`; "ok", or the name of the exception it raised."""
    try:
        action()
    except BaseException as exc:  # the probe reports whatever happened
        return type(exc).__name__
    return "ok"


def do(op: str, path: str) -> None:
    """One filesystem operation the tests ask about."""
    if op == "read":
        with open(path, "rb") as f:
            f.read(16)
    elif op == "list":
        os.listdir(path)
    elif op == "write":
        with open(path, "wb") as f:
            f.write(b"x")
    elif op == "append":
        with open(path, "ab") as f:
            f.write(b"x")
    elif op == "truncate":
        os.truncate(path, 0)
    elif op == "remove":
        os.unlink(path)
    else:
        raise ValueError(op)


def probe_ops(job: Result) -> Result:
    """Filesystem operations by name."""
    return {name: outcome(lambda o=op, p=path: do(o, p)) for name, (op, path) in job["ops"].items()}


def probe_survey(job: Result) -> Result:
    """Everything a standard host can be asked in one go: ops, environment, fds, limits."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    names = job["env_names"]
    null_rdev = os.stat("/dev/null").st_rdev
    return {
        "ops": probe_ops(job),
        "environ": dict(os.environ),
        "c_getenv": {name: libc.getenv(name.encode()) for name in names},
        "fds": {fd: outcome(lambda f=fd: os.fstat(f)) for fd in job["probe_fds"]},
        "stdio_is_devnull": [os.fstat(fd).st_rdev == null_rdev for fd in (0, 1)],
        "limits": {
            name: resource.getrlimit(getattr(resource, name))
            for name in ("RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC")
        },
        "dumpable": libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0),
    }


def probe_runtime(job: Result) -> Result:
    """Import and use the stdlib modules a plugin is likely to need."""
    preloaded = [m for m in RUNTIME_MODULES if m in sys.modules]

    def tls() -> None:
        import ssl

        assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 0

    def event_loop() -> None:
        import asyncio

        async def resolve() -> object:
            return await asyncio.get_running_loop().getaddrinfo("localhost", 80)

        assert asyncio.run(resolve())

    def sqlite() -> None:
        import sqlite3

        assert sqlite3.connect(":memory:").execute("select 1").fetchone() == (1,)

    def temp_file() -> None:
        import tempfile

        fd, name = tempfile.mkstemp()
        os.close(fd)
        assert name.startswith(job["private_tmp"] + "/"), name

    checks: dict[str, Callable[[], object]] = {
        "json": lambda: __import__("json").dumps({"a": 1}),
        "hashlib": lambda: __import__("hashlib").sha256(b"x").hexdigest(),
        "ssl": tls,
        "asyncio": event_loop,
        "getaddrinfo": lambda: __import__("socket").getaddrinfo("localhost", 80),
        "decimal": lambda: __import__("decimal").Decimal("1.1") + 1,
        "sqlite3": sqlite,
        "zoneinfo": lambda: __import__("zoneinfo").ZoneInfo("Europe/Paris"),
        "mimetypes": lambda: __import__("mimetypes").guess_type("a.json"),
        "tempfile": temp_file,
    }
    return {"preloaded": preloaded, **{name: outcome(check) for name, check in checks.items()}}


def probe_allocate(job: Result) -> Result:
    """Allocate `job["big"]` bytes (expected to fail) and then a small block."""
    return {
        "big": outcome(lambda: bytearray(job["big"])),
        "small": outcome(lambda: bytearray(1024 * 1024)),
    }


def probe_open_many(job: Result) -> Result:
    """Open /dev/null until the descriptor limit stops it."""
    opened: list[int] = []
    try:
        while len(opened) < 10_000:
            opened.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        error = exc.errno
    return {"opened": len(opened), "errno": error}


def probe_signal(job: Result) -> Result:
    """Signal 0 (an existence check that still goes through the LSM) to parent and self."""
    return {
        "parent": outcome(lambda: os.kill(os.getppid(), 0)),
        "self": outcome(lambda: os.kill(os.getpid(), 0)),
    }


def probe_connect(job: Result) -> Result:
    """Connect to an abstract UNIX socket the test listens on."""
    import socket

    def connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(job["address"])

    return {"connect": outcome(connect)}


def probe_hold(job: Result) -> Result:
    """Say ready, then wait until the test closes the hold pipe."""
    send(job["result_fd"], {"ready": os.getpid()})
    os.read(job["hold_fd"], 1)
    return {}


def probe_sleep(job: Result) -> Result:
    """Say ready, then sleep: only a signal ends this process early."""
    send(job["result_fd"], {"ready": os.getpid()})
    time.sleep(30)
    return {}


def build(job: Result) -> sandbox.SandboxSpec:
    """The job's sandbox spec (standard host defaults, overridable per test)."""
    spec = job["spec"]
    return sandbox.build_spec(
        parent_pid=spec.get("parent_pid") or os.getppid(),
        keep_fds=[job["result_fd"], 2, *spec.get("keep_fds", [])],
        environment=spec.get("environment", {"PATH": "/usr/bin:/bin"}),
        python_paths=sandbox.interpreter_paths(),
        plugin_dirs=[Path(p) for p in spec.get("plugin_dirs", [])],
        write_paths=[Path(p) for p in spec.get("write_paths", [])],
        memory_mb=spec.get("memory_mb", 1024),
        max_open_files=spec.get("max_open_files", 256),
        max_processes=spec.get("max_processes"),
        landlock=spec.get("landlock", "auto"),
    )


def unavailable() -> landlock.Unavailable:
    """Stand-in for `landlock.probe` on a kernel without Landlock (the one seam tests fake)."""
    return landlock.Unavailable(reason="kernel_without_landlock", detail="ENOSYS (simulated)")


def apply(job: Result) -> Result:
    """Sandbox this process: the full host sandbox, or only `landlock.enforce` of raw rules."""
    if "rules" in job:
        ctypes.CDLL(None).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        rules = [
            landlock.PathRule(path=Path(p), access=landlock.Access(a)) for p, a in job["rules"]
        ]
        done = landlock.enforce(rules, abi=job["abi"])
        if isinstance(done, landlock.Failed):
            return {"failed": done.step}
        return {
            "granted": [(str(r.path), int(r.access)) for r in done.granted],
            "skipped": [(str(s.path), s.reason) for s in done.skipped],
        }
    probe = unavailable if job.get("unavailable") else landlock.probe
    return sandbox.apply(build(job), probe=probe).to_json()


PROBES: dict[str, Callable[[Result], Result]] = {
    "ops": probe_ops,
    "survey": probe_survey,
    "runtime": probe_runtime,
    "allocate": probe_allocate,
    "open_many": probe_open_many,
    "signal": probe_signal,
    "connect": probe_connect,
    "hold": probe_hold,
    "sleep": probe_sleep,
}


def main() -> None:
    """Apply the sandbox, run the probe, send {"report", "result"} or {"error": code}."""
    job: Result = marshal.loads(bytes.fromhex(sys.argv[1]))
    if job.get("start_thread"):
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    try:
        report = apply(job)
    except SandboxError as exc:
        send(job["result_fd"], {"error": exc.code, "message": exc.message})
        return
    result = PROBES[job["probe"]](job)
    send(job["result_fd"], {"report": report, "result": result})


if __name__ == "__main__":
    main()
