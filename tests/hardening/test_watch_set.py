"""What the watcher watches and how it reads a batch, and the watcher itself in this process.

The pure parts are tables (temporary names, how a batch sorts into plugin directories); the
walk runs over real trees with links out, hidden and temporary directories and names that
are not UTF-8; the watcher runs with a real manager and real inotify, and shows a deploy's
activity holding back a sync, a new directory joining the watch, and the walk failing for
want of descriptors without ending the watch.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO, cast

import anyio
import pytest
from watchfiles import Change

from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.audit.names import WATCHER_ERROR, WATCHER_STARTED
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.service import watcher as watcher_module
from aisoc_plugind.service import watchset
from aisoc_plugind.service.watcher import QUICK_RESTARTS, Settler, watcher_component
from aisoc_plugind.service.watchset import (
    MAX_DEPTH,
    Sorted,
    sort_changes,
    temp_name,
    watch_set,
)
from aisoc_plugind.service.wiring import make_manager
from tests.conftest import Env, PluginFactory
from tests.service.test_watcher import EventTap, Watched

WAIT_S = 10.0
ROOT = Path("/srv/plugins")


@pytest.mark.parametrize(
    "name",
    [
        ".plugin.py.Xy12Ab",  # rsync
        ".ansible_tmpab12plugin.py",  # ansible
        ".plugin.py.swp",
        "plugin.py~",
        "#plugin.py#",
        "4913",
        "__pycache__",
        "plugin.cpython-311.pyc",
        "upload.tmp",
        "data.part",
        "plugin.yaml.dpkg-new",
        "plugin.yaml.rpmnew",
        "sedAb12Cd",  # sed -i
        "tmpab12cd34",  # Python's tempfile
        ".git",
        ".staging-abc",
    ],
)
def test_temporary_names(name: str) -> None:
    """Hidden, backup, swap, probe, bytecode and atomic writers' names are temporary."""
    assert temp_name(name)


@pytest.mark.parametrize(
    "name", ["plugin.py", "plugin.yaml", "plugin.sig", "helpers", "tmpl_helpers", "sedan.py"]
)
def test_ordinary_names(name: str) -> None:
    """Plugin files and directories, including ones that merely start like a temp name."""
    assert not temp_name(name)


def test_a_batch_sorts_into_changed_and_busy_plugin_directories() -> None:
    """Content changes ask for a sync; temp names inside a plugin directory are activity;
    top-level hidden names and paths elsewhere are nothing; additions and removals are
    remembered for the walk."""
    found = sort_changes(
        {
            (Change.modified, "/srv/plugins/a/plugin.py"),
            (Change.added, "/srv/plugins/a/helpers"),
            (Change.added, "/srv/plugins/b/.plugin.sig.Xy12Ab"),
            (Change.modified, "/srv/plugins/c/.plugin.py.swp"),
            (Change.modified, "/srv/plugins/c/plugin.py"),
            (Change.added, "/srv/plugins/.tmp-d/plugin.py"),
            (Change.deleted, "/srv/elsewhere/e/plugin.py"),
        },
        ROOT,
    )
    assert found.changed == {ROOT / "a", ROOT / "c"}
    assert found.active == {ROOT / "b"}
    assert found.moved == {"/srv/plugins/a/helpers"}


def test_a_batch_regrows_the_tree_only_for_directories(tmp_path: Path) -> None:
    """A new real directory, or a watched one gone, changes the set; files and links do not."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    watched = [str(tmp_path), str(tmp_path / "old")]
    assert Sorted(moved={str(tmp_path / "dir")}).regrows(watched)
    assert Sorted(moved={str(tmp_path / "old")}).regrows(watched)
    assert not Sorted(moved={str(tmp_path / "file"), str(tmp_path / "link")}).regrows(watched)
    assert not Sorted(moved={str(tmp_path / "missing")}).regrows(watched)


def test_the_walk_follows_no_link_and_skips_hidden_and_temporary_directories(
    tmp_path: Path,
) -> None:
    """Only real directories are watched: not links (to /usr, to /), hidden or temporary
    ones, and not a name that is not UTF-8 (reported instead)."""
    (tmp_path / "a" / "helpers").mkdir(parents=True)
    (tmp_path / "a" / "__pycache__").mkdir()
    (tmp_path / "a" / "usr").symlink_to("/usr")
    (tmp_path / "root").symlink_to("/")
    (tmp_path / ".staging-x" / "deep").mkdir(parents=True)
    (tmp_path / "b.tmp").mkdir()
    os.mkdir(os.fsencode(tmp_path) + b"/odd\xff")
    found = watch_set(tmp_path)
    base = str(tmp_path)
    assert found.dirs == (base, f"{base}/a", f"{base}/a/helpers")
    assert [Path(p).name for p in found.unnamable] == [os.fsdecode(b"odd\xff")]
    assert not found.truncated
    assert found.plugin_dirs_of([f"{base}/a/helpers", base], tmp_path) == {tmp_path / "a"}


def test_the_walk_stops_at_its_limits(tmp_path: Path) -> None:
    """Past the directory limit the set is cut (and says so); past the depth limit deeper
    directories are not watched."""
    for n in range(10):
        (tmp_path / f"p{n}").mkdir()
    cut = watch_set(tmp_path, limit=4)
    assert (len(cut.dirs), cut.truncated) == (4, True)
    deep = tmp_path / "p0"
    for n in range(MAX_DEPTH + 3):
        deep = deep / f"d{n}"
    deep.mkdir(parents=True)
    depths = {len(Path(p).relative_to(tmp_path).parts) for p in watch_set(tmp_path).dirs}
    assert max(depths) == MAX_DEPTH


def test_the_walk_raises_when_the_daemon_lacks_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk cut short by EMFILE would drop working watches: it raises instead; other
    errors (a directory that vanished) only leave that directory out."""

    def scandir(path: str) -> Any:
        raise OSError(errno.EMFILE, "Too many open files", path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError, match="Too many open files"):
        watch_set(tmp_path)

    def vanished(path: str) -> Any:
        raise FileNotFoundError(errno.ENOENT, "gone", path)

    monkeypatch.setattr(os, "scandir", vanished)
    assert watch_set(tmp_path).dirs == (str(tmp_path),)


async def test_activity_holds_back_a_sync_but_never_asks_for_one() -> None:
    """A touch while a sync is pending restarts its quiet time; a touch alone, or one during
    the sync, causes nothing."""
    synced: list[float] = []
    started = anyio.current_time()

    async def sync(path: Path) -> None:
        synced.append(anyio.current_time() - started)

    async with anyio.create_task_group() as tg:
        settler = Settler(tg, 0.1, sync, max_s=5)
        settler.touch(Path("/p/a"))  # nothing pending: nothing happens
        settler.poke(Path("/p/b"))
        for _ in range(5):
            await anyio.sleep(0.05)
            settler.touch(Path("/p/b"))
        with anyio.fail_after(WAIT_S):
            while not synced:
                await anyio.sleep(0.01)
    assert len(synced) == 1 and synced[0] >= 0.3


# ---- the watcher, in this process -------------------------------------------------------------


@asynccontextmanager
async def watching(env: Env, **overrides: Any) -> AsyncIterator[Watched]:
    settings = env.settings(
        trust_mode=TrustMode.STRICT, watch=True, isolation_mode="none", **overrides
    )
    tap = EventTap()
    events = EventLog(LogOptions(path=env.audit), stream=cast(TextIO, tap))
    env.logs.append(events)
    async with make_manager(settings, events, load_keyring(settings.keys_dir)) as manager:
        await manager.discover()
        async with watcher_component(None, manager):  # type: ignore[arg-type]
            yield Watched(manager=manager, tap=tap, sync_calls=[])


async def test_a_new_directory_joins_the_watch_and_its_subdirectories_too(
    env: Env, plugins: PluginFactory
) -> None:
    """A plugin moved in with a helper package loads; an edit inside the helper package
    (a directory that did not exist when the watch started) reloads it."""
    code = "from .helpers.v import V\nclass Plugin:\n    def run(self, p, c):\n"
    code += "        return {'version': V}\n"
    stage = PluginFactory(env.tmp / "stage")
    async with watching(env) as watched:
        built = stage.write("moved", plugin_id="ws.moved", code=code, files=_helpers("1"))
        built.rename(env.plugins / "moved")
        await watched.wait_for("plugin.enabled", plugin_id="ws.moved")
        again = PluginFactory(env.tmp / "stage2").write(
            "moved", plugin_id="ws.moved", code=code, files=_helpers("2")
        )
        shutil.copy(again / "helpers" / "v.py", env.plugins / "moved" / "helpers" / "v.py")
        shutil.copy(again / "plugin.sig", env.plugins / "moved" / "plugin.sig")
        await watched.wait_for("plugin.reload.completed", plugin_id="ws.moved")
        assert (await watched.manager.run("ws.moved")).result == {"version": "2"}
        assert watched.tap.named(WATCHER_ERROR) == []
        assert len(watched.tap.named(WATCHER_STARTED)) == 1  # restarts are not announced


def _helpers(version: str) -> dict[str, str]:
    return {"helpers/__init__.py": "", "helpers/v.py": f"V = {version!r}\n"}


async def test_left_out_directories_are_reported_once(
    env: Env, plugins: PluginFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that is not UTF-8 and a tree past the limit are each said once (warning)."""
    monkeypatch.setattr(watchset, "MAX_WATCHED_DIRS", 3)
    monkeypatch.setattr(watcher_module, "watch_set", lambda root: watch_set(root, limit=3))
    for name in ("a", "b", "c"):
        plugins.write(name, plugin_id=f"ws.{name}")
    os.mkdir(os.fsencode(env.plugins) + b"/odd\xff")
    async with watching(env) as watched:
        plugins.write("d", plugin_id="ws.d")
        await watched.wait_for("plugin.enabled", plugin_id="ws.d")
        codes = sorted(e["error_code"] for e in watched.tap.named(WATCHER_ERROR))
        assert codes == ["watch_limit", "watch_path_invalid"]
        assert {e["level"] for e in watched.tap.named(WATCHER_ERROR)} == {"warning"}


async def test_a_walk_without_descriptors_ends_the_session_not_the_watch(
    env: Env, plugins: PluginFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When walking fails for want of descriptors the failure is reported and the watch
    recovers after its backoff: a plugin added then is loaded."""
    real = watchset.watch_set
    failures = iter([OSError(errno.EMFILE, "Too many open files")])

    def flaky(root: Path) -> Any:
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return real(root)

    monkeypatch.setattr(watcher_module, "watch_set", flaky)
    async with watching(env) as watched:
        error = await watched.wait_for(WATCHER_ERROR, error_code="watch_failed")
        assert "Too many open files" in error["error"]
        plugins.write("after", plugin_id="ws.after")
        await watched.wait_for("plugin.enabled", plugin_id="ws.after")


async def test_a_directory_vanishing_before_its_watch_is_walked_again_quietly(
    env: Env, plugins: PluginFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk that names a directory gone by the time it is watched (a deploy renaming and
    deleting) is repeated at once, without a watcher error; one that keeps failing is
    reported after a few tries."""
    real = watchset.watch_set
    ghost = str(env.plugins / "ghost")
    walks: list[int] = []

    def haunted(root: Path) -> Any:
        found = real(root)
        walks.append(1)
        if len(walks) == 1:
            return watchset.WatchSet((*found.dirs, ghost))
        return found

    monkeypatch.setattr(watcher_module, "watch_set", haunted)
    async with watching(env) as watched:
        plugins.write("fine", plugin_id="ws.fine")
        await watched.wait_for("plugin.enabled", plugin_id="ws.fine")
        assert watched.tap.named(WATCHER_ERROR) == []
        assert len(walks) >= 2
    assert QUICK_RESTARTS >= 1
