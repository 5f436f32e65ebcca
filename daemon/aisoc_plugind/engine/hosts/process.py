"""Run plugins in sandboxed host processes (`isolation.mode = "process"`, the default).

The supervisor (this process) keeps reading, verification, the registry and the events;
plugin code runs only in host processes forked by the zygote (`engine.hosts.zygote`) and
sandboxed before any plugin byte runs (`engine.hosts.sandbox`). A host gets the verified
bytes of its plugins and their configuration over its socket (`engine.hosts.protocol`) and
imports them from memory (`engine.hosts.runtime`).

Grouping (INTERFACE §8): with `isolation.group = "signer"` the plugins one key verified share
a host; with `"plugin"`, an id in `isolation.dedicated`, or a plugin no trusted key verified
(unsigned, invalid, skipped), a plugin has a host of its own. A host's Landlock policy is
fixed when it starts (reads of its plugins' directories, writes to their
`state_dir/<id>/`), so a plugin that joins a group later, or moves to another directory,
starts the group's next host; older hosts serve their plugins until those are replaced.

Supervision: a host that exits or is killed is restarted with backoff (0.1 s doubling to 5 s)
and its plugins loaded again; calls in flight get `plugin_crashed` (`plugin_memory_exceeded`
after a MemoryError, `plugin_timeout` for the call that overran). A run that does not answer
within `plugins.run_timeout_s` is cancelled in the host; if the host does not answer the
cancel within a second (a sync run, a blocked event loop), it is killed. After 5 crashes in
60 s the host is not restarted and its plugins end `failed` with `host_crash_loop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import marshal
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aisoc_plugind.audit import names
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.engine.hosts import HostInfo, LoadedPlugin, LoadRequest, RunOutput
from aisoc_plugind.engine.hosts.deadlines import Deadlines
from aisoc_plugind.engine.hosts.protocol import (
    HEADER_CAP,
    Frame,
    FrameReader,
    FrameTooLarge,
    Kind,
    ProtocolError,
    encode,
    read_frame,
)
from aisoc_plugind.engine.hosts.runtime import MEMORY_EXIT, HostOptions
from aisoc_plugind.engine.hosts.zygote import receive, send
from aisoc_plugind.errors import (
    PluginDError,
    PluginLoadError,
    PluginResultInvalid,
    PluginRunError,
    PluginTimeout,
    SandboxError,
)

__all__ = ["CRASH_LIMIT", "CRASH_WINDOW_S", "Emit", "HostedPlugin", "ProcessHost"]

CRASH_LIMIT = 5
CRASH_WINDOW_S = 60.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
CANCEL_GRACE_S = 1.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2.0
MAX_OPEN_FILES = 256
FRAME_SLACK = 1024 * 1024  # over max_result_bytes: the header of a result frame

# emit(event, level=..., **fields) -> seq: the event log, as the engine hands it over.
Emit = Callable[..., int]
# on_failed(plugin_ids, error): the engine moves these plugins to `failed`.
OnFailed = Callable[[list[str], PluginDError], None]


class _Zygote:
    """The supervisor's side of the zygote: start it, ask for hosts, hear about exits."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._spawns: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[dict[str, int]]] = {}
        self._tokens = itertools.count(1)
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    async def spawn(
        self, sandbox: dict[str, Any], options: HostOptions
    ) -> tuple[int, socket.socket]:
        """Fork a host; return its pid and the supervisor's end of its socket."""
        control = await self._ensure()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        token = next(self._tokens)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawns[token] = future
        try:
            message = {
                "op": "spawn",
                "token": token,
                "sandbox": sandbox,
                "options": options.to_json(),
            }
            await _send(control, message, [theirs.fileno()])
            theirs.close()
            async with asyncio.timeout(START_TIMEOUT_S):
                pid = await future
        except BaseException:
            ours.close()
            theirs.close()
            self._spawns.pop(token, None)
            raise
        self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return pid, ours

    async def start(self) -> None:
        """Start the zygote process unless it runs already."""
        await self._ensure()

    def exit_status(self, pid: int) -> asyncio.Future[dict[str, int]]:
        """Return a future for how `pid` ended (as the zygote reaped it)."""
        return self._exits.setdefault(pid, asyncio.get_running_loop().create_future())

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)

    async def _ensure(self) -> socket.socket:
        async with self._lock:
            if self._control is not None:
                return self._control
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    "-m",
                    "aisoc_plugind.engine.hosts.zygote",
                    "--fd",
                    str(theirs.fileno()),
                    "--parent",
                    str(os.getpid()),
                    pass_fds=[theirs.fileno()],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    env=_zygote_environment(),
                    # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process
                    # group) reaches the daemon only, which stops the zygote itself.
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                raise SandboxError(
                    f"cannot start the zygote: {exc}", code="host_start_failed"
                ) from exc
            finally:
                theirs.close()
            ours.setblocking(False)
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    ready = await _receive(ours)
            except (TimeoutError, OSError, ValueError) as exc:
                ours.close()
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                raise SandboxError("the zygote did not start", code="host_start_failed") from exc
            if not ready or ready[0].get("op") != "ready":
                ours.close()
                raise SandboxError("the zygote did not start", code="host_start_failed")
            self._process, self._control, self.pid = process, ours, process.pid
            asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
            return ours

    def _on_readable(self) -> None:
        control = self._control
        if control is None:
            return
        while True:
            try:
                message, fds = receive(control)
            except BlockingIOError:
                return
            except (OSError, ValueError):
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                self._lost()
                return
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("spawned", "spawn_failed"):
            future = self._spawns.pop(int(message.get("token") or 0), None)
            if future is not None and not future.done():
                if op == "spawned":
                    future.set_result(int(message["pid"]))
                else:
                    future.set_exception(
                        SandboxError(
                            f"the zygote could not fork: {message.get('error')}",
                            code="host_start_failed",
                        )
                    )
        elif op == "exited":
            status = {k: int(v) for k, v in message.items() if k in ("exit_code", "signal")}
            ended = self.exit_status(int(message["pid"]))
            if not ended.done():
                ended.set_result(status)

    def _lost(self) -> None:
        """The zygote ended (its hosts end with it, by their parent-death signal)."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()
        for spawn in self._spawns.values():
            if not spawn.done():
                spawn.set_exception(SandboxError("the zygote ended", code="host_start_failed"))
        self._spawns.clear()
        for ended in self._exits.values():
            if not ended.done():
                ended.set_result({"signal": int(signal.SIGKILL)})

    async def aclose(self) -> None:
        """End the zygote: close its socket (it exits on its own); SIGKILL it after a grace,
        or at once when this is cancelled (a shutdown's deadline)."""
        process = self._process
        self._close_control()
        if process is None:
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            self.kill()
            await process.wait()
        finally:
            self.kill()

    def kill(self) -> None:
        """Close the zygote's socket and SIGKILL it if it still runs (never blocks)."""
        self._close_control()
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def _close_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()  # the zygote reads the end and exits


async def _send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(1000):
        try:
            send(sock, message, fds)
            return
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())
    raise OSError("the zygote does not read")


async def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            message, fds = receive(sock)
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())
            continue
        return None if message is None else (message, fds)


def _zygote_environment() -> dict[str, str]:
    """The zygote's (and so every host's) environment: nothing of the daemon's."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
    return {k: os.environ[k] for k in keep if k in os.environ} | {"PYTHONDONTWRITEBYTECODE": "1"}


# ---- one host process ------------------------------------------------------------------------


@dataclass(eq=False)
class _Process:
    """One running host process and the calls waiting for its answers."""

    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: dict[str, Any]
    pidfd: int | None = None
    pending: dict[int, asyncio.Future[Frame]] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cause: str | None = None  # why the supervisor ended it: stopped, timeout, killed
    memory: bool = False

    def send(self, kind: Kind, header: dict[str, Any], blob: bytes = b"") -> None:
        if self.ended.is_set() or self.writer.is_closing():
            raise ConnectionResetError("the host has ended")
        self.writer.write(encode(kind, header, blob))

    def kill(self, cause: str) -> None:
        """End the host (SIGKILL through its pidfd: never another process that reused its
        pid); the zygote ends its process group when it reaps it."""
        if self.cause is None:
            self.cause = cause
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)


class _HostGroup:
    """A logical host: one group's plugins with a fixed sandbox, restarted when it dies."""

    def __init__(
        self, owner: ProcessHost, group: str, number: int, members: Sequence[LoadRequest]
    ) -> None:
        self.owner = owner
        self.group = group
        self.name = f"{group}#{number}"
        self.plugin_dirs = frozenset(str(m.root) for m in members)
        self.dir_ids: dict[str, tuple[int, int] | None] = {}
        self.ids = frozenset(m.plugin_id for m in members)
        self.members: dict[str, LoadRequest] = {}  # key -> the request it was loaded from
        self.process: _Process | None = None
        self.ready = asyncio.Event()
        self.failed: PluginDError | None = None
        self.stopping = False
        self.crashes: deque[float] = deque()
        self.attempt = 0
        self.calls = itertools.count(1)
        self.keys = itertools.count(1)
        self.tmp = owner.settings.state_dir / ".hosts" / f"{os.getpid()}-{number}"
        self.watcher: asyncio.Task[None] | None = None
        self.one_by_one = asyncio.Lock()  # loads retried after the host ended under them

    def covers(self, request: LoadRequest) -> bool:
        return (
            self.failed is None
            and not self.stopping
            and request.plugin_id in self.ids
            and str(request.root) in self.plugin_dirs
            # Landlock granted the directory that was at this path when the host started: a
            # directory moved there since (an upgrade) needs a host that can read it.
            and _identity(request.root) == self.dir_ids.get(str(request.root))
        )

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    # -- start, supervise, restart ---------------------------------------------------------

    async def start(self) -> None:
        """Start the host process (the first time); raise PluginLoadError when it cannot."""
        await self._spawn()
        self.ready.set()

    async def _spawn(self) -> None:
        settings = self.owner.settings
        self.dir_ids = {path: _identity(path) for path in self.plugin_dirs}
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        for plugin_id in self.ids:
            (settings.state_dir / plugin_id).mkdir(mode=0o700, parents=True, exist_ok=True)
        sandbox = {
            "environment": {
                **{
                    k: v for k, v in _zygote_environment().items() if k != "PYTHONDONTWRITEBYTECODE"
                },
                "TMPDIR": str(self.tmp),
                "HOME": str(self.tmp),
                "PLUGIN_STATE_ROOT": _real(settings.state_dir),
            },
            "plugin_dirs": sorted(_real(p) for p in self.plugin_dirs),
            "read_paths": sorted(_real(p) for p in settings.isolation_read_paths),
            "write_paths": sorted(
                [_real(settings.state_dir / i) for i in self.ids] + [_real(self.tmp)]
            ),
            "memory_mb": settings.isolation_memory_mb,
            "max_open_files": MAX_OPEN_FILES,
            "max_processes": None,
            "landlock": settings.isolation_landlock,
            "allow_subprocesses": settings.isolation_allow_subprocesses,
            "protected": sorted(_real(p) for p in self.owner.protected),
        }
        options = HostOptions(
            max_result_bytes=settings.max_result_bytes, concurrency=settings.run_concurrency
        )
        try:
            pid, sock = await self.owner.zygote.spawn(sandbox, options)
        except (SandboxError, OSError, TimeoutError) as exc:
            raise PluginLoadError(
                f"the plugin host did not start: {exc}", code="host_start_failed"
            ) from exc
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # it ended already (the hello below says why), or no pidfd here
            pidfd = None
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**16)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                hello = await read_frame(reader, FRAME_SLACK)
        except (TimeoutError, EOFError, ProtocolError) as exc:
            writer.close()
            if pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
            raise PluginLoadError(
                "the plugin host did not start", code="host_start_failed"
            ) from exc
        if hello.kind is not Kind.HELLO or "error" in hello.header:
            writer.close()
            if pidfd is not None:
                os.close(pidfd)
            error = hello.header.get("error") or {}
            raise PluginLoadError(
                f"the plugin host's sandbox failed: {error.get('message', 'no hello')}",
                code=str(error.get("code") or "host_start_failed"),
            )
        process = _Process(pid=pid, reader=reader, writer=writer, hello=hello.header, pidfd=pidfd)
        self.process = process
        report = hello.header.get("sandbox") or {}
        landlock = str(report.get("landlock_status", "unknown"))
        subprocesses = str(report.get("subprocesses", "unknown"))
        contained = landlock in ("enforced", "off") and subprocesses in ("denied", "allowed")
        self.owner.emit(
            names.PLUGIN_HOST_STARTED,
            level="info" if contained else "warning",
            pid=pid,
            group=self.group,
            host=self.name,
            plugin_ids=sorted(self.ids),
            landlock=landlock,
            landlock_abi=report.get("landlock_abi"),
            subprocesses=subprocesses,
            memory_mb=self.owner.settings.isolation_memory_mb,
        )
        self.watcher = asyncio.ensure_future(self._serve(process))
        # Not `ready` yet: a restart loads the plugins again first (calls wait for that).

    async def _serve(self, process: _Process) -> None:
        """Read the host's answers until it ends; then account for the end and restart."""
        cap = self.owner.settings.max_result_bytes + FRAME_SLACK
        frames = FrameReader(process.reader, cap)
        try:
            while True:
                for frame in await frames.frames():
                    self._answer(process, frame)
        except (EOFError, ProtocolError, ConnectionError, OSError):
            pass  # a host that breaks the protocol is treated as crashed
        finally:
            process.ended.set()
            with contextlib.suppress(Exception):
                process.writer.close()
        status = await self._status(process)
        if not status:  # no exit reported: it is still there, without a socket
            process.kill(process.cause or "crashed")
            status = await self._status(process)
        process.close()
        self._ended(process, status)

    def _answer(self, process: _Process, frame: Frame) -> None:
        call_id = frame.header.get("id")
        if frame.kind is Kind.ERROR and frame.header.get("code") == "plugin_memory_exceeded":
            process.memory = True
        future = process.pending.pop(call_id, None) if isinstance(call_id, int) else None
        if future is not None and not future.done():
            future.set_result(frame)

    async def _status(self, process: _Process) -> dict[str, int]:
        future = self.owner.zygote.exit_status(process.pid)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                return await asyncio.shield(future)
        except TimeoutError:
            return {}
        finally:
            self.owner.zygote.forget(process.pid)

    def _ended(self, process: _Process, status: dict[str, int]) -> None:
        if self.process is process:
            self.process = None
            self.ready.clear()
        reason = _reason(process, status)
        error = _crash_error(reason)
        for future in process.pending.values():
            if not future.done():
                future.set_exception(error)
        process.pending.clear()
        self.owner.emit(
            names.PLUGIN_HOST_EXITED,
            level="info" if reason == "stopped" else "error",
            pid=process.pid,
            group=self.group,
            host=self.name,
            plugin_ids=sorted(self.ids),
            reason=reason,
            **status,
        )
        if reason == "stopped" or self.stopping:
            self._cleanup()
            return
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) >= CRASH_LIMIT:
            self._give_up()
            return
        self.owner.background(self._restart())

    def _give_up(self) -> None:
        self.failed = PluginRunError(
            f"the plugin host crashed {len(self.crashes)} times in {CRASH_WINDOW_S:.0f} s; "
            "it is not restarted (reload the plugin to try again)",
            code="host_crash_loop",
        )
        self.ready.set()  # waiters see `failed`
        ids = sorted({m.plugin_id for m in self.members.values()})
        self.members.clear()
        self.owner.forget(self)
        self._cleanup()
        self.owner.on_failed(ids, self.failed)

    async def _restart(self) -> None:
        self.attempt += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (len(self.crashes) - 1), BACKOFF_MAX_S)
        self.owner.emit(
            names.PLUGIN_HOST_RESTARTING,
            level="warning",
            group=self.group,
            host=self.name,
            plugin_ids=sorted(self.ids),
            attempt=self.attempt,
            delay_s=round(delay, 3),
        )
        await asyncio.sleep(delay)
        if self.stopping or self.failed is not None:
            return
        try:
            await self._spawn()
        except PluginLoadError:
            self._ended_before_start()
            return
        process = self.process
        for key, request in list(self.members.items()):
            if process is None or process.ended.is_set():
                return  # it ended again while loading: its own end restarts it
            try:
                await self._load_into(key, request, process)
            except PluginDError as exc:
                self.members.pop(key, None)
                self.owner.on_failed([request.plugin_id], exc)
        if process is not None and not process.ended.is_set():
            self.ready.set()

    def _ended_before_start(self) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        if len(self.crashes) >= CRASH_LIMIT:
            self._give_up()
        else:
            self.owner.background(self._restart())

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- calls -------------------------------------------------------------------------------

    async def _process_ready(self, timeout_s: float) -> _Process:
        if self.failed is not None:
            raise self.failed
        process = self.process
        if not self.ready.is_set() or process is None or process.ended.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    while (
                        not self.ready.is_set()
                        or self.process is None
                        or self.process.ended.is_set()
                    ):
                        if self.failed is not None:
                            raise self.failed
                        await self.ready.wait()
                        if self.failed is None and (
                            self.process is None or self.process.ended.is_set()
                        ):
                            await asyncio.sleep(0.01)
            except TimeoutError as exc:
                raise PluginRunError(
                    "the plugin's host is restarting", code="plugin_crashed"
                ) from exc
            if self.failed is not None:
                raise self.failed
            process = self.process
            assert process is not None
        return process

    async def _call(
        self, process: _Process, kind: Kind, header: dict[str, Any], blob: bytes = b""
    ) -> tuple[int, asyncio.Future[Frame]]:
        call_id = next(self.calls)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        process.pending[call_id] = future
        try:
            process.send(kind, {"id": call_id, **header}, blob)
        except (ConnectionError, OSError) as exc:
            process.pending.pop(call_id, None)
            raise PluginRunError("the plugin's host has ended", code="plugin_crashed") from exc
        return call_id, future

    async def load(self, request: LoadRequest) -> HostedPlugin:
        """Load a version into this host. When the host ends while it loads (another plugin's
        import may have ended it), try once more after the restart, one load at a time: only
        the plugin that ends the host again fails (`host_crashed`)."""
        key = f"{request.plugin_id}#{next(self.keys)}"
        timeout = self.owner.settings.run_timeout_s
        try:
            await self._load_into(key, request, await self._process_ready(timeout))
        except PluginLoadError as exc:
            if exc.code != "host_crashed":
                raise
            async with self.one_by_one:
                await self._load_into(key, request, await self._process_ready(timeout))
        self.members[key] = request
        return HostedPlugin(self, key, request.plugin_id)

    async def _load_into(self, key: str, request: LoadRequest, process: _Process) -> None:
        timeout = self.owner.settings.run_timeout_s
        files = sorted(request.sources.items())
        # What the scan compiled from these same verified bytes (the host would compile them
        # again otherwise); marshal is safe in this direction: the host trusts its supervisor.
        compiled = sorted((rel, marshal.dumps(code)) for rel, code in (request.code or {}).items())
        header = {
            "key": key,
            "plugin_id": request.plugin_id,
            "entry_point": request.entry_point,
            "root": str(request.root),
            "config": dict(request.config),
            "files": [[rel, len(data)] for rel, data in files],
            "code": [[rel, len(data)] for rel, data in compiled],
        }
        blob = b"".join(d for _, d in files) + b"".join(d for _, d in compiled)
        try:
            call_id, future = await self._call(process, Kind.LOAD, header, blob)
        except FrameTooLarge as exc:  # the host would drop the connection (a crash)
            raise PluginLoadError(
                f"the plugin's configuration takes {exc.size} bytes once encoded; a plugin "
                f"host accepts at most {HEADER_CAP}",
                code="plugin_config_invalid",
            ) from exc
        except PluginRunError as exc:  # it ended between being ready and this send
            raise _ended_while_loading(exc) from exc
        try:
            async with asyncio.timeout(timeout):
                frame = await future
        except TimeoutError as exc:
            process.pending.pop(call_id, None)
            process.kill("timeout")  # a hung import: the host is restarted without it
            raise PluginLoadError(
                f"importing and constructing the plugin took longer than {timeout}s",
                code="plugin_load_timeout",
            ) from exc
        except PluginRunError as exc:
            raise _ended_while_loading(exc) from exc
        if frame.kind is Kind.ERROR:
            raise PluginLoadError(_message(frame), code=_code(frame, "plugin_import_failed"))
        if frame.kind is not Kind.LOADED:
            raise PluginLoadError(
                "the plugin host answered out of turn", code="host_protocol_error"
            )

    async def run(self, key: str, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        timeout = self.owner.settings.run_timeout_s
        deadlines = self.owner.deadlines
        watch = deadlines.start(timeout)
        call_id = 0
        process: _Process | None = None
        finished = False
        try:
            process = await self._process_ready(timeout)
            try:
                call_id, future = await self._call(
                    process, Kind.RUN, {"key": key, "payload": payload, "context": context}
                )
            except FrameTooLarge as exc:  # the host would drop the connection (a crash)
                raise PluginRunError(
                    f"the payload and context take {exc.size} bytes once encoded; a plugin "
                    f"host accepts at most {HEADER_CAP}",
                    code="payload_too_large",
                ) from exc
            except ValueError as exc:  # NaN or the like in the payload
                raise PluginRunError(
                    f"the payload cannot be sent: {exc}", code="invalid_body"
                ) from exc
            frame = await future
        except asyncio.CancelledError:
            finished = True
            expired = deadlines.finish(watch)
            task = asyncio.current_task()
            if not expired or (task is not None and task.cancelling()):
                raise  # cancelled from outside (shutdown): not this call's time limit
            if process is not None and call_id:
                process.pending.pop(call_id, None)
                self.owner.background(self._cancel(process, call_id))
            raise PluginTimeout(f"run did not return within {timeout}s") from None
        finally:
            if not finished and deadlines.finish(watch):
                raise PluginTimeout(f"run did not return within {timeout}s")
        return self._result(frame)

    def _result(self, frame: Frame) -> RunOutput:
        if frame.kind is Kind.ERROR:
            code = _code(frame, "plugin_error")
            message = _message(frame)
            if code == "plugin_result_invalid":
                raise PluginResultInvalid(message)
            if code == "plugin_result_too_large":
                raise PluginResultInvalid(message, code="plugin_result_too_large")
            if code not in _RUN_CODES:
                code = "plugin_error"
            fault = frame.header.get("fault")
            if code == "plugin_error":  # the type only: the text can quote payload or config
                named = isinstance(fault, str) and fault.isidentifier() and len(fault) <= 64
                fault = fault if named else "Exception"
                message = f"plugin raised {fault}"
            else:
                fault = None
            raise PluginRunError(message, code=code, fault=fault)
        if frame.kind is not Kind.RESULT:
            raise PluginRunError("the plugin host answered out of turn", code="plugin_crashed")
        cap = self.owner.settings.max_result_bytes
        if len(frame.blob) > cap:  # refused before decoding: decoding costs the loop's time
            raise PluginResultInvalid(
                f"the result is {len(frame.blob)} bytes, over plugins.max_result_bytes ({cap})",
                code="plugin_result_too_large",
            )
        try:
            text = frame.blob.decode("utf-8")
            value = json.loads(text)
        except ValueError as exc:
            raise PluginResultInvalid("the plugin host sent a result that is not JSON") from exc
        if not isinstance(value, dict):
            raise PluginResultInvalid("the plugin host sent a result that is not an object")
        return RunOutput(value, text)

    async def _cancel(self, process: _Process, call_id: int) -> None:
        """Ask the host to cancel an overrunning call; kill it when it does not answer."""
        answered: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        process.pending[call_id] = answered
        try:
            process.send(Kind.CANCEL, {"id": call_id})
            async with asyncio.timeout(CANCEL_GRACE_S):
                await answered
        except (TimeoutError, ConnectionError, OSError):
            process.pending.pop(call_id, None)
            if not process.ended.is_set():
                process.kill("timeout")
        except PluginDError:
            pass  # the host ended meanwhile

    async def teardown(self, key: str) -> None:
        request = self.members.pop(key, None)
        process = self.process
        try:
            if request is not None and process is not None and not process.ended.is_set():
                call_id, future = await self._call(process, Kind.TEARDOWN, {"key": key})
                try:
                    async with asyncio.timeout(self.owner.settings.run_timeout_s):
                        frame = await future
                except TimeoutError as exc:
                    process.pending.pop(call_id, None)
                    process.kill("timeout")
                    raise PluginLoadError(
                        "teardown() did not return in time; its host was ended",
                        code="plugin_teardown_failed",
                    ) from exc
                if frame.kind is Kind.ERROR:
                    raise PluginLoadError(_message(frame), code="plugin_teardown_failed")
        except PluginRunError:
            pass  # the host is gone: nothing left to tear down
        finally:
            if not self.members:
                await self.stop()

    async def stop(self) -> None:
        """Stop the host: STOP (teardown of what is left), then kill after a grace."""
        if self.stopping:
            return
        self.stopping = True
        self.owner.forget(self)
        process = self.process
        if process is None or process.ended.is_set():
            self._cleanup()
            return
        process.cause = "stopped"
        with contextlib.suppress(ConnectionError, OSError):
            process.send(Kind.STOP, {})
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.ended.wait()
        except TimeoutError:
            process.kill("stopped")
        if self.watcher is not None:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(STOP_TIMEOUT_S * 2):
                    await asyncio.shield(self.watcher)


_RUN_CODES = frozenset(
    {"plugin_error", "plugin_memory_exceeded", "plugin_not_loaded", "plugin_cancelled"}
)


def _code(frame: Frame, default: str) -> str:
    code = frame.header.get("code")
    return code if isinstance(code, str) and code.isidentifier() and len(code) <= 64 else default


def _ended_while_loading(exc: PluginRunError) -> PluginLoadError:
    """A load cut by its host's end (before or after the frame went out): `host_crashed`,
    which `load` tries once more, one load at a time, after the restart."""
    return PluginLoadError(
        f"the plugin host ended while loading the plugin ({exc.code})", code="host_crashed"
    )


def _message(frame: Frame) -> str:
    message = frame.header.get("message")
    text = message if isinstance(message, str) else "the plugin host reported an error"
    return text[:1000]


def _reason(process: _Process, status: dict[str, int]) -> str:
    if process.cause in ("stopped", "timeout"):
        return process.cause
    if process.memory or status.get("exit_code") == MEMORY_EXIT:
        return "memory"
    if status.get("signal") == signal.SIGKILL and process.cause is None:
        return "killed"
    return "crashed"


def _crash_error(reason: str) -> PluginDError:
    if reason == "memory":
        return PluginRunError("the plugin's host ran out of memory", code="plugin_memory_exceeded")
    if reason == "timeout":
        return PluginRunError(
            "the plugin's host was ended: a call on it overran its time limit",
            code="plugin_crashed",
        )
    return PluginRunError(f"the plugin's host ended ({reason})", code="plugin_crashed")


def _real(path: Path | str) -> str:
    return os.path.realpath(path)


def _identity(path: Path | str) -> tuple[int, int] | None:
    """Return the (device, inode) of the directory at `path` now, or None."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


# ---- the PluginHost ------------------------------------------------------------------------


class HostedPlugin:
    """One plugin version loaded in a host process."""

    def __init__(self, group: _HostGroup, key: str, plugin_id: str) -> None:
        self._group = group
        self._key = key
        self.plugin_id = plugin_id

    @property
    def host(self) -> HostInfo:
        """Return the host process it runs in (its pid changes when the host restarts)."""
        return HostInfo(pid=self._group.pid, group=self._group.name, isolated=True)

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        """Run it in its host; raise PluginRunError, PluginTimeout or PluginResultInvalid."""
        return await self._group.run(self._key, payload, context)

    async def teardown(self) -> None:
        """Call its `teardown()` in the host and forget it; the last one stops the host."""
        await self._group.teardown(self._key)


class ProcessHost:
    """Load plugins into sandboxed host processes; see the module docstring."""

    def __init__(self, settings: Settings, emit: Emit, *, protected: Iterable[Path] = ()) -> None:
        self.settings = settings
        self.emit = emit
        self.protected = tuple(protected)
        self.zygote = _Zygote()
        self.deadlines = Deadlines()
        self._groups: dict[str, _HostGroup] = {}
        self._all: set[_HostGroup] = set()
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_failed: OnFailed | None = None
        self._warming: asyncio.Task[None] | None = None

    @property
    def wants_code(self) -> bool:
        """Return True: the scan compiles the verified bytes (in its worker processes) and
        hosts get the code with the bytes, so a host does not compile them again."""
        return True

    @property
    def loads_together(self) -> bool:
        """Return True: a host's Landlock rules name its plugins' directories when it starts,
        so a group's plugins are best loaded in one go (one host, not one per chunk)."""
        return True

    @property
    def state_root(self) -> Path:
        """Return `isolation.state_dir`: a host's Landlock rules need its plugins' state
        directories when it starts. The scan makes them while it runs (a `mkdir` on ext4
        costs 0.1-0.5 ms of kernel time, which would otherwise all fall between the scan and
        the host's start); the host's start makes any that are still missing."""
        return self.settings.state_dir

    def warm_up(self) -> None:
        """Start the zygote now (a discovery scans meanwhile) rather than at the first load."""
        if self._warming is None:
            self._warming = asyncio.ensure_future(self._warm_up())

    async def _warm_up(self) -> None:
        with contextlib.suppress(Exception):  # the first spawn meets the same error again
            await self.zygote.start()

    def set_on_failed(self, callback: OnFailed) -> None:
        """Tell the engine when plugins are lost for good (a host in a crash loop)."""
        self._on_failed = callback

    def on_failed(self, plugin_ids: list[str], error: PluginDError) -> None:
        if self._on_failed is not None and plugin_ids:
            self._on_failed(plugin_ids, error)

    def background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, group: _HostGroup) -> None:
        if self._groups.get(group.group) is group:
            del self._groups[group.group]

    def group_of(self, request: LoadRequest) -> str:
        """Return the host group of a request under `isolation.*`."""
        if (
            self.settings.isolation_group == "plugin"
            or request.plugin_id in self.settings.isolation_dedicated
            or not request.group.startswith("signer:")
        ):
            return f"plugin:{request.plugin_id}"
        return request.group

    async def load(self, request: LoadRequest) -> LoadedPlugin:
        """Load one version (in its group's host, or a new one); raise PluginLoadError."""
        outcome = (await self.load_many([request]))[0]
        if isinstance(outcome, PluginDError):
            raise outcome
        return outcome

    async def load_many(self, requests: Sequence[LoadRequest]) -> list[LoadedPlugin | PluginDError]:
        """Load versions, each group's together; one outcome per request, in order."""
        placed, fresh = self._place(requests)
        outcomes: list[LoadedPlugin | PluginDError | None] = [None] * len(requests)
        for name, indices in fresh.items():
            group = _HostGroup(self, name, next(self._numbers), [requests[i] for i in indices])
            try:
                await group.start()
            except PluginDError as exc:
                for i in indices:
                    outcomes[i] = exc
                continue
            self._groups[name] = group
            self._all.add(group)
            for i in indices:
                placed[i] = group

        async def one(index: int) -> None:
            try:
                outcomes[index] = await placed[index].load(requests[index])
            except PluginDError as exc:
                outcomes[index] = exc

        await asyncio.gather(*(one(i) for i in placed))
        for group in {placed[i] for i in placed}:
            if not group.members and not group.stopping:
                self.background(group.stop())
        return [
            o if o is not None else PluginLoadError("not loaded", code="plugin_load_error")
            for o in outcomes
        ]

    def _place(
        self, requests: Sequence[LoadRequest]
    ) -> tuple[dict[int, _HostGroup], dict[str, list[int]]]:
        """Sort requests into running hosts that cover them, and groups that need a new one."""
        placed: dict[int, _HostGroup] = {}
        fresh: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            group = self._groups.get(self.group_of(request))
            if group is not None and group.covers(request):
                placed[index] = group
            else:
                fresh.setdefault(self.group_of(request), []).append(index)
        return placed, fresh

    async def aclose(self) -> None:
        """Stop every host (teardowns of what is left), then the zygote, within the grace.

        When this is cancelled (the shutdown's deadline passed), every host is killed through
        its pidfd and the zygote by its PID at once, before the cancellation goes on.
        """
        groups = list(self._all)
        self._all.clear()
        self._groups.clear()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_grace_s):
                    await asyncio.gather(*(g.stop() for g in groups), return_exceptions=True)
            self._kill(groups)
            await self._ended(groups)
            if self._warming is not None:  # let a starting zygote finish, to stop it cleanly
                with contextlib.suppress(Exception):
                    await self._warming
            await self.zygote.aclose()
        finally:
            self._kill(groups)
            if self._warming is not None:
                self._warming.cancel()
            self.zygote.kill()

    async def _ended(self, groups: Iterable[_HostGroup]) -> None:
        """Wait (briefly) until the zygote reported each host's end, so that every
        `plugin.host.exited` is written before the audit file closes."""
        watchers = [g.watcher for g in groups if g.watcher is not None and not g.watcher.done()]
        if watchers:
            await asyncio.wait(watchers, timeout=STOP_TIMEOUT_S)

    def _kill(self, groups: Iterable[_HostGroup]) -> None:
        for group in groups:
            if group.process is not None:
                group.process.kill("stopped")
        for task in list(self._tasks):
            task.cancel()
