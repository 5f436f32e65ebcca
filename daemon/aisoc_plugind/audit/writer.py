"""Write audit lines and stdout from one thread: batches, one fsync each, the chain, recovery.

Everything that touches the audit file happens here, never on the event loop. Events arrive
in `seq` order on a queue; each wake-up takes what is queued, renders it, appends it with one
`write()` and, as `audit.fsync` says, one `fsync()`; then it reports how far it got (the
`Progress`), which is what lets the daemon answer a change only once its line is on disk.

When a write or fsync fails the writer keeps the events it could not write (bounded) and
retries with backoff; when the file works again it writes `audit.reopened`, then `audit.gap`
(how many events, which `seq`), then the kept events, then new ones. A moved, deleted or
replaced file is noticed once per batch and reopened (or recreated) with `audit.reopened`
first. The writer's own records carry no `seq`: disk order stays `seq` order.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import nacl.signing

from aisoc_plugind.audit import names
from aisoc_plugind.audit.chain import GENESIS, key_id, line_hash, sign_checkpoint
from aisoc_plugind.audit.render import Renderer
from aisoc_plugind.audit.sink import AuditFile, HeadStore, Opened, WriteFailed
from aisoc_plugind.audit.stdout import StdoutSink
from aisoc_plugind.config.settings import FsyncPolicy
from aisoc_plugind.core.clock import rfc3339, utcnow

__all__ = ["AuditWriter", "CheckpointPolicy", "Progress", "Record"]

BACKLOG_LIMIT = 10_000
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0


MAX_BATCH = 4096  # items taken per wake-up (one write and at most one fsync)


@dataclass(slots=True, eq=False)
class Record:
    """One event to write: `audit` lines go to the file (and stdout), others to stdout only."""

    seq: int | None
    event: dict[str, Any]
    level: str = "info"
    audit: bool = True
    durable: bool = True
    stdout: bool = True
    printed: bool = False  # already on stdout (a kept record is printed once)
    refused: bool = False  # emitted while the file was failing: its caller was refused


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the writer got: every event with `seq <= written` is in the file (durable up
    to `durable`); `failure` says why the file cannot be written now, or is None."""

    written: int
    durable: int
    failure: str | None
    recovered: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointPolicy:
    """Sign the chain head every `every_lines` lines or `interval_s` seconds, and at stop."""

    key: nacl.signing.SigningKey
    every_lines: int = 1000
    interval_s: float = 60.0


class _Control(Enum):
    REOPEN = "reopen"
    RETRY = "retry"
    SYNC = "sync"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class _Flush:
    """Set `done` once everything queued before it was handled."""

    done: threading.Event


@dataclass(slots=True)
class _Line:
    """One rendered line on its way to the file, with what it stands for."""

    data: bytes
    record: Record | None = None  # None: the writer's own record (not kept on failure)


@dataclass(slots=True)
class _State:
    """The writer's mutable state (only the writer thread touches it)."""

    head: str = GENESIS
    written: int = 0
    durable: int = 0
    failure: str | None = None
    retry_at: float = 0.0
    retry_s: float = RETRY_FIRST_S
    backlog: deque[Record] = field(default_factory=deque)
    dropped: list[int] = field(default_factory=list)  # first and last seq dropped, count
    pending: list[dict[str, Any]] = field(default_factory=list)  # writer records to write
    since_checkpoint: int = 0
    checkpoint_at: float = 0.0
    was_failing: bool = False


class AuditWriter:
    """The thread that owns the audit file and stdout."""

    def __init__(
        self,
        *,
        file: AuditFile,
        renderer: Renderer,
        fsync: FsyncPolicy,
        stdout: StdoutSink,
        progress: Callable[[Progress], None],
        report: Callable[[Mapping[str, Any]], None],
        head_store: HeadStore | None = None,
        checkpoints: CheckpointPolicy | None = None,
    ) -> None:
        self._file = file
        self._renderer = renderer
        self._fsync = fsync
        self._stdout = stdout
        self._progress = progress
        self._report = report
        self._heads = head_store
        self._checkpoints = checkpoints
        self._queue: queue.SimpleQueue[Record | list[Record] | _Control | _Flush] = (
            queue.SimpleQueue()
        )
        self._state = _State(checkpoint_at=time.monotonic())
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="aisoc-audit-writer", daemon=True)

    # The daemon's side: any thread.

    def start(self) -> None:
        """Open the file (or note why it cannot be) and start writing; return when opened."""
        self._thread.start()
        self._started.wait()

    @property
    def failure(self) -> str | None:
        """Return why the file cannot be written now, or None."""
        return self._state.failure

    def submit(self, record: Record) -> None:
        """Queue one record (in `seq` order); never blocks."""
        self._queue.put(record)

    def submit_many(self, records: list[Record]) -> None:
        """Queue records (in `seq` order) as one item: one wake-up of the writer."""
        self._queue.put(records)

    def reopen(self) -> None:
        """Ask for the file to be reopened (SIGHUP: after logrotate, or to retry now)."""
        self._queue.put(_Control.REOPEN)

    def sync(self) -> None:
        """Ask for an fsync of what is written (a caller waits for durability)."""
        self._queue.put(_Control.SYNC)

    def retry(self) -> None:
        """Ask a failing writer to try the file again now (requests coalesce per batch)."""
        self._queue.put(_Control.RETRY)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far was handled; return False on timeout."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, a final checkpoint, fsync, close; wait for the thread."""
        if self._thread.is_alive():
            self._queue.put(_Control.STOP)
            self._thread.join(timeout)

    # The writer thread.

    def _main(self) -> None:
        try:
            self._open_at_start()
            self._publish()
        finally:
            self._started.set()
        running = True
        while running:
            batch = self._take()
            try:
                running = self._step(batch)
            except Exception as exc:  # a bug here must not end the writer: fail closed
                running = self._crashed(exc, batch)

    def _crashed(self, exc: Exception, batch: list[Record | _Control | _Flush]) -> bool:
        """Treat an unexpected error like a failing file: keep the records, report, go on."""
        self._keep_back(item for item in batch if isinstance(item, Record))
        self._fail(OSError(0, f"audit writer error ({type(exc).__name__})"))
        self._publish()
        for item in batch:
            if isinstance(item, _Flush):
                item.done.set()
        return not any(item is _Control.STOP for item in batch)  # `in` would call Record.__eq__

    def _take(self) -> list[Record | _Control | _Flush]:
        try:
            item = self._queue.get(timeout=self._wait_s())
        except queue.Empty:
            return []
        batch: list[Record | _Control | _Flush] = []
        with contextlib.suppress(queue.Empty):
            while True:
                if isinstance(item, list):
                    batch += item
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                item = self._queue.get_nowait()
        return batch

    def _wait_s(self) -> float | None:
        now, st = time.monotonic(), self._state
        due: list[float] = []
        if st.failure is not None:
            due.append(st.retry_at)
        if self._checkpoints is not None and st.since_checkpoint:
            due.append(st.checkpoint_at + self._checkpoints.interval_s)
        return max(min(due) - now, 0.0) if due else None

    def _step(self, batch: list[Record | _Control | _Flush]) -> bool:
        """Handle one wake-up's items in queue order: controls act where they were queued."""
        # A queued SIGHUP reopens here, before the records queued ahead of it; a failing file
        # is retried when due. A moved file is noticed right before each write (`_write`).
        if self._state.failure is not None:
            # Records that reach a failing writer were refused to their callers: they are
            # kept (and printed on stdout now) before any recovery below, so that the
            # `audit.gap` written on recovery counts them, whatever the batch boundaries.
            self._write([item for item in batch if isinstance(item, Record)], sync=False)
            batch = [item for item in batch if not isinstance(item, Record)]
        reopen = any(item is _Control.REOPEN for item in batch)
        switched = (reopen or self._state.failure is not None) and self._keep_file(
            reopen=reopen, force=False
        )
        records: list[Record] = []
        stopping = False
        for item in batch:
            if isinstance(item, Record):
                records.append(item)
            elif isinstance(item, _Control):
                self._write(records, sync=item is not _Control.REOPEN)
                records = []
                if not (switched and item is _Control.REOPEN):  # reopened a moment ago
                    self._control(item)
                stopping = stopping or item is _Control.STOP
        self._write(records, sync=False)
        if stopping:
            self._keep_file(reopen=False, force=True)  # a last try to write what was kept
            self._write([], sync=True)
        self._maybe_checkpoint(final=stopping)
        if stopping:
            self._close()
        self._publish()
        for item in batch:
            if isinstance(item, _Flush):
                item.done.set()
        return not stopping

    def _control(self, item: _Control) -> None:
        """Act on a reopen (SIGHUP) or a retry request at its place in the queue."""
        st = self._state
        if item is _Control.REOPEN:
            self._keep_file(reopen=True, force=False)
            self._write([], sync=False)  # audit.reopened goes out at once
        elif item is _Control.RETRY and st.failure is not None:
            self._switch("recovered")
            self._write([], sync=True)

    def _keep_file(self, *, reopen: bool, force: bool) -> bool:
        """Recover a failing file when due, or notice that the path moved; return True when
        the file was (re)opened."""
        st = self._state
        if st.failure is not None:
            if reopen or force or time.monotonic() >= st.retry_at:
                self._switch("recovered")
                return True
            return False
        if reopen and self._file.rotating():
            return False  # renamed a moment ago: switch once the rotator's new file is there
        reason = "sighup" if reopen else self._file.moved()
        if reason is not None:
            self._switch(reason)
        return reason is not None

    def _open_at_start(self) -> None:
        stored = self._heads.load() if self._heads is not None else None
        try:
            opened = self._file.open()
        except OSError as exc:
            self._state.head = stored or GENESIS
            self._fail(exc)
            return
        self._state.head = opened.tail_hash or stored or GENESIS
        if opened.fragment is not None:
            self._note_reopened("partial_line", opened, expected=None)
        elif opened.tail_hash is None and stored is not None:
            self._note_reopened("new_file", opened, expected=None)

    def _switch(self, reason: str) -> None:
        """(Re)open the path; the next line written is `audit.reopened` saying why."""
        st = self._state
        try:
            opened = self._file.open()
        except OSError as exc:
            self._fail(exc)
            return
        expected = None
        if opened.tail_hash is not None and opened.tail_hash != st.head:
            expected, st.head = st.head, opened.tail_hash  # the file holds other lines
        if opened.dir_created:
            reason = "directory_missing" if reason in ("file_missing", "recovered") else reason
        self._note_reopened(reason, opened, expected=expected)
        if st.backlog or st.dropped:
            st.pending.append(self._gap_record())

    def _note_reopened(self, reason: str, opened: Opened, *, expected: str | None) -> None:
        doc: dict[str, Any] = {
            "timestamp": _now(),
            "event": names.AUDIT_REOPENED,
            "level": "warning",
            "reason": reason,
            "path": str(self._file.path),
            "created": opened.created,
        }
        if self._state.failure is not None:
            doc["error"] = self._state.failure
        if opened.fragment is not None:
            doc["partial_line_bytes"] = len(opened.fragment)
            doc["partial_line_sha256"] = line_hash(opened.fragment)
        if expected is not None:
            doc["expected_prev"] = expected
        self._state.pending.append(doc)

    def _gap_record(self) -> dict[str, Any]:
        st = self._state
        doc = _gap_doc(len(st.backlog), [r.seq for r in st.backlog if r.seq is not None])
        if st.dropped:
            doc |= {
                "dropped": st.dropped[2],
                "dropped_first_seq": st.dropped[0],
                "dropped_last_seq": st.dropped[1],
            }
        return doc

    def _late_gap_record(self, records: list[Record]) -> dict[str, Any]:
        seqs = [r.seq for r in records if r.refused and r.audit and r.seq is not None]
        return _gap_doc(len(seqs), seqs)

    def _write(self, records: list[Record], *, sync: bool) -> None:
        st = self._state
        if (records or st.pending) and st.failure is None and self._file.is_open:
            # Look again right before writing: stdout flushes and controls earlier in the
            # batch take time, and a tailer such as rsyslog's imfile stops reading a renamed
            # file once it has seen the new one (lines written there later never ship).
            moved = self._file.moved()
            if moved is not None:
                self._switch(moved)
        lines = self._render(records)
        if not self._file.is_open:
            self._keep_back(line.record for line in lines)
        elif lines:
            self._commit(lines, sync=sync)
        elif sync and st.durable < st.written:
            self._sync()
        self._stdout.flush()

    def _render(self, records: list[Record]) -> list[_Line]:
        """Render the writer's pending records, then the batch, chaining each line."""
        st, out = self._state, []
        prev = st.head
        docs: list[tuple[dict[str, Any], Record | None]] = []
        if self._file.is_open:  # healthy, or recovering: what was kept goes first
            docs += [(d, None) for d in st.pending]
            docs += [(self._renderer.shape(r.event), r) for r in st.backlog]
            st.pending, st.dropped = [], []
            st.backlog.clear()
        late_gap = self._file.is_open
        for record in records:
            if record.audit:
                if record.refused and late_gap:
                    # Refused while failing but queued after the file worked again: the
                    # `audit.gap` of the recovery did not count it, so one goes before it.
                    late_gap = False
                    docs.append((self._late_gap_record(records), None))
                docs.append((self._renderer.shape(record.event), record))
            elif record.stdout:
                self._stdout.add(record.level, self._renderer.plain(record.event), record.event)
        for doc, owner in docs:
            data = self._renderer.line(doc, prev)
            prev = line_hash(data)
            out.append(_Line(data=data, record=owner))
            if owner is None:
                self._stdout.add(str(doc.get("level", "info")), data, doc)
            elif owner.stdout and not owner.printed:
                owner.printed = True
                self._stdout.add(owner.level, data, owner.event)
        return out

    def _commit(self, lines: list[_Line], *, sync: bool) -> None:
        st = self._state
        try:
            self._file.write(b"".join(line.data + b"\n" for line in lines))
        except WriteFailed as exc:
            done = _complete_lines(lines, exc.written)
            self._advance(lines[:done])
            self._keep_back(line.record for line in lines[done:])
            self._fail(exc.cause)
            return
        self._advance(lines)
        if st.failure is not None:  # the recovery batch is in: the file works again
            st.failure, st.retry_s = None, RETRY_FIRST_S
        durable = any(line.record is None or line.record.durable for line in lines)
        if (
            sync
            or self._fsync is FsyncPolicy.ALWAYS
            or (durable and self._fsync is FsyncPolicy.MUTATIONS)
        ):
            self._sync()
        elif self._fsync is FsyncPolicy.NEVER:
            st.durable = st.written

    def _advance(self, lines: list[_Line]) -> None:
        if not lines:
            return
        st = self._state
        st.head = line_hash(lines[-1].data)
        seqs = [line.record.seq for line in lines if line.record and line.record.seq]
        st.written = max([st.written, *seqs])
        st.since_checkpoint += len(lines)
        if self._heads is not None:
            self._heads.save(st.head)

    def _sync(self) -> None:
        st = self._state
        try:
            self._file.fsync()
        except OSError as exc:
            self._fail(exc)
            return
        st.durable = st.written

    def _keep_back(self, records: Iterable[Record | None]) -> None:
        """Keep records that were not written, oldest first, dropping the oldest past the cap."""
        st = self._state
        for kept in records:
            if kept is None:
                continue
            st.backlog.append(kept)
            if len(st.backlog) > BACKLOG_LIMIT:
                self._drop(st.backlog.popleft())

    def _drop(self, record: Record) -> None:
        st, seq = self._state, record.seq or 0
        st.dropped = [st.dropped[0], seq, st.dropped[2] + 1] if st.dropped else [seq, seq, 1]

    def _fail(self, exc: OSError) -> None:
        st = self._state
        first = st.failure is None
        st.failure = f"{self._file.path}: {exc.strerror or exc}"
        st.pending = [d for d in st.pending if d["event"] != names.AUDIT_GAP]  # made anew
        self._file.close()
        st.retry_s = RETRY_FIRST_S if first else min(st.retry_s * 2, RETRY_MAX_S)
        st.retry_at = time.monotonic() + st.retry_s
        if first:
            self._report(
                {
                    "timestamp": _now(),
                    "event": names.AUDIT_WRITE_FAILED,
                    "level": "error",
                    "path": str(self._file.path),
                    "error_code": "audit_unavailable",
                    "error": st.failure,
                }
            )

    def _publish(self) -> None:
        st = self._state
        recovered = st.failure is None and st.was_failing
        st.was_failing = st.failure is not None
        self._progress(
            Progress(
                written=st.written, durable=st.durable, failure=st.failure, recovered=recovered
            )
        )

    def _maybe_checkpoint(self, *, final: bool) -> None:
        st, policy = self._state, self._checkpoints
        if policy is None or st.failure is not None or not st.since_checkpoint:
            return
        now = time.monotonic()
        if not (
            final
            or st.since_checkpoint >= policy.every_lines
            or now - st.checkpoint_at >= policy.interval_s
        ):
            return
        verify_key = policy.key.verify_key
        doc = {
            "timestamp": _now(),
            "event": names.AUDIT_CHECKPOINT,
            "level": "info",
            "chain_hash": st.head,
            "lines": st.since_checkpoint,
            "last_seq": st.written,
            "key_id": key_id(verify_key),
            "signature": sign_checkpoint(policy.key, st.head),
        }
        data = self._renderer.line(doc, st.head)
        self._stdout.add("info", data, doc)
        self._commit([_Line(data=data)], sync=final)
        st.since_checkpoint, st.checkpoint_at = 0, now
        self._stdout.flush()

    def _close(self) -> None:
        st = self._state
        if st.failure is None:
            with contextlib.suppress(OSError):
                self._file.fsync()
                st.durable = st.written
        self._file.close()
        if self._heads is not None:
            self._heads.close(sync=True)


def _gap_doc(count: int, seqs: list[int]) -> dict[str, Any]:
    """Return an `audit.gap` record: how many events were not written when they happened,
    and the first and last `seq` among them."""
    return {
        "timestamp": _now(),
        "event": names.AUDIT_GAP,
        "level": "error",
        "count": count,
        "first_seq": min(seqs, default=None),
        "last_seq": max(seqs, default=None),
    }


def _complete_lines(lines: list[_Line], written: int) -> int:
    """Return how many of `lines` lie wholly within the first `written` bytes."""
    done = total = 0
    for line in lines:
        total += len(line.data) + 1
        if total > written:
            break
        done += 1
    return done


def _now() -> str:
    return rfc3339(utcnow())
