"""No silent downgrades (INTERFACE §10), against real daemon processes and real files.

The watcher never lowers a version; a plain API reload answers 409 `version_downgrade`; the
operator's word (`{"allow_downgrade": true}`, `aisoc plugins reload ID --allow-downgrade`)
makes the change and `plugin.version.downgraded` says so. The seed's rollback runbook works
with that one word.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VECTOR_PUB, PluginFactory
from tests.live import LiveDaemon, live_daemon

# Long end-to-end scenarios: the main test run has them; the interpreter and
# dependency-floor runs of scripts/test.sh skip them (-m 'not slow').
pytestmark = pytest.mark.slow

PLUGIN = "test.a"


@pytest.fixture
def factory(tmp_path: Path) -> PluginFactory:
    """A plugins dir under tmp_path (and a keys dir with the vector key beside it)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "keys").mkdir()
    shutil.copy(VECTOR_PUB, tmp_path / "keys" / "vector-signer.pem")
    return PluginFactory(tmp_path / "plugins")


def _start(tmp_path: Path, *, watch: bool = False) -> Iterator[LiveDaemon]:
    with live_daemon(
        tmp_path / "daemon", plugins=tmp_path / "plugins", keys=tmp_path / "keys", watch=watch
    ) as daemon:
        yield daemon


@pytest.fixture
def daemon(tmp_path: Path, factory: PluginFactory) -> Iterator[LiveDaemon]:
    """A daemon (no watcher) serving plugin `a` at 2.0.0."""
    factory.write("a", version="2.0.0")
    yield from _start(tmp_path)


@pytest.fixture
def watched(tmp_path: Path, factory: PluginFactory) -> Iterator[LiveDaemon]:
    """A daemon with the watcher on, serving plugin `a` at 2.0.0."""
    factory.write("a", version="2.0.0")
    yield from _start(tmp_path, watch=True)


def _served(daemon: LiveDaemon, plugin_id: str = PLUGIN) -> str:
    """Return the version the plugin's live code reports (it runs, so it serves)."""
    status, body = daemon.request("POST", f"/api/v1/plugins/{plugin_id}/run", {"payload": {}})
    assert status == 200, body
    return str(body["result"]["version"])


def _record(daemon: LiveDaemon, plugin_id: str = PLUGIN) -> dict[str, object]:
    status, body = daemon.request("GET", f"/api/v1/plugins/{plugin_id}")
    assert status == 200, body
    return dict(body)


def _aisoc(daemon: LiveDaemon, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the operator's CLI (`aisoc plugins ...`) against the daemon."""
    env = {
        **os.environ,
        "AISOC_API": f"http://127.0.0.1:{daemon.port}",
        "AISOC_TOKEN": daemon.token,
    }
    code = "import sys; from aisoc_plugind.cli.main import aisoc_main; sys.exit(aisoc_main())"
    return subprocess.run(
        [sys.executable, "-c", code, "plugins", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_watcher_refuses_a_lower_version_and_the_current_one_serves_on(
    watched: LiveDaemon, factory: PluginFactory
) -> None:
    """An older signed release dropped over the directory is refused: version_downgrade."""
    factory.write("a", version="1.0.0")
    failed = watched.wait_for("plugin.reload.failed", plugin_id=PLUGIN)
    assert failed[0]["error_code"] == "version_downgrade"
    assert failed[0]["version"] == "2.0.0"
    assert watched.events("plugin.version.downgraded") == []
    assert _record(watched)["version"] == "2.0.0"
    assert _served(watched) == "2.0.0"


def test_watcher_still_upgrades(watched: LiveDaemon, factory: PluginFactory) -> None:
    """A higher version is an ordinary hot reload."""
    factory.write("a", version="2.1.0-rc.1")
    factory.write("a", version="2.1.0")
    watched.wait_for("plugin.reload.completed", plugin_id=PLUGIN, version="2.1.0")
    assert _served(watched) == "2.1.0"


def test_watcher_refuses_a_version_that_cannot_be_ordered(
    watched: LiveDaemon, factory: PluginFactory
) -> None:
    """A version that is not semantic versioning is not comparable: the watcher refuses it."""
    factory.write("a", version="latest")
    failed = watched.wait_for("plugin.reload.failed", plugin_id=PLUGIN)
    assert failed[0]["error_code"] == "version_downgrade"
    assert _served(watched) == "2.0.0"


def test_plain_api_reload_of_a_lower_version_is_409(
    daemon: LiveDaemon, factory: PluginFactory
) -> None:
    """Without the word the API answers 409 version_downgrade; the old version serves on."""
    factory.write("a", version="1.0.0")
    status, body = daemon.request("POST", f"/api/v1/plugins/{PLUGIN}/reload")
    assert status == 409
    assert body["error"]["code"] == "version_downgrade"
    assert "2.0.0" in body["error"]["message"]
    status, body = daemon.request(
        "POST", f"/api/v1/plugins/{PLUGIN}/reload", {"allow_downgrade": False}
    )
    assert (status, body["error"]["code"]) == (409, "version_downgrade")
    assert _served(daemon) == "2.0.0"
    assert _record(daemon)["error"]["code"] == "version_downgrade"  # type: ignore[index]


def test_allow_downgrade_lowers_the_version_and_says_so(
    daemon: LiveDaemon, factory: PluginFactory
) -> None:
    """`{"allow_downgrade": true}` reloads the lower version with plugin.version.downgraded."""
    factory.write("a", version="1.0.0")
    status, body = daemon.request(
        "POST", f"/api/v1/plugins/{PLUGIN}/reload", {"allow_downgrade": True}
    )
    assert status == 200, body
    assert body["version"] == "1.0.0"
    assert _served(daemon) == "1.0.0"
    event = daemon.wait_for("plugin.version.downgraded", plugin_id=PLUGIN)[0]
    assert event["from_version"] == "2.0.0"
    assert event["version"] == "1.0.0"
    assert event["change"] == "downgrade"
    assert event["actor"] == "root"
    names = [e["event"] for e in daemon.audit_events()]
    assert names.index("plugin.version.downgraded") < names.index("plugin.reload.completed")


def test_allow_downgrade_on_an_upgrade_is_a_plain_reload(
    daemon: LiveDaemon, factory: PluginFactory
) -> None:
    """The word permits a downgrade, it does not claim one: an upgrade emits nothing more."""
    factory.write("a", version="3.0.0")
    status, body = daemon.request(
        "POST", f"/api/v1/plugins/{PLUGIN}/reload", {"allow_downgrade": True}
    )
    assert (status, body["version"]) == (200, "3.0.0")
    assert daemon.events("plugin.version.downgraded") == []


@pytest.mark.parametrize("body", [{"allow_downgrade": "yes"}, {"allow_downgrade": 1}, {"x": 1}])
def test_reload_body_is_checked(daemon: LiveDaemon, body: dict[str, object]) -> None:
    """Only a boolean `allow_downgrade` is accepted in the reload body."""
    status, answer = daemon.request("POST", f"/api/v1/plugins/{PLUGIN}/reload", body)
    assert (status, answer["error"]["code"]) == (400, "invalid_body")


def test_versions_that_do_not_parse_need_the_word(tmp_path: Path, factory: PluginFactory) -> None:
    """`1.0` -> `1.1` cannot be ordered: 409 without the word, allowed with it; the same
    unparseable string with new code is an ordinary reload."""
    factory.write("a", version="1.0", code="VERSION = 'one'\n" + _SIMPLE)
    for daemon in _start(tmp_path):
        factory.write("a", version="1.0", code="VERSION = 'one-fixed'\n" + _SIMPLE)
        status, body = daemon.request("POST", f"/api/v1/plugins/{PLUGIN}/reload")
        assert status == 200, body
        assert _served(daemon) == "one-fixed"
        factory.write("a", version="1.1", code="VERSION = 'two'\n" + _SIMPLE)
        status, body = daemon.request("POST", f"/api/v1/plugins/{PLUGIN}/reload")
        assert (status, body["error"]["code"]) == (409, "version_downgrade")
        assert "not semantic versioning" in body["error"]["message"]
        status, body = daemon.request(
            "POST", f"/api/v1/plugins/{PLUGIN}/reload", {"allow_downgrade": True}
        )
        assert (status, body["version"]) == (200, "1.1")
        event = daemon.wait_for("plugin.version.downgraded", plugin_id=PLUGIN)[0]
        assert (event["from_version"], event["change"]) == ("1.0", "incomparable")


_SIMPLE = """
class Plugin:
    def run(self, payload, context):
        return {"version": VERSION}
"""


def test_seed_rollback_runbook_works_with_one_word(tmp_path: Path, factory: PluginFactory) -> None:
    """Upgrade to a new directory, then roll back the seed's way: drop the previous version
    back, discover, reload; the reload needs `--allow-downgrade` and nothing else."""
    plugins = tmp_path / "plugins"
    factory.write("hello-1", plugin_id="acme.hello", version="1.0.0")
    for daemon in _start(tmp_path):
        # Upgrade: the new version in a new directory, the old one removed, reload.
        factory.write("hello-2", plugin_id="acme.hello", version="2.0.0")
        shutil.rmtree(plugins / "hello-1")
        done = _aisoc(daemon, "reload", "acme.hello")
        assert done.returncode == 0, done.stderr
        assert _served(daemon, "acme.hello") == "2.0.0"
        # Rollback: the previous version back, the current one out, discover, reload.
        factory.write("hello-1", plugin_id="acme.hello", version="1.0.0")
        shutil.rmtree(plugins / "hello-2")
        assert _aisoc(daemon, "discover").returncode == 0
        refused = _aisoc(daemon, "reload", "acme.hello")
        assert refused.returncode == 1
        assert "version_downgrade" in refused.stderr or "lower" in refused.stderr
        assert _served(daemon, "acme.hello") == "2.0.0"
        done = _aisoc(daemon, "reload", "acme.hello", "--allow-downgrade")
        assert done.returncode == 0, done.stderr
        assert "1.0.0" in done.stdout
        assert _served(daemon, "acme.hello") == "1.0.0"
        assert _record(daemon, "acme.hello")["path"] == str(plugins / "hello-1")
        event = daemon.wait_for("plugin.version.downgraded", plugin_id="acme.hello")[0]
        assert (event["from_version"], event["version"]) == ("2.0.0", "1.0.0")
