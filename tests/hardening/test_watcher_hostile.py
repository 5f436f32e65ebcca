"""The watcher against hostile trees and real deploy tools: links out, temp names, renames.

One real daemon (strict trust, `plugins.watch = true`, a 500 ms quiet window) watches a
plugins dir that holds symlinks to `/usr` and `/` and a plugin with a link inside. inotify
watches are counted for the daemon's PID in /proc: they follow the real directories only.
Then each deploy style replays its own sequence of file operations, with its own temporary
names, into the live plugins dir: every one ends in exactly one clean load or reload of its
plugin, and no failure is reported for a temporary name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTOR_PUB, PluginFactory
from tests.live import LiveDaemon, live_daemon, wait_until

# Long end-to-end scenarios: the main test run has them; the interpreter and
# dependency-floor runs of scripts/test.sh skip them (-m 'not slow').
pytestmark = pytest.mark.slow

DEBOUNCE_MS = 500
QUIET_S = 1.0  # after the awaited event: long enough for a second (unwanted) reload to show
FAILURES = ("plugin.load.failed", "plugin.reload.failed", "watcher.error")


def inotify_watches(pid: int) -> int:
    """Return how many inotify watches the process holds (every inotify descriptor)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                total += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue  # closed meanwhile
    return total


def real_dirs(root: Path) -> int:
    """Return how many real directories (no links, no hidden ones) `root` holds, itself too."""
    count = 1
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            count += real_dirs(entry)
    return count


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    """A watching daemon over a plugins dir with links out of it, and one plain plugin."""
    root = tmp_path_factory.mktemp("watcher-hostile")
    plugins = root / "plugins"
    plugins.mkdir()
    keys = root / "keys"
    keys.mkdir()
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    PluginFactory(plugins).write("base", plugin_id="hostile.base")
    (plugins / "usr-link").symlink_to("/usr")
    (plugins / "root-link").symlink_to("/")
    linked = PluginFactory(plugins).write("linked", plugin_id="hostile.linked")
    (linked / "data").symlink_to("/usr")  # refused by the reader; must not be watched either
    env = {"AISOC_PLUGIND__PLUGINS__WATCH_DEBOUNCE_MS": str(DEBOUNCE_MS)}
    with live_daemon(root / "daemon", plugins=plugins, keys=keys, watch=True, env=env) as daemon:
        daemon.wait_for("watcher.started")
        yield daemon
        assert daemon.proc.poll() is None, daemon.stderr_text()
        assert daemon.request("GET", "/healthz")[0] == 200


def _plugins(daemon: LiveDaemon) -> Path:
    return daemon.root.parent / "plugins"


def _events_for(daemon: LiveDaemon, name: str, plugin_id: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events(name) if e.get("plugin_id") == plugin_id]


def _settled(daemon: LiveDaemon) -> None:
    """Wait out one more quiet window (and then some) for anything still coming."""
    time.sleep(QUIET_S)


def _no_failures(daemon: LiveDaemon, since: int) -> None:
    """No failure event at all since event number `since` (a temp name never fails)."""
    late = daemon.events()[since:]
    bad = [e for e in late if e.get("event") in FAILURES]
    assert bad == [], bad


def _version(daemon: LiveDaemon, plugin_id: str) -> str:
    status, body = daemon.request("POST", f"/api/v1/plugins/{plugin_id}/run", {})
    assert status == 200, body
    return str(body["result"]["version"])


def _build(scratch: Path, name: str, plugin_id: str, version: str) -> Path:
    """Write a signed plugin tree outside the plugins dir (what a deploy tool ships)."""
    return PluginFactory(scratch).write(name, plugin_id=plugin_id, version=version)


def _install_fresh(daemon: LiveDaemon, scratch: Path, name: str, plugin_id: str) -> None:
    """Put version 1.0.0 in place with one rename (the clean way) and wait until it serves."""
    built = _build(scratch / "v1", name, plugin_id, "1.0.0")
    staging = _plugins(daemon) / f".tmp-{name}"
    shutil.copytree(built, staging)
    staging.rename(_plugins(daemon) / name)
    daemon.wait_for("plugin.enabled", plugin_id=plugin_id)


# ---- links --------------------------------------------------------------------------------


def test_symlinks_out_of_the_plugins_dir_are_never_followed(watched: LiveDaemon) -> None:
    """Links to /usr and / (and one inside a plugin) add no watch and no watcher error; a
    link swapped to point elsewhere changes nothing; plugins keep reloading."""
    plugins = _plugins(watched)
    budget = real_dirs(plugins) + 16  # the daemon's other watches (tokens, keys, revocations)
    assert inotify_watches(watched.proc.pid) <= budget
    assert watched.events("watcher.error") == []
    refused = [e for e in watched.events("plugin.load.failed") if e["path"].endswith("/linked")]
    assert [e["error_code"] for e in refused] == ["bundle_symlink"]
    since = len(watched.events())
    swap = plugins / f"Cu{secrets.token_hex(3)}"  # how `ln -sfn` swaps: a new link renamed over
    swap.symlink_to("/")
    swap.replace(plugins / "usr-link")
    PluginFactory(plugins).write("base", plugin_id="hostile.base", version="2.0.0")
    watched.wait_for("plugin.reload.completed", plugin_id="hostile.base", version="2.0.0")
    _settled(watched)
    _no_failures(watched, since)
    assert inotify_watches(watched.proc.pid) <= budget


def test_a_link_swap_for_a_plugin_directory_is_not_a_failure(
    watched: LiveDaemon, tmp_path: Path
) -> None:
    """`ln -sfn release-N plugins/current`: a linked plugin directory is never a plugin (the
    reader refuses links), so the swap loads nothing and fails nothing."""
    plugins = _plugins(watched)
    one = _build(tmp_path, "rel1", "hostile.current", "1.0.0")
    two = _build(tmp_path, "rel2", "hostile.current", "2.0.0")
    since = len(watched.events())
    (plugins / "current").symlink_to(one)
    for _ in range(3):
        swap = plugins / f"Cu{secrets.token_hex(3)}"
        swap.symlink_to(two)
        swap.replace(plugins / "current")
    PluginFactory(plugins).write("base", plugin_id="hostile.base", version="3.0.0")
    watched.wait_for("plugin.reload.completed", plugin_id="hostile.base", version="3.0.0")
    _settled(watched)
    _no_failures(watched, since)
    assert _events_for(watched, "plugin.discovered", "hostile.current") == []


# ---- deploy tools -------------------------------------------------------------------------

# How each tool names the file it writes before renaming it to `name`.
Temp = Callable[[str], str]
STYLES: dict[str, Temp] = {
    "rsync": lambda name: f".{name}.{secrets.token_hex(3)}",
    "ansible": lambda name: f".ansible_tmp{secrets.token_hex(4)}{name}",
    "sed": lambda name: f"sed{secrets.token_hex(3)}",
    "tempfile": lambda name: f"tmp{secrets.token_hex(4)}",
    "dpkg": lambda name: f"{name}.dpkg-new",
    "partial": lambda name: f"{name}.part",
}


def _deploy(source: Path, target: Path, temp: Temp, *, chunks: int, pause_s: float) -> None:
    """Copy every file of `source` into `target` the way such tools do: write a temporary
    name in `chunks` writes `pause_s` apart, then rename it over the real name."""
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        data = path.read_bytes()
        staged = target / temp(path.name)
        size = -(-len(data) // chunks)
        with staged.open("wb") as out:
            for start in range(0, len(data), size):
                out.write(data[start : start + size])
                out.flush()
                time.sleep(pause_s)
        staged.replace(target / path.name)


@pytest.mark.parametrize("style", list(STYLES))
def test_a_deploy_through_temporary_names_reloads_once(
    watched: LiveDaemon, tmp_path: Path, style: str
) -> None:
    """Files written under temporary names, slowly (longer in all than the quiet window),
    then renamed into place: one reload of the new version, no failure on the way."""
    plugin_id = f"deploy.{style}"
    _install_fresh(watched, tmp_path, style, plugin_id)
    since = len(watched.events())
    new = _build(tmp_path / "v2", style, plugin_id, "2.0.0")
    # Each file takes 4 x 0.1 s: the whole deploy spans over twice the 0.5 s quiet window.
    _deploy(new, _plugins(watched) / style, STYLES[style], chunks=4, pause_s=0.1)
    watched.wait_for("plugin.reload.completed", plugin_id=plugin_id, version="2.0.0")
    _settled(watched)
    assert len(_events_for(watched, "plugin.reload.completed", plugin_id)) == 1
    _no_failures(watched, since)
    assert _version(watched, plugin_id) == "2.0.0"
    leftovers = [p.name for p in (_plugins(watched) / style).iterdir()]
    assert sorted(leftovers) == ["plugin.py", "plugin.sig", "plugin.yaml"]


def test_an_editor_save_reloads_once(watched: LiveDaemon, tmp_path: Path) -> None:
    """vim's save (4913 probe, `file~` backup, swap file writes) and emacs' lock and
    autosave files around a signed edit: one reload, no failure."""
    plugin_id = "deploy.editor"
    _install_fresh(watched, tmp_path, "editor", plugin_id)
    target = _plugins(watched) / "editor"
    since = len(watched.events())
    new = _build(tmp_path / "v2", "editor", plugin_id, "2.0.0")
    (target / ".#plugin.py").symlink_to("user@host.1234:1700000000")  # emacs lock
    (target / "#plugin.py#").write_text("autosave")
    (target / ".plugin.py.swp").write_bytes(b"\0" * 4096)
    probe = target / "4913"
    probe.write_text("")
    probe.unlink()
    for name in ("plugin.py", "plugin.yaml", "plugin.sig"):
        (target / name).rename(target / f"{name}~")
        shutil.copy(new / name, target / name)
        (target / ".plugin.py.swp").write_bytes(b"\1" * 4096)
        time.sleep(0.1)
        (target / f"{name}~").unlink()
    for leftover in (".#plugin.py", "#plugin.py#", ".plugin.py.swp"):
        (target / leftover).unlink()
    watched.wait_for("plugin.reload.completed", plugin_id=plugin_id, version="2.0.0")
    _settled(watched)
    assert len(_events_for(watched, "plugin.reload.completed", plugin_id)) == 1
    _no_failures(watched, since)


def test_a_hidden_staging_directory_renamed_into_place_loads_once(
    watched: LiveDaemon, tmp_path: Path
) -> None:
    """A `.tmp-<id>` directory filled slowly is never looked at; the rename loads it once."""
    plugin_id = "deploy.staged"
    built = _build(tmp_path, "staged", plugin_id, "1.0.0")
    staging = _plugins(watched) / ".tmp-staged"
    staging.mkdir()
    since = len(watched.events())
    for path in sorted(built.iterdir()):
        (staging / path.name).write_bytes(path.read_bytes())
        time.sleep(DEBOUNCE_MS / 1000 * 1.5)  # each file lands after a full quiet window
    # A hidden directory is not looked at: no event names it or its plugin.
    assert [e for e in watched.events()[since:] if "staged" in json.dumps(e)] == []
    staging.rename(_plugins(watched) / "staged")
    watched.wait_for("plugin.enabled", plugin_id=plugin_id)
    _settled(watched)
    assert len(_events_for(watched, "plugin.discovered", plugin_id)) == 1
    _no_failures(watched, since)


def test_an_upgrade_by_directory_swap_reloads_once(watched: LiveDaemon, tmp_path: Path) -> None:
    """`mv plugin .old; mv .new plugin; rm -rf .old`: one reload, the new version serves."""
    plugin_id = "deploy.swap"
    _install_fresh(watched, tmp_path, "swap", plugin_id)
    plugins = _plugins(watched)
    new = shutil.copytree(_build(tmp_path / "v2", "swap", plugin_id, "2.0.0"), plugins / ".new")
    since = len(watched.events())
    (plugins / "swap").rename(plugins / ".old-swap")
    new.rename(plugins / "swap")
    shutil.rmtree(plugins / ".old-swap")
    watched.wait_for("plugin.reload.completed", plugin_id=plugin_id, version="2.0.0")
    _settled(watched)
    assert len(_events_for(watched, "plugin.reload.completed", plugin_id)) == 1
    _no_failures(watched, since)
    assert _version(watched, plugin_id) == "2.0.0"


def test_a_directory_moved_in_from_outside_loads_once_with_its_subdirectories(
    watched: LiveDaemon, tmp_path: Path
) -> None:
    """A complete tree moved in (one rename) loads once; a later edit in a subdirectory it
    brought along (a helper module) is seen: the new directory is watched too."""
    plugin_id = "deploy.moved"
    code = "from .helpers.value import VALUE\nclass Plugin:\n    def run(self, p, c):\n"
    code += "        return {'version': VALUE}\n"
    files = {"helpers/__init__.py": "", "helpers/value.py": "VALUE = '1.0.0'\n"}
    built = PluginFactory(tmp_path).write("moved", plugin_id=plugin_id, code=code, files=files)
    since = len(watched.events())
    built.rename(_plugins(watched) / "moved")
    watched.wait_for("plugin.enabled", plugin_id=plugin_id)
    assert _version(watched, plugin_id) == "1.0.0"
    files["helpers/value.py"] = "VALUE = '2.0.0'\n"
    update = PluginFactory(tmp_path / "v2").write(
        "moved", plugin_id=plugin_id, code=code, files=files
    )
    target = _plugins(watched) / "moved"
    shutil.copy(update / "helpers" / "value.py", target / "helpers" / "value.py")
    shutil.copy(update / "plugin.sig", target / "plugin.sig")
    wait_until(
        lambda: True if _version(watched, plugin_id) == "2.0.0" else None,
        20,
        "the helper edit to be reloaded",
    )
    _settled(watched)
    assert len(_events_for(watched, "plugin.discovered", plugin_id)) == 1
    assert len(_events_for(watched, "plugin.reload.completed", plugin_id)) == 1
    _no_failures(watched, since)


def test_a_hidden_directory_is_never_a_plugin(watched: LiveDaemon, tmp_path: Path) -> None:
    """A complete, signed plugin in a hidden directory is never loaded, watched or reported."""
    built = _build(tmp_path, "hidden", "deploy.hidden", "1.0.0")
    since = len(watched.events())
    shutil.copytree(built, _plugins(watched) / ".ansible_tmp-hidden")
    PluginFactory(_plugins(watched)).write("base", plugin_id="hostile.base", version="4.0.0")
    watched.wait_for("plugin.reload.completed", plugin_id="hostile.base", version="4.0.0")
    _settled(watched)
    assert [e for e in watched.events()[since:] if e.get("plugin_id") == "deploy.hidden"] == []
    assert watched.request("GET", "/api/v1/plugins/deploy.hidden")[0] == 404
