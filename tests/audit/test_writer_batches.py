"""The writer's gap guarantee whatever the batch boundaries: every event refused while the file
failed is written after an `audit.gap` that counts it.

The writer thread is not started here: each test hands `_step` the exact batches a busy
machine can produce (records of a failing file arriving in the same wake-up as the recovery,
or after it), which a threaded test only hits by chance. Real files in a tmp dir.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.render import Renderer
from aisoc_plugind.audit.sink import AuditFile
from aisoc_plugind.audit.stdout import StdoutSink
from aisoc_plugind.audit.writer import AuditWriter, Progress, Record, _Control, _Flush
from aisoc_plugind.config.settings import FsyncPolicy


class Bench:
    """One writer on a path that starts as a directory (so the file cannot be opened)."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "audit" / "audit.jsonl"
        self.path.mkdir(parents=True)
        self.out = io.StringIO()
        self.progress: list[Progress] = []
        self.writer = AuditWriter(
            file=AuditFile(self.path),
            renderer=Renderer("native"),
            fsync=FsyncPolicy.MUTATIONS,
            stdout=StdoutSink(self.out),
            progress=self.progress.append,
            report=lambda _record: None,
        )
        self.writer._open_at_start()
        assert self.writer.failure is not None
        self.seq = 0

    def record(self, *, refused: bool) -> Record:
        self.seq += 1
        event = {"timestamp": "t", "event": "plugin.disabled", "level": "info", "seq": self.seq}
        return Record(seq=self.seq, event=event, refused=refused)

    def fix_path(self) -> None:
        self.path.rmdir()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = Bench(tmp_path)
    yield made
    made.writer._file.close()


def _assert_every_refused_event_follows_a_gap(lines: list[dict[str, Any]], refused: set[int]):
    covered: set[int] = set()
    for line in lines:
        if line["event"] == "audit.gap":
            covered |= set(range(line["first_seq"], line["last_seq"] + 1))
        elif line.get("seq") in refused:
            assert line["seq"] in covered, (line, lines)
    assert {line.get("seq") for line in lines} >= refused  # none lost


def test_records_reaching_a_failing_writer_with_the_reopen_are_counted(bench: Bench) -> None:
    """The batch that recovers the file also holds records refused while it failed."""
    first, second = bench.record(refused=True), bench.record(refused=True)
    bench.fix_path()
    bench.writer._step([first, second, _Control.REOPEN])
    lines = bench.lines()
    assert [e["event"] for e in lines] == [
        "audit.reopened",
        "audit.gap",
        "plugin.disabled",
        "plugin.disabled",
    ]
    assert (lines[1]["count"], lines[1]["first_seq"], lines[1]["last_seq"]) == (2, 1, 2)


def test_records_in_the_batch_where_the_retry_falls_due_are_counted(bench: Bench) -> None:
    """No control in the batch: the writer's own retry timer recovers the file."""
    bench.writer._state.retry_at = 0.0  # due now
    bench.fix_path()
    first = bench.record(refused=True)
    bench.writer._step([first])
    lines = bench.lines()
    assert [e["event"] for e in lines] == ["audit.reopened", "audit.gap", "plugin.disabled"]
    _assert_every_refused_event_follows_a_gap(lines, {1})


def test_a_refused_record_queued_after_the_recovery_gets_its_own_gap(bench: Bench) -> None:
    """Refused by the daemon just before it learnt the file works again: a late gap."""
    kept = bench.record(refused=True)
    bench.writer._step([kept])  # still failing: kept
    bench.fix_path()
    bench.writer._step([_Control.RETRY])  # recovered, the kept one written after its gap
    late, fine = bench.record(refused=True), bench.record(refused=False)
    bench.writer._step([late, fine])
    lines = bench.lines()
    assert [e["event"] for e in lines] == [
        "audit.reopened",
        "audit.gap",
        "plugin.disabled",
        "audit.gap",
        "plugin.disabled",
        "plugin.disabled",
    ]
    assert (lines[3]["count"], lines[3]["first_seq"], lines[3]["last_seq"]) == (1, 2, 2)
    _assert_every_refused_event_follows_a_gap(lines, {1, 2})


def test_kept_records_are_printed_on_stdout_at_once_and_only_once(bench: Bench) -> None:
    """stdout (journald) sees a refused event when it happens, not again on recovery."""
    first = bench.record(refused=True)
    bench.writer._step([first])
    assert bench.out.getvalue().count('"seq":1') == 1
    bench.fix_path()
    bench.writer._step([_Control.RETRY])
    assert bench.out.getvalue().count('"seq":1') == 1
    assert '"audit.gap"' in bench.out.getvalue()


@pytest.mark.parametrize("split", range(1, 6))
def test_any_batch_split_around_a_recovery_keeps_the_guarantee(bench: Bench, split: int) -> None:
    """Five refused records, the path fixed, a retry: cut into two wake-ups at every point."""
    records = [bench.record(refused=True) for _ in range(5)]
    bench.fix_path()
    done = threading.Event()
    items: list[Record | _Control | _Flush] = [*records[:split], _Control.RETRY]
    bench.writer._step(items)
    bench.writer._step([*records[split:], _Flush(done)])
    assert done.is_set()
    _assert_every_refused_event_follows_a_gap(bench.lines(), {r.seq or 0 for r in records})
