"""The plugins-dir watcher: real files in a temp dir, real inotify, outcomes awaited as events."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from watchfiles import Change

from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.audit.names import WATCHER_ERROR, WATCHER_STARTED
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.watcher import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    ChangeFilter,
    Settler,
    next_backoff,
    plugin_dirs,
    quiet_window_s,
    root_deleted,
    watcher_component,
)
from aisoc_plugind.service.wiring import make_manager
from tests.conftest import SIMPLE_CODE, Env, PluginFactory, sign_dir

WAIT_S = 5


class EventTap(io.TextIOBase):
    """A stdout stand-in for EventLog: parses each JSON line and wakes waiters.

    The audit writer thread writes it, so waiters are woken on their own loop.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._buffer = ""
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                if line.strip():
                    self.events.append(json.loads(line))
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # the test's loop already closed
                loop.call_soon_threadsafe(waiter.set)
        return len(text)

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        """Return the first event (from the start) named `event` with these fields."""
        with anyio.fail_after(WAIT_S):
            while True:
                for found in self.events:
                    if found["event"] == event and all(
                        found.get(k) == v for k, v in fields.items()
                    ):
                        return found
                waiter = asyncio.Event()
                with self._lock:
                    self._waiters.append((asyncio.get_running_loop(), waiter))
                with anyio.move_on_after(0.05):  # and look again, in case of a lost wake-up
                    await waiter.wait()

    def named(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        ]


@dataclass
class Watched:
    """A manager over `env.plugins` with the watcher running, and its event tap."""

    manager: PluginManager
    tap: EventTap
    sync_calls: list[Path]

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        """Wait for an event, then for the change it announces to be applied."""
        found = await self.tap.wait_for(event, **fields)
        await self.manager.settled()
        return found


@asynccontextmanager
async def watching(
    env: Env, trust_mode: TrustMode = TrustMode.STRICT, **overrides: Any
) -> AsyncIterator[Watched]:
    """Start a manager, discover, start the watcher component; close all on exit."""
    settings = env.settings(trust_mode=trust_mode, **{"watch": True, **overrides})
    tap = EventTap()
    events = EventLog(LogOptions(path=env.audit), stream=tap)
    env.logs.append(events)
    async with make_manager(settings, events, load_keyring(settings.keys_dir)) as manager:
        await manager.discover()
        calls: list[Path] = []
        real_sync = manager.sync_dir

        async def recording_sync(path: Path, caller: Any = None) -> None:
            calls.append(path)
            await real_sync(path, caller)

        manager.sync_dir = recording_sync  # type: ignore[method-assign]
        async with watcher_component(None, manager):  # type: ignore[arg-type]
            yield Watched(manager=manager, tap=tap, sync_calls=calls)


async def _served_version(manager: PluginManager, plugin_id: str) -> str:
    return (await manager.run(plugin_id)).result["version"]


# ---- pure parts ------------------------------------------------------------------------------

ROOT = Path("/srv/plugins")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/plugins/a/plugin.py", {ROOT / "a"}),
        ("/srv/plugins/a/plugin.sig", {ROOT / "a"}),
        ("/srv/plugins/a/plugin.yaml", {ROOT / "a"}),
        ("/srv/plugins/a/helpers/lookup.py", {ROOT / "a"}),
        ("/srv/plugins/a", {ROOT / "a"}),
        ("/srv/plugins/a/.plugin.py.swp", set()),
        ("/srv/plugins/a/.plugin.py.swx", set()),
        ("/srv/plugins/a/plugin.py~", set()),
        ("/srv/plugins/a/.#plugin.py", set()),
        ("/srv/plugins/a/#plugin.py#", set()),
        ("/srv/plugins/a/4913", set()),
        ("/srv/plugins/a/__pycache__", set()),
        ("/srv/plugins/a/__pycache__/plugin.cpython-311.pyc", set()),
        ("/srv/plugins/a/helpers/__pycache__/x.cpython-311.pyc", set()),
        ("/srv/plugins/a/plugin.pyc", set()),
        ("/srv/plugins/a/.git/index", set()),
        ("/srv/plugins/a/.git", set()),
        ("/srv/plugins/a/upload.tmp", set()),
        ("/srv/plugins/.git/HEAD", set()),
        ("/srv/plugins/.staging-x1y2/plugin.py", set()),
        ("/srv/plugins", set()),
        ("/srv/plugins-old/a/plugin.py", set()),
        ("/srv/other/a/plugin.py", set()),
    ],
)
def test_plugin_dirs_maps_a_change_to_its_plugin_directory(path: str, expected: set[Path]) -> None:
    """A change maps to `root/<first component>`; editor, temp and VCS files map to nothing."""
    assert plugin_dirs({(Change.modified, path)}, ROOT) == expected


def test_plugin_dirs_groups_an_edit_of_several_files_into_one_directory() -> None:
    """Code, manifest and signature writes of one edit are one directory to sync."""
    changes = {
        (Change.modified, "/srv/plugins/a/plugin.py"),
        (Change.modified, "/srv/plugins/a/plugin.yaml"),
        (Change.added, "/srv/plugins/a/plugin.sig"),
        (Change.deleted, "/srv/plugins/b"),
        (Change.added, "/srv/plugins/a/.plugin.py.swp"),
    }
    assert plugin_dirs(changes, ROOT) == {ROOT / "a", ROOT / "b"}


def test_plugin_dirs_keeps_a_relative_root_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directories come back spelled like `plugins.dir`, so they match the manager's records."""
    monkeypatch.chdir(tmp_path)
    change = (Change.added, str(tmp_path / "plugins" / "a" / "plugin.py"))
    assert plugin_dirs({change}, Path("plugins")) == {Path("plugins") / "a"}


def test_filter_passes_the_root_itself_so_its_removal_is_seen() -> None:
    """The watched directory's own deletion reaches the watcher; top-level hidden names do
    not (temp files inside a plugin directory do: they are a deploy's activity)."""
    keep = ChangeFilter(ROOT)
    assert keep(Change.deleted, "/srv/plugins")
    assert keep(Change.added, "/srv/plugins/a/plugin.py")
    assert keep(Change.added, "/srv/plugins/a/.plugin.py.swp")
    assert not keep(Change.added, "/srv/plugins/.tmp-a/plugin.py")
    assert not keep(Change.added, "/srv/other/a/plugin.py")
    assert root_deleted({(Change.deleted, "/srv/plugins")}, ROOT)
    assert not root_deleted({(Change.deleted, "/srv/plugins/a")}, ROOT)


def test_backoff_doubles_up_to_a_cap() -> None:
    """Retry waits grow 0.5 s, 1 s, 2 s ... and stop growing at the cap."""
    delays = [next_backoff(None)]
    for _ in range(10):
        delays.append(next_backoff(delays[-1]))
    assert delays[:2] == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S]
    assert max(delays) == BACKOFF_MAX_S == delays[-1]


def test_quiet_window_counts_the_step_watchfiles_already_waited() -> None:
    """The extra wait is the debounce minus one watchfiles step, never negative."""
    assert quiet_window_s(50, 10) == pytest.approx(0.04)
    assert quiet_window_s(5, 10) == 0


# ---- the settler (per-directory quiet timer) -------------------------------------------------


async def test_settler_turns_a_burst_of_changes_into_one_sync() -> None:
    """Many changes to one directory before it is quiet give one sync of that directory."""
    synced: list[Path] = []
    done = anyio.Event()

    async def sync(path: Path) -> None:
        synced.append(path)
        done.set()

    async with anyio.create_task_group() as tg:
        settler = Settler(tg, 0.02, sync)
        for _ in range(20):
            settler.poke(Path("/p/a"))
        with anyio.fail_after(WAIT_S):
            await done.wait()
    assert synced == [Path("/p/a")]


async def test_settler_syncs_again_once_after_changes_during_a_sync() -> None:
    """Changes that land while a sync runs cause exactly one more sync, after it."""
    synced: list[int] = []
    first, release, second = anyio.Event(), anyio.Event(), anyio.Event()

    async def sync(path: Path) -> None:
        synced.append(len(synced))
        if len(synced) == 1:
            first.set()
            await release.wait()
        else:
            second.set()

    async with anyio.create_task_group() as tg:
        settler = Settler(tg, 0.01, sync)
        settler.poke(Path("/p/a"))
        with anyio.fail_after(WAIT_S):
            await first.wait()
        for _ in range(5):
            settler.poke(Path("/p/a"))
        release.set()
        with anyio.fail_after(WAIT_S):
            await second.wait()
    assert synced == [0, 1]


async def test_settler_syncs_a_directory_that_never_goes_quiet() -> None:
    """Changes that never stop still lead to a sync, `max_s` after the first one."""
    synced = anyio.Event()

    async def sync(path: Path) -> None:
        synced.set()

    async def keep_changing(settler: Settler) -> None:
        while not synced.is_set():
            settler.poke(Path("/p/busy"))
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        settler = Settler(tg, 0.05, sync, max_s=0.2)
        tg.start_soon(keep_changing, settler)
        with anyio.fail_after(WAIT_S):
            await synced.wait()


# ---- end to end with real files --------------------------------------------------------------


async def test_new_directory_with_a_manifest_is_loaded_without_an_api_call(
    env: Env, plugins: PluginFactory
) -> None:
    """A plugin directory that appears is discovered, verified and enabled by the watcher."""
    async with watching(env) as watched:
        plugins.write("fresh", version="1.0.0")
        enabled = await watched.wait_for("plugin.enabled", plugin_id="test.fresh")
        assert enabled["actor"] == "watcher"
        assert watched.manager.get("test.fresh").signature_status == "verified"
        assert await _served_version(watched.manager, "test.fresh") == "1.0.0"


async def test_an_edit_of_several_files_reloads_only_that_plugin_once(
    env: Env, plugins: PluginFactory
) -> None:
    """Code + manifest + signature writes are one reload of the edited plugin, none of others."""
    plugins.write("a", version="1.0.0")
    plugins.write("b", version="1.0.0")
    async with watching(env) as watched:
        plugins.write("a", version="2.0.0")  # plugin.yaml, plugin.py, then plugin.sig
        await watched.wait_for("plugin.reload.completed", plugin_id="test.a", version="2.0.0")
        plugins.write("a", version="3.0.0")  # a second edit marks the end of the first one
        await watched.wait_for("plugin.reload.completed", plugin_id="test.a", version="3.0.0")
        reloads = watched.tap.named("plugin.reload.completed")
        assert [(e["plugin_id"], e["version"]) for e in reloads] == [
            ("test.a", "2.0.0"),
            ("test.a", "3.0.0"),
        ]
        assert watched.tap.named("plugin.reload.failed") == []
        assert await _served_version(watched.manager, "test.a") == "3.0.0"
        assert await _served_version(watched.manager, "test.b") == "1.0.0"


async def test_half_written_edit_keeps_old_version_then_serves_new_once_consistent(
    env: Env, plugins: PluginFactory
) -> None:
    """New code without its signature fails to reload (old serves on); signing it reloads."""
    path = plugins.write("a", version="1.0.0")
    async with watching(env) as watched:
        (path / "plugin.py").write_text(textwrap.dedent("VERSION = '2.0.0'\n" + SIMPLE_CODE))
        failed = await watched.wait_for("plugin.reload.failed", plugin_id="test.a")
        assert failed["error_code"] == "signature_invalid"
        assert await _served_version(watched.manager, "test.a") == "1.0.0"
        sign_dir(path)
        await watched.wait_for("plugin.reload.completed", plugin_id="test.a")
        record = watched.manager.get("test.a")
        assert (record.state.value, record.error) == ("enabled", None)
        assert await _served_version(watched.manager, "test.a") == "2.0.0"


NOISE = (
    ".plugin.py.swp",
    ".plugin.py.swx",
    "plugin.py~",
    ".#plugin.py",
    "#plugin.py#",
    "4913",
    "__pycache__/plugin.cpython-311.pyc",
    ".git/index",
    "upload.tmp",
)


async def test_editor_and_temp_files_trigger_no_work(env: Env, plugins: PluginFactory) -> None:
    """Swap, backup, lock, probe, bytecode, VCS and temp files never reach the manager."""
    path_a = plugins.write("a", version="1.0.0")
    plugins.write("b", version="1.0.0")
    async with watching(env) as watched:
        for rel in NOISE:
            (path_a / rel).parent.mkdir(exist_ok=True)
            (path_a / rel).write_text("noise")
        plugins.write("b", version="2.0.0")  # a real edit elsewhere, queued after the noise
        await watched.wait_for("plugin.reload.completed", plugin_id="test.b", version="2.0.0")
        plugins.write("a", version="2.0.0")
        await watched.wait_for("plugin.reload.completed", plugin_id="test.a", version="2.0.0")
        reloads_a = watched.tap.named("plugin.reload.completed", plugin_id="test.a")
        assert [e["version"] for e in reloads_a] == ["2.0.0"]
        assert watched.sync_calls.count(path_a) == 1


async def test_deleted_directory_flags_the_plugin_which_keeps_serving(
    env: Env, plugins: PluginFactory
) -> None:
    """Removing a loaded plugin's directory sets `path_missing`; it still runs from memory."""
    path = plugins.write("a", version="1.0.0")
    async with watching(env) as watched:
        shutil.rmtree(path)
        await watched.wait_for("plugin.path.missing", plugin_id="test.a")
        record = watched.manager.get("test.a")
        assert (record.path_missing, record.state.value) == (True, "enabled")
        assert await _served_version(watched.manager, "test.a") == "1.0.0"


async def test_failed_plugin_directory_that_changes_is_retried(
    env: Env, plugins: PluginFactory
) -> None:
    """An unsigned plugin refused in strict mode loads once its signature is written."""
    path = plugins.write("a", version="1.0.0", sign=False)
    async with watching(env) as watched:
        assert watched.manager.get("test.a").state.value == "failed"
        sign_dir(path)
        await watched.wait_for("plugin.enabled", plugin_id="test.a")
        assert watched.manager.get("test.a").state.value == "enabled"
        assert await _served_version(watched.manager, "test.a") == "1.0.0"


async def test_plugins_dir_removed_is_reported_and_watching_resumes(
    env: Env, plugins: PluginFactory
) -> None:
    """Losing `plugins.dir` emits watcher.error; once it is back, new plugins load again."""
    async with watching(env) as watched:
        shutil.rmtree(env.plugins)
        error = await watched.wait_for(WATCHER_ERROR, error_code="plugins_dir_missing")
        assert error["level"] == "error"
        env.plugins.mkdir()
        plugins.write("back", version="1.0.0")
        await watched.wait_for("plugin.enabled", plugin_id="test.back")


async def test_missing_plugins_dir_at_start_does_not_stop_the_daemon(
    env: Env, plugins: PluginFactory
) -> None:
    """A watch that cannot start is retried with backoff until the directory exists."""
    env.plugins.rmdir()
    async with watching(env) as watched:
        await watched.wait_for(WATCHER_ERROR, error_code="plugins_dir_missing")
        env.plugins.mkdir()
        plugins.write("late", version="1.0.0")
        await watched.wait_for("plugin.enabled", plugin_id="test.late")


async def test_watch_false_starts_no_watcher(env: Env, plugins: PluginFactory) -> None:
    """With `plugins.watch = false` nothing watches: no watcher event, no automatic sync."""
    async with watching(env, watch=False) as watched:
        plugins.write("a", version="1.0.0")
        await watched.manager.discover()  # only the explicit call loads it
        assert watched.manager.get("test.a").state.value == "enabled"
        assert watched.tap.named(WATCHER_STARTED) == []
        assert watched.sync_calls == []


async def test_leaving_the_component_stops_the_watch_promptly(env: Env) -> None:
    """Exit does not wait for a change or a watchfiles timeout: the stop event ends the watch."""
    settings = env.settings(watch=True)
    tap = EventTap()
    events = EventLog(LogOptions(path=env.audit), stream=tap)
    env.logs.append(events)
    async with make_manager(settings, events, load_keyring(settings.keys_dir)) as manager:
        with anyio.fail_after(WAIT_S):
            async with watcher_component(None, manager):  # type: ignore[arg-type]
                pass
    events.flush()
    assert [e["event"] for e in tap.events if e["event"].startswith("watcher.")] == [
        WATCHER_STARTED,
        "watcher.stopped",
    ]


async def test_serving_plugin_changed_during_a_watch_outage_is_reloaded(
    env: Env, plugins: PluginFactory
) -> None:
    """Files changed while nothing watched are picked up by the catch-up after the outage."""
    plugins.write("kept", version="1.0.0")
    async with watching(env) as watched:
        assert await _served_version(watched.manager, "test.kept") == "1.0.0"
        moved = env.tmp / "plugins-away"
        env.plugins.rename(moved)  # the watch loses its directory
        await watched.wait_for(WATCHER_ERROR, error_code="plugins_dir_missing")
        PluginFactory(moved).write("kept", version="2.0.0")  # edited during the outage
        moved.rename(env.plugins)
        await watched.wait_for("plugin.reload.completed", plugin_id="test.kept")
        assert await _served_version(watched.manager, "test.kept") == "2.0.0"


async def test_non_utf8_directory_name_does_not_stop_the_daemon(
    env: Env, plugins: PluginFactory
) -> None:
    """A directory whose name is not UTF-8 is a watcher.error; other plugins keep working."""
    plugins.write("good", version="1.0.0")
    async with watching(env) as watched:
        os.mkdir(os.fsencode(env.plugins) + b"/x\xff")
        await watched.wait_for(WATCHER_ERROR)
        assert await _served_version(watched.manager, "test.good") == "1.0.0"
        assert (await watched.manager.discover()).discovered == []
