"""Property: whatever the interleaving of changes, runs and audit faults, nothing is
acknowledged without its line, and nothing changes without one.

Each example drives a real manager (plugins in host processes) whose audit file is broken
and mended for real: the file is moved away and a directory put at its path (no file can be
opened there), then the directory is removed again. Before each operation the test asks, as
the API's guard does, whether the file is writable. At the end every `seq` an operation
returned for is found in one of the files, and the plugin's state is the one the last
acknowledged change set.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.errors import AuditUnavailable, PluginDError
from aisoc_plugind.service.wiring import make_manager
from tests.conftest import VECTOR_PUB, PluginFactory

OPS = st.lists(
    st.sampled_from(["enable", "disable", "run", "reload", "fault", "mend", "sighup"]),
    min_size=1,
    max_size=25,
)
PLUGIN = "test.a"


class Audit:
    """The audit path, broken and mended for real; remembers every file it moved away."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.moved: list[Path] = []
        self._names = itertools.count()

    def fault(self) -> None:
        """Move the file away and put a directory in its place (the writer may recreate the
        file in between: move that one away too)."""
        while not self.path.is_dir():
            if self.path.exists():
                away = self.path.with_name(f"audit.away.{next(self._names)}")
                self.path.rename(away)
                self.moved.append(away)
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:
                continue

    def mend(self) -> None:
        if self.path.is_dir():
            self.path.rmdir()

    def seqs(self) -> set[int]:
        found: set[int] = set()
        for path in [*self.moved, self.path]:
            if not path.is_file():
                continue
            for line in path.read_bytes().splitlines():
                try:
                    seq = json.loads(line).get("seq")
                except ValueError:
                    continue  # a torn line a fault left
                if isinstance(seq, int):
                    found.add(seq)
        return found


async def _scenario(root: Path, ops: list[str]) -> None:
    plugins, keys = root / "plugins", root / "keys"
    keys.mkdir(parents=True)
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    PluginFactory(plugins).write("a", plugin_id=PLUGIN)
    audit = Audit(root / "log" / "audit.jsonl")

    cfg = Settings(
        plugins_dir=plugins,
        keys_dir=keys,
        audit_path=audit.path,
        state_dir=root / "state",
        trust_mode=TrustMode.STRICT,
        watch=False,
        environment="development",
        run_timeout_s=5.0,
    )
    events = EventLog(LogOptions(path=audit.path, state_dir=cfg.state_dir))
    acknowledged: list[int] = []
    try:
        async with make_manager(cfg, events, load_keyring(keys)) as manager:
            await manager.discover()
            expected = "enabled"
            for op in ops:
                expected = await _step(op, manager, events, audit, acknowledged, expected)
                assert manager.get(PLUGIN).state.value == expected, (op, ops)
    finally:
        events.close()
    missing = sorted(set(acknowledged) - audit.seqs())
    assert missing == [], (missing, ops)


async def _step(
    op: str, manager: Any, events: EventLog, audit: Audit, acknowledged: list[int], expected: str
) -> str:
    if op == "fault":
        audit.fault()
        return expected
    if op == "mend":
        audit.mend()
        return expected
    if op == "sighup":
        events.reopen()
        return expected
    if not await events.writable():  # the API's fail-closed guard
        return expected
    before = events.last_seq
    try:
        if op == "run":
            await manager.run(PLUGIN, {}, {})
        elif op == "reload":
            await manager.reload(PLUGIN)
        else:
            record = await getattr(manager, op)(PLUGIN)
            expected = record.state.value
    except AuditUnavailable:
        return expected
    except PluginDError:  # e.g. running a disabled plugin
        return expected
    if events.last_seq != before:  # a no-op (disabling a disabled plugin) writes nothing
        acknowledged.append(events.last_seq)
    return expected


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_no_acknowledged_change_or_run_is_missing_from_the_audit_files(
    tmp_path_factory: Any, ops: list[str]
) -> None:
    """Random changes, runs, reloads and real faults: every acknowledgment has its line."""
    asyncio.run(_scenario(tmp_path_factory.mktemp("ack"), ops))
