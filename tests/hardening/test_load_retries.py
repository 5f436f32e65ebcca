"""Loads that fail for want of a descriptor, memory or a process are tried again, alone.

The classification is a table; the scheduler runs with a fake `sync`; and a real manager
whose bundle reader meets EMFILE once (a fault the test process cannot cause for itself
without starving pytest) shows the whole path: `plugin.load.failed`, `plugin.load.retrying`,
then the plugin serving. `tests/hardening/test_connections.py` does it for real, with a
daemon whose descriptors are exhausted.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.names import PLUGIN_LOAD_FAILED, PLUGIN_LOAD_RETRYING
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine import bundle
from aisoc_plugind.engine import retries as retries_module
from aisoc_plugind.engine.emitter import EngineEvents
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.engine.retries import ATTEMPTS, LoadRetries, retry_delay, transient
from aisoc_plugind.errors import BundleError, PluginDError, PluginLoadError
from tests.conftest import Env, ManagerFactory, PluginFactory

WAIT_S = 10.0


def _caused(error: PluginDError, cause: BaseException) -> PluginDError:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_caused(BundleError("x", code="bundle_unreadable"), OSError(errno.EMFILE, "m")), True),
        (_caused(BundleError("x", code="bundle_unreadable"), OSError(errno.ENFILE, "m")), True),
        (_caused(BundleError("x", code="bundle_unreadable"), OSError(errno.EACCES, "m")), False),
        (_caused(PluginLoadError("x", code="host_start_failed"), MemoryError()), True),
        (
            _caused(
                PluginLoadError("x", code="host_start_failed"),
                _caused(PluginLoadError("y", code="sandbox_failed"), OSError(errno.EAGAIN, "")),
            ),
            True,
        ),
        (
            PluginLoadError("the zygote could not fork: [Errno 11] x", code="host_start_failed"),
            True,
        ),
        (PluginLoadError("[Errno 13] Permission denied", code="host_start_failed"), False),
        (
            BundleError(f"a: cannot open: {os.strerror(errno.EMFILE)}", code="bundle_unreadable"),
            True,
        ),
        (
            PluginLoadError("loading failed unexpectedly (MemoryError)", code="plugin_load_error"),
            True,
        ),
        (
            PluginLoadError("loading failed unexpectedly (KeyError)", code="plugin_load_error"),
            False,
        ),
        # A plugin's own import that raises MemoryError is the plugin's fault.
        (_caused(PluginLoadError("x", code="plugin_import_failed"), MemoryError()), False),
        (BundleError("Too many open files", code="bundle_symlink"), False),
    ],
)
def test_only_the_daemons_own_lack_of_resources_is_transient(
    error: PluginDError, expected: bool
) -> None:
    """EMFILE, ENFILE, ENOMEM, EAGAIN and MemoryError in the daemon's own work are worth
    another try; anything else, and anything a plugin raised, is not."""
    assert transient(error) is expected


def test_retry_delays_double_up_to_a_cap() -> None:
    """0.5 s, 1 s, 2 s ... and never more than 30 s."""
    assert [retry_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert retry_delay(ATTEMPTS) == 30.0 == retry_delay(50)


class Recorder:
    """An EventLog stand-in: records emits."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> int:
        self.events.append({"event": event, "level": level, **fields})
        return len(self.events)


def _transient() -> PluginDError:
    return _caused(BundleError("no fd", code="bundle_unreadable"), OSError(errno.EMFILE, "m"))


async def test_a_transient_failure_is_retried_until_it_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each transient failure schedules one more try (with its event); success ends it."""
    log = Recorder()
    calls: list[Path] = []
    done = asyncio.Event()
    retries: LoadRetries

    async def sync(path: Path, caller: Caller) -> None:
        calls.append(path)
        if len(calls) < 2:
            retries.note(path, _transient(), "p.id")
        else:
            retries.note(path, None)
            done.set()

    monkeypatch.setattr(retries_module, "FIRST_S", 0.01)
    retries = LoadRetries(EngineEvents(log), sync, attempts=5)  # type: ignore[arg-type]
    retries.note(Path("/p/a"), _transient(), "p.id")
    retries.note(Path("/p/a"), _transient(), "p.id")  # already scheduled: counted only
    await asyncio.wait_for(done.wait(), WAIT_S)
    assert calls == [Path("/p/a"), Path("/p/a")]
    announced = [e for e in log.events if e["event"] == PLUGIN_LOAD_RETRYING]
    assert [e["attempt"] for e in announced] == [1, 3]
    assert announced[0]["error_code"] == "bundle_unreadable"
    assert not retries.pending(Path("/p/a"))
    await retries.aclose()


async def test_attempts_are_bounded_and_other_failures_end_the_series() -> None:
    """After the last attempt nothing more is scheduled; a real failure resets the count."""
    log = Recorder()

    async def sync(path: Path, caller: Caller) -> None:
        raise AssertionError("not reached")

    retries = LoadRetries(EngineEvents(log), sync, attempts=2)  # type: ignore[arg-type]
    path = Path("/p/b")
    retries.note(path, _transient())
    assert retries.pending(path)
    await retries.aclose()  # cancels the scheduled try
    assert not retries.pending(path)
    retries.note(path, _transient())  # attempt 2
    await retries.aclose()
    retries.note(path, _transient())  # attempt 3 > 2: given up, nothing scheduled
    assert not retries.pending(path)
    retries.note(path, BundleError("bad", code="bundle_symlink"))
    retries.note(path, _transient())  # a new series: attempt 1 again
    assert [e["attempt"] for e in log.events] == [1, 2, 1]
    await retries.aclose()


async def test_a_load_that_meets_emfile_is_retried_and_serves(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager records the failure, announces the retry and loads the plugin once the
    reader finds descriptors again (here: the second time it opens the directory)."""
    monkeypatch.setattr(retries_module, "FIRST_S", 0.05)
    manager = await make_manager(TrustMode.STRICT, isolation_mode="none")
    path = plugins.write("late", plugin_id="retry.late")
    real_open = bundle._open_root
    failures = iter([OSError(errno.EMFILE, "Too many open files")])

    def open_root(where: Path) -> int:
        exc = next(failures, None)
        if exc is not None and where == path:
            raise BundleError(f"{where}: cannot open directory", code="bundle_unreadable") from exc
        return real_open(where)

    monkeypatch.setattr(bundle, "_open_root", open_root)
    await manager.sync_dir(path)
    for _ in range(200):
        if _known(manager) and manager.get("retry.late").state.value == "enabled":
            break
        await asyncio.sleep(0.02)
    assert manager.get("retry.late").state.value == "enabled"
    names = [e["event"] for e in env.audit_events()]
    assert names.index(PLUGIN_LOAD_FAILED) < names.index(PLUGIN_LOAD_RETRYING)


def _known(manager: Any) -> bool:
    try:
        manager.get("retry.late")
    except PluginDError:
        return False
    return True
