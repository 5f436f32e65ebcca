"""The zygote: one small process that forks plugin hosts on request (no interpreter start each).

The supervisor starts it once: `python -I -m aisoc_plugind.engine.hosts.zygote --fd N
--parent PID`, with a minimal environment and only its control socket (SOCK_SEQPACKET). It
imports the host runtime, never plugin code; arms a parent-death signal and makes itself
non-dumpable; freezes its objects for the garbage collector so that forks share its pages;
then waits for requests. A `spawn` request carries the host's end of a socketpair as
SCM_RIGHTS and the host's sandbox inputs. The zygote forks; the child starts its own session,
applies the sandbox (`engine.hosts.sandbox`) and serves (`engine.hosts.runtime`); the zygote
answers `spawned` with the pid, reaps its children and reports each host as `exited` with its
status. It has no threads (the sandbox needs a single-threaded process to fork from).
Messages are JSON objects, one per packet.

What a host starts (only with `isolation.allow_subprocesses`) ends with it, even when it left
the host's process group: the zygote and every host are child subreapers, so a process
orphaned inside a host's tree is adopted by that host while it lives and by the zygote once
it has ended; the zygote kills every child that is not a live host (`_sweep`) each time it
reaps one, and all of them when the supervisor goes away.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aisoc_plugind.engine.hosts import runtime, sandbox
from aisoc_plugind.errors import SandboxError

__all__ = ["MAX_MESSAGE", "main", "receive", "send"]

MAX_MESSAGE = 1024 * 1024


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one JSON message (and descriptors) as one packet."""
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one packet: (message, descriptors); (None, []) at the end of the socket."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a control message is a JSON object")
    return message, list(fds)


class _Zygote:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.python_paths = sandbox.interpreter_paths()
        self.hosts: set[int] = set()  # live hosts; any other child is an orphan to end

    def run(self) -> int:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        send(self.control, {"op": "ready", "pid": os.getpid()})
        while True:
            control = self.control.fileno()
            readable, _, _ = select.select([control, self.wake_r], [], [])
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
                self.reap()
            if control in readable:
                message, fds = receive(self.control)
                if message is None:
                    self._sweep(everything=True)
                    return 0  # the supervisor is gone
                self.handle(message, fds)

    def reap(self) -> None:
        """Report every host that ended. Before reaping one (while its pid is still reserved
        by the zombie), end its process group: whatever it started and left behind."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info.si_pid, signal.SIGKILL)
            pid, status = os.waitpid(info.si_pid, 0)
            self._sweep()  # what the host left behind in other groups was adopted by us
            if pid not in self.hosts:
                continue  # an orphan that was adopted and ended: nobody waits for it
            self.hosts.discard(pid)
            report: dict[str, Any] = {"op": "exited", "pid": pid}
            if os.WIFSIGNALED(status):
                report["signal"] = os.WTERMSIG(status)
            else:
                report["exit_code"] = os.waitstatus_to_exitcode(status)
            send(self.control, report)

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        token = message.get("token")
        if message.get("op") != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            send(self.control, {"op": "spawn_failed", "token": token, "error": "bad request"})
            return
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            send(self.control, {"op": "spawn_failed", "token": token, "error": str(exc)})
            return
        if pid == 0:  # the host
            code = 70
            try:
                code = self.become_host(fds[0], message)
            finally:
                os._exit(code)
        self.hosts.add(pid)
        os.close(fds[0])
        send(self.control, {"op": "spawned", "token": token, "pid": pid})

    def _sweep(self, *, everything: bool = False) -> None:
        """SIGKILL every child that is not a live host (all of them with `everything`): a
        child of ours that we did not fork is an orphan from a host that ended. Reaped
        when it ends, and whatever it started is then adopted and swept in turn."""
        for pid in _children(os.getpid()):
            if everything or pid not in self.hosts:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def become_host(self, fd: int, message: dict[str, Any]) -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.control.close()
        os.setsid()  # its own process group: the supervisor can end everything it started
        _subreaper()  # and what leaves the group is adopted here, then by the zygote
        sock = socket.socket(fileno=fd)
        spec_input: dict[str, Any] = message["sandbox"]
        try:
            spec = sandbox.build_spec(
                parent_pid=os.getppid(),
                keep_fds=[fd],
                environment=spec_input["environment"],
                python_paths=self.python_paths,
                plugin_dirs=[Path(p) for p in spec_input["plugin_dirs"]],
                read_paths=[Path(p) for p in spec_input["read_paths"]],
                write_paths=[Path(p) for p in spec_input["write_paths"]],
                memory_mb=spec_input["memory_mb"],
                max_open_files=spec_input["max_open_files"],
                max_processes=spec_input["max_processes"],
                landlock=spec_input["landlock"],
                protected=[Path(p) for p in spec_input["protected"]],
                allow_subprocesses=bool(spec_input.get("allow_subprocesses", False)),
            )
            report = sandbox.apply(spec)
        except SandboxError as exc:
            with contextlib.suppress(OSError):
                sock.sendall(_hello_failure(exc.code, exc.message))
            return 71
        # The zygote's objects stay frozen: the host's collector never walks them, so their
        # pages stay shared with the zygote (no copy-on-write from GC bookkeeping).
        options = runtime.HostOptions.from_json(message["options"])
        return runtime.serve(sock, options, {"sandbox": report.to_json()})


def _children(parent: int) -> list[int]:
    """Return the pids whose parent is `parent` (from /proc; those that vanish are skipped;
    none without /proc: then orphans are left to the process group kill and to systemd)."""
    found: list[int] = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


_PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    """Adopt this process's orphaned descendants (prctl PR_SET_CHILD_SUBREAPER; not
    inherited across fork, so the zygote and each host set it)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _hello_failure(code: str, message: str) -> bytes:
    from aisoc_plugind.engine.hosts.protocol import Kind, encode

    return encode(Kind.HELLO, {"pid": os.getpid(), "error": {"code": code, "message": message}})


_M_ARENA_MAX = -8
HOST_MALLOC_ARENAS = 2


def _arm_parent_death(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # glibc reserves a 64 MiB arena per thread that allocates (up to 8 per CPU): under a
    # host's RLIMIT_AS, a plugin's worker threads would spend the memory budget on address
    # space they never use. Forked hosts inherit the setting.
    libc.mallopt(_M_ARENA_MAX, HOST_MALLOC_ARENAS)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: hosts cannot ptrace or read our memory
    _subreaper()  # orphans of ended hosts come here
    if os.getppid() != parent:
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the zygote (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="aisoc-plugind-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _arm_parent_death(args.parent)
    control = socket.socket(fileno=args.fd)
    gc.collect()
    gc.freeze()  # what the zygote imported stays shared with every fork
    return _Zygote(control).run()


if __name__ == "__main__":  # pragma: no cover - started by ProcessHost
    sys.exit(main())
