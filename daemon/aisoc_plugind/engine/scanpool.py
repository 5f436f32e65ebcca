"""Scan many plugin directories at once: worker processes, with this process helping.

A cold discovery of a thousand plugins is CPU work (read, parse, hash, Ed25519, compile) that
one interpreter does on one core. `ScanPool` starts worker processes (`python -I -m
aisoc_plugind.engine.scan`, with a minimal environment; no plugin code runs there) and hands
them chunks of directories. While they start, and whenever none is left, this process scans
chunks itself in a worker thread. Results come back in the order of the paths; a worker that
dies or answers nonsense has its chunks scanned again elsewhere, so nothing is skipped. The
workers live as long as one `session`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nacl.signing
from anyio.streams.buffered import BufferedByteReceiveStream

from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.scan import MAGIC, Scanned, frame, from_wire, scan, unframe
from aisoc_plugind.errors import PluginLoadError

__all__ = ["CHUNK", "POOL_MIN", "ScanPool", "Session", "default_workers", "scan_here"]

CHUNK = 16  # directories per message
IN_FLIGHT = 2  # chunks queued per worker, so it never waits for the next one
POOL_MIN = 64  # fewer directories than this are scanned here (starting workers costs more)
HELLO_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2.0
_FRAME_HEADER = 4
_MAX_FRAME = 1 << 30


def default_workers() -> int:
    """Return how many worker processes to start: one per CPU this process may use, up to 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


@dataclass(eq=False)
class Session:
    """One scan of a list of directories: chunks come back in order from `next_chunk`."""

    paths: Sequence[Path]
    mode: TrustMode
    keys: Mapping[str, nacl.signing.VerifyKey]
    compile_code: bool
    state_root: Path | None = None  # where to make admitted plugins' state directories
    chunks: list[list[Path]] = field(init=False)
    todo: deque[int] = field(init=False)
    results: dict[int, list[Scanned]] = field(default_factory=dict)
    ready: dict[int, anyio.Event] = field(default_factory=dict)
    workers_ready: int = 0
    workers_alive: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)
    scanned_by_workers: int = 0
    _next: int = 0

    def __post_init__(self) -> None:
        self.chunks = [list(self.paths[i : i + CHUNK]) for i in range(0, len(self.paths), CHUNK)]
        self.todo = deque(range(len(self.chunks)))
        self.ready = {i: anyio.Event() for i in range(len(self.chunks))}

    def __len__(self) -> int:
        return len(self.chunks)

    async def next_chunk(self) -> list[Scanned] | None:
        """Return the next chunk's results in path order, or None after the last one."""
        if self._next >= len(self.chunks):
            return None
        index = self._next
        self._next += 1
        await self.ready[index].wait()
        return self.results.pop(index)

    def deliver(self, index: int, items: list[Scanned]) -> None:
        if index in self.results or self.ready[index].is_set():
            return  # scanned twice (a worker died after answering): the first answer stands
        self.results[index] = items
        self.ready[index].set()
        self.notify()

    def done(self) -> bool:
        """Return True once every chunk has its results."""
        return all(event.is_set() for event in self.ready.values())

    def give_back(self, indices: Sequence[int]) -> None:
        """Put chunks a worker could not finish back at the front of the queue."""
        for index in reversed(indices):
            if not self.ready[index].is_set():
                self.todo.appendleft(index)
        self.notify()

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class ScanPool:
    """Start scan workers for a session; see the module docstring."""

    def __init__(
        self, workers: int, *, command: Sequence[str] | None = None, help_locally: bool = True
    ) -> None:
        self.workers = workers
        self.help_locally = help_locally  # False: scan here only when no worker is left
        executable = sys.executable
        self.command = (
            list(command)
            if command is not None
            else ([executable, "-I", "-m", "aisoc_plugind.engine.scan"] if executable else [])
        )

    @asynccontextmanager
    async def session(
        self,
        paths: Sequence[Path],
        mode: TrustMode,
        keys: Mapping[str, nacl.signing.VerifyKey],
        *,
        compile_code: bool,
        state_root: Path | None = None,
    ) -> AsyncIterator[Session]:
        """Scan `paths`; the session's `next_chunk()` gives the results in order (see
        `scan.scan` for `state_root`)."""
        session = Session(
            paths=paths, mode=mode, keys=keys, compile_code=compile_code, state_root=state_root
        )
        async with anyio.create_task_group() as tasks:
            workers = self.workers if self.command and len(paths) >= POOL_MIN else 0
            session.workers_alive = workers
            for _ in range(workers):
                tasks.start_soon(self._worker, session)
            tasks.start_soon(_local, session, self.help_locally or not workers)
            yield session
            tasks.cancel_scope.cancel()

    async def _worker(self, session: Session) -> None:
        inflight: deque[int] = deque()
        process: anyio.abc.Process | None = None
        counted = False
        try:
            process = await anyio.open_process(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=_worker_environment(),
                # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process
                # group) reaches the daemon only, which ends its workers itself.
                start_new_session=True,
            )
            assert process.stdout is not None
            reader = BufferedByteReceiveStream(process.stdout)
            with anyio.fail_after(HELLO_TIMEOUT_S):
                hello = await _receive(reader)
            if not isinstance(hello, dict) or hello.get("magic") != MAGIC:
                return  # another interpreter: its compiled code would not load here
            counted = True
            session.workers_ready += 1
            session.notify()
            await _serve(process, reader, session, inflight)
        except (
            OSError,
            TimeoutError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            pass  # the worker could not start or died: its chunks are scanned elsewhere
        except (ValueError, TypeError, KeyError, EOFError):
            pass  # an answer that does not decode: the same
        finally:
            session.give_back(list(inflight))
            if counted:
                session.workers_ready -= 1
            session.workers_alive -= 1
            session.notify()
            if process is not None:
                with anyio.CancelScope(shield=True):
                    await _stop(process)


async def _serve(
    process: anyio.abc.Process,
    reader: BufferedByteReceiveStream,
    session: Session,
    inflight: deque[int],
) -> None:
    """Keep one worker busy until no chunk is left; return on a reply out of step."""
    assert process.stdin is not None
    raw_keys = {k: bytes(v) for k, v in session.keys.items()}
    while True:
        while len(inflight) < IN_FLIGHT and session.todo:
            index = session.todo.popleft()
            inflight.append(index)
            request = {
                "job": index,
                "paths": [str(p) for p in session.chunks[index]],
                "mode": session.mode.value,
                "keys": raw_keys,
                "compile": session.compile_code,
                "state_root": None if session.state_root is None else str(session.state_root),
            }
            await process.stdin.send(frame(request))
        if not inflight:
            return
        answer = await _receive(reader)
        index = inflight[0]
        if not isinstance(answer, dict) or answer.get("job") != index:
            return  # out of step: everything in flight is given back
        items = [from_wire(tuple(w)) for w in answer["items"]]
        if len(items) != len(session.chunks[index]):
            return
        inflight.popleft()
        session.scanned_by_workers += len(items)
        session.deliver(index, items)


async def _local(session: Session, while_starting: bool) -> None:
    """Scan chunks in this process while no worker is ready (starting, or all gone); with
    `while_starting` False, only once no worker is left."""
    while not session.done():
        waiting = session.workers_ready or (not while_starting and session.workers_alive)
        if waiting or not session.todo:
            await session.changed.wait()
            continue
        index = session.todo.popleft()
        try:
            items = await anyio.to_thread.run_sync(
                scan_here,
                session.chunks[index],
                session.mode,
                session.keys,
                session.compile_code,
                session.state_root,
                abandon_on_cancel=True,
            )
        except BaseException:
            session.give_back([index])
            raise
        session.deliver(index, items)


def scan_here(
    paths: Sequence[Path],
    mode: TrustMode,
    keys: Mapping[str, nacl.signing.VerifyKey],
    compile_code: bool,
    state_root: Path | None = None,
) -> list[Scanned]:

    out = []
    for path in paths:
        try:
            out.append(scan(path, mode, keys, compile_code=compile_code, state_root=state_root))
        except Exception as exc:  # a bug fails that directory, never the scan
            error = PluginLoadError(
                f"scanning failed unexpectedly ({type(exc).__name__})", code="plugin_load_error"
            )
            out.append(Scanned(path=path, error=error))
    return out


async def _receive(reader: BufferedByteReceiveStream) -> Any:
    header = await reader.receive_exactly(_FRAME_HEADER)
    size = int.from_bytes(header, "big")
    if size > _MAX_FRAME:
        raise ValueError("scan worker message too large")
    return unframe(await reader.receive_exactly(size))


async def _stop(process: anyio.abc.Process) -> None:
    """Close the worker's stdin (it exits); kill it, by its PID, if it does not."""
    if process.stdin is not None:
        with contextlib.suppress(Exception):
            await process.stdin.aclose()
    with anyio.move_on_after(STOP_TIMEOUT_S):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with anyio.move_on_after(STOP_TIMEOUT_S):
        await process.wait()


def _worker_environment() -> dict[str, str]:
    """A minimal environment: nothing of the daemon's (tokens, NOTIFY_SOCKET, AISOC_*)."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
