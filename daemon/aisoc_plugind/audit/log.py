"""Emit the daemon's events and await their lines: the event log in front of the writer.

`emit()` builds one event (timestamp, name, level, `seq`, fields without secrets), hands it
to the writer thread and returns its `seq` at once; it never touches the file. A caller that
acknowledges something (an API answer) first awaits `commit(seq)`, which returns when the
writer has written the line (and fsync'ed it, for changes) or raises AuditUnavailable when
the file cannot be written. Library log records come in through `audit.stdlog` as events of
the same shape, for stdout only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import nacl.signing

from aisoc_plugind.audit.render import Renderer
from aisoc_plugind.audit.sink import AuditFile, HeadStore
from aisoc_plugind.audit.stdout import LEVELS, StdoutSink, journald_stream
from aisoc_plugind.audit.writer import AuditWriter, CheckpointPolicy, Progress, Record
from aisoc_plugind.config.settings import FsyncPolicy, Settings
from aisoc_plugind.core.clock import rfc3339_now
from aisoc_plugind.core.redact import NO_REDACTION, Redactor
from aisoc_plugind.core.signing import load_private_key
from aisoc_plugind.errors import AuditUnavailable, ConfigError, KeyFileError
from aisoc_plugind.files import FileRefused, read_trusted

__all__ = ["SECRET_KEYS", "EventLog", "LogOptions", "log_options"]

# Keys whose values may be secrets; they never reach stdout or the audit file.
SECRET_KEYS = frozenset(
    {"token", "authorization", "payload", "context", "result", "password", "secret", "config"}
)
# High-volume events that are written but not fsync'ed under `audit.fsync = "mutations"`.
_VOLUME_EVENTS = frozenset({"plugin.run.completed", "plugin.run.failed", "log.record"})
_RESERVED = frozenset({"timestamp", "event", "level", "seq"})
# Free-text fields, which can quote exception text: plugin configuration values are taken
# out of them by value (`LogOptions.redactor`).
_TEXT_FIELDS = frozenset({"error", "reason", "message", "detail"})
_DROPPED = SECRET_KEYS | _RESERVED  # never copied from the fields into an event
# How long a change or run waits for a failing writer's retry before it is refused.
RETRY_WAIT_S = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class LogOptions:
    """How events are written: the audit file, its schema and fsync policy, stdout."""

    path: Path
    fsync: FsyncPolicy = FsyncPolicy.MUTATIONS
    schema: str = "native"
    log_format: str = "json"
    log_level: str = "info"
    state_dir: Path | None = None
    signing_key: nacl.signing.SigningKey | None = None
    checkpoint_lines: int = 1000
    checkpoint_interval_s: float = 60.0
    redactor: Redactor = NO_REDACTION  # values never written (every plugin's configuration)


def log_options(settings: Settings) -> LogOptions:
    """Return the log options `settings` ask for; raise ConfigError for an unusable key."""
    return LogOptions(
        path=settings.audit_path,
        fsync=settings.audit_fsync,
        schema=settings.audit_schema,
        log_format=settings.log_format,
        log_level=settings.log_level,
        state_dir=settings.state_dir,
        signing_key=_signing_key(settings.audit_signing_key),
        checkpoint_lines=settings.audit_checkpoint_lines,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
        redactor=Redactor.of_configs(settings.plugin_config),
    )


def _signing_key(path: Path | None) -> nacl.signing.SigningKey | None:
    if path is None:
        return None
    try:
        # A key others could replace would sign checkpoints over a chain they rewrote.
        return load_private_key(read_trusted(path, cap=16 * 1024, links_within=path.parent))
    except FileRefused as exc:
        raise ConfigError(
            f"audit.signing_key {path} {exc.detail}: it may not be trusted (keep it 0600 or "
            "0640, owned by root or the daemon's user)",
            code="audit_signing_key_insecure" if exc.reason in _UNSAFE else "config_invalid",
        ) from exc
    except (OSError, KeyFileError) as exc:
        detail = exc.message if isinstance(exc, KeyFileError) else str(exc)
        raise ConfigError(
            f"audit.signing_key {path} cannot be used: {detail} (make one with "
            "`aisoc-plugind audit keygen --out DIR`)"
        ) from exc


_UNSAFE = frozenset({"unsafe_mode", "unsafe_owner", "symlink"})


Listener = Callable[[Mapping[str, Any]], None]


class EventLog:
    """Number events, queue them for the writer, and tell callers when lines are written."""

    def __init__(
        self, options: LogOptions, *, stream: TextIO | None = None, stderr: TextIO | None = None
    ) -> None:
        self.options = options
        self.path = options.path
        out = stream if stream is not None else sys.stdout
        self._stderr = stderr if stderr is not None else sys.stderr
        self._min_level = LEVELS.get(options.log_level, 20)
        self._redact = options.redactor if options.redactor else None
        self._lock = threading.Lock()
        self._seq = 0
        self._listeners: list[tuple[frozenset[str] | None, Listener]] = []
        self._recovered: list[Callable[[], Awaitable[None]]] = []
        self._progress = Progress(written=0, durable=0, failure=None)
        self._waiters: list[tuple[int, int, bool, asyncio.Future[None]]] = []
        self._reports: list[asyncio.Future[None]] = []  # woken by the writer's next report
        self._order = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # Records emitted on the loop go to the writer once per loop iteration, as one batch:
        # a wake-up of the writer thread per event would make it fight the loop for the GIL.
        self._batch: list[Record] = []
        heads = (
            HeadStore(options.state_dir / ".daemon" / "audit.head")
            if options.state_dir is not None
            else None
        )
        checkpoints = (
            CheckpointPolicy(
                key=options.signing_key,
                every_lines=options.checkpoint_lines,
                interval_s=options.checkpoint_interval_s,
            )
            if options.signing_key is not None
            else None
        )
        self._writer = AuditWriter(
            file=AuditFile(options.path),
            renderer=Renderer(options.schema),
            fsync=options.fsync,
            progress=self._on_progress,
            report=self._report,
            stdout=StdoutSink(
                out, console=options.log_format == "console", journald=journald_stream(out)
            ),
            head_store=heads,
            checkpoints=checkpoints,
        )
        self._started = False

    # Lifecycle.

    def start(self) -> None:
        """Start the writer (it opens the file, or notes why it cannot); bind the running loop."""
        self.bind_loop()
        if not self._started:
            self._started = True
            self._writer.start()

    def bind_loop(self) -> None:
        """Resolve `commit()` waiters on the running event loop (call from inside it)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._loop_thread = threading.get_ident() if self._loop is not None else None

    def close(self) -> None:
        """Write everything queued, a final checkpoint, fsync and close (blocks)."""
        self._hand_over()
        if self._started:
            self._writer.stop()

    async def aclose(self) -> None:
        """Close from the event loop without blocking it."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything emitted so far was handled by the writer (tests, shutdown)."""
        self._hand_over()
        if self._started:
            self._writer.flush(timeout)

    # Events.

    @property
    def failure(self) -> str | None:
        """Return why the audit file cannot be written now, or None when it can."""
        return self._progress.failure

    @property
    def last_seq(self) -> int:
        """Return the `seq` of the last event emitted."""
        return self._seq

    def subscribe(self, listener: Listener, events: Collection[str] | None = None) -> None:
        """Call `listener` with every event (or those named in `events`) as emitted, for
        metrics; it must not raise."""
        self._listeners.append((frozenset(events) if events is not None else None, listener))

    def on_recovered(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` on the loop each time the audit file works again after failing."""
        self._recovered.append(callback)

    def reopen(self) -> None:
        """Ask the writer to reopen the file now (SIGHUP); never blocks, never raises."""
        self._hand_over()  # queue order = call order: records emitted before go first
        self._writer.reopen()

    async def writable(self) -> bool:
        """Return True when the audit file can be written; while it fails, ask the writer to
        try again and wait a moment for its answer (so a fixed disk heals at once)."""
        if self._progress.failure is None:
            return True
        if self._loop is None:
            self.bind_loop()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reports.append(future)
        self._hand_over()
        self._writer.retry()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETRY_WAIT_S):
                await asyncio.shield(future)
        return self._progress.failure is None

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> int:
        """Queue one event for the audit file and stdout; return its `seq`."""
        return self._emit(event, level, True, fields)

    def emit_log(self, event: str, *, level: str = "info", **fields: Any) -> None:
        """Queue one event for stdout only (library log records): no `seq`, not chained."""
        self._emit(event, level, False, fields)

    def _copy(self, fields: Mapping[str, Any], doc: dict[str, Any]) -> None:
        """Copy an event's fields into its document: no secret keys, no None, free text
        redacted."""
        redact = self._redact
        for key, value in fields.items():
            if value is not None and key not in _DROPPED:
                if redact is not None and key in _TEXT_FIELDS and isinstance(value, str):
                    value = redact(value)
                doc[key] = value

    def _emit(self, event: str, level: str, audit: bool, fields: Mapping[str, Any]) -> int:
        if not self._started:
            self.start()
        doc: dict[str, Any] = {"timestamp": rfc3339_now(), "event": event, "level": level}
        with self._lock:
            seq = 0
            refused = self._progress.failure is not None
            if audit:
                self._seq = seq = self._seq + 1
                doc["seq"] = seq
            self._copy(fields, doc)
            record = Record(
                seq=seq or None,
                event=doc,
                level=level,
                audit=audit,
                durable=event not in _VOLUME_EVENTS,
                stdout=LEVELS.get(level, 20) >= self._min_level,
                refused=refused,
            )
            loop = self._loop
            if (
                loop is not None
                and not refused  # failing: kept by the writer at once
                and self._loop_thread == threading.get_ident()
                and loop.is_running()
            ):
                self._batch.append(record)
                if len(self._batch) == 1:
                    loop.call_soon(self._hand_over)
            else:  # another thread, or no loop: what the loop batched goes first
                if self._batch:
                    self._writer.submit_many(self._batch)
                    self._batch = []
                self._writer.submit(record)
        for wanted, listener in self._listeners:
            if wanted is None or event in wanted:
                listener(doc)
        return seq

    def _hand_over(self) -> None:
        """Pass the records batched on the loop to the writer, in one queue item."""
        with self._lock:
            if self._batch:
                self._writer.submit_many(self._batch)
                self._batch = []

    async def commit(self, seq: int | None = None, *, durable: bool = True) -> None:
        """Return once the line of event `seq` (default: the last one) is written, and
        fsync'ed when `durable` (as `audit.fsync` allows); raise AuditUnavailable else."""
        target = self._seq if seq is None else seq
        progress = self._progress
        if self._reached(progress, target, durable):
            return
        if progress.failure is not None:
            raise _unavailable(progress.failure)
        if self._loop is None:
            self.bind_loop()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._order += 1
        heapq.heappush(self._waiters, (target, self._order, durable, future))
        if durable and progress.written >= target:
            self._hand_over()
            self._writer.sync()
        await future

    def _reached(self, progress: Progress, seq: int, durable: bool) -> bool:
        mark = (
            progress.durable
            if durable and self.options.fsync is not FsyncPolicy.NEVER
            else progress.written
        )
        return seq <= mark

    # The writer's side (its thread).

    def _on_progress(self, progress: Progress) -> None:
        self._progress = progress
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._waiters or self._reports:
            loop.call_soon_threadsafe(self._resolve)
        if progress.recovered:
            for callback in self._recovered:
                asyncio.run_coroutine_threadsafe(_guarded(callback), loop)

    def _resolve(self) -> None:
        reports, self._reports = self._reports, []
        for report in reports:
            if not report.done():
                report.set_result(None)
        progress, waiters = self._progress, self._waiters
        while waiters:
            seq, _, durable, future = waiters[0]
            if self._reached(progress, seq, durable):
                heapq.heappop(waiters)
                if not future.done():
                    future.set_result(None)
            elif progress.failure is not None:
                heapq.heappop(waiters)
                if not future.done():
                    future.set_exception(_unavailable(progress.failure))
            elif durable and progress.written >= seq:
                self._writer.sync()
                return
            else:
                return

    def _report(self, record: Mapping[str, Any]) -> None:
        """Say on stderr, once per failure, that the audit file cannot be written."""
        with contextlib.suppress(OSError, ValueError):
            print(json.dumps(record, separators=(",", ":")), file=self._stderr, flush=True)


def _unavailable(failure: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"the audit log cannot be written ({failure}); changes and runs are refused until it can"
    )


async def _guarded(callback: Callable[[], Awaitable[None]]) -> None:
    # A recovery hook must never take anything down; it reports its own failures.
    with contextlib.suppress(Exception):
        await callback()
