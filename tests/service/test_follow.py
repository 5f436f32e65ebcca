"""Follow (`oci.follow`): a real daemon polling a tag on a real registry, across a restart."""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from pathlib import Path

import pytest

from aisoc_plugind.service.follow import BACKOFF_CAP_S, Followed, FollowState, backoff_delay
from tests.conftest import VECTOR_PUB
from tests.delivery.pushes import PLUGIN_ID, push_plugin
from tests.live import LiveDaemon, live_daemon
from tests.oci_registry import free_port, oci_registry_fixture  # noqa: F401 - the fixture

INTERVAL_S = 0.3


@pytest.mark.parametrize(
    ("interval", "failures", "expected"),
    [
        (300.0, 0, 300.0),
        (300.0, 1, 600.0),
        (300.0, 3, 2400.0),
        (300.0, 4, BACKOFF_CAP_S),
        (300.0, 500, BACKOFF_CAP_S),
        (0.2, 2, 0.8),
        (7200.0, 3, 7200.0),
    ],
)
def test_backoff_doubles_up_to_the_cap(interval: float, failures: int, expected: float) -> None:
    """Each failure in a row doubles the wait; never past the cap (or the interval)."""
    assert backoff_delay(interval, failures) == pytest.approx(expected)


def _follow_config(registry: str, ref: str) -> str:
    return (
        f'[oci]\nallow_insecure_registries = ["{registry}"]\n'
        f'[[oci.follow]]\nref = "{ref}"\ninterval_s = {INTERVAL_S}\n'
    )


def _keys(root: Path) -> Path:
    keys = root / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "vector-signer.pem").write_bytes(VECTOR_PUB.read_bytes())
    return keys


def _serves(daemon: LiveDaemon) -> str:
    status, body = daemon.request("POST", f"/api/v1/plugins/{PLUGIN_ID}/run", {})
    assert status == 200, body
    return str(body["result"]["version"])


@pytest.mark.oci
def test_follow_takes_good_builds_refuses_unsigned_and_survives_a_restart(
    oci_registry: str, tmp_path: Path
) -> None:
    """good → updated; unsigned → failed, old serves; good → updated; restart: no reinstall."""
    repo = f"follow-{secrets.token_hex(4)}"
    tag = f"{oci_registry}/aisoc/{repo}:stable"
    plugins, keys = tmp_path / "plugins", _keys(tmp_path)
    plugins.mkdir()
    extra = _follow_config(oci_registry, tag)
    env = {"HOME": str(tmp_path / "home")}
    first = push_plugin(oci_registry, tmp_path, repo, "stable", version="1.0.0")
    with live_daemon(tmp_path / "d", plugins=plugins, keys=keys, extra=extra, env=env) as d:
        updated = d.wait_for("plugin.follow.updated", version="1.0.0")[0]
        assert (updated["ref"], updated["plugin_id"]) == (tag, PLUGIN_ID)
        assert updated["digest"] == first.partition("@")[2]
        assert _serves(d) == "1.0.0"
        unsigned = push_plugin(oci_registry, tmp_path, repo, "stable", version="2.0.0", sign=False)
        failed = d.wait_for("plugin.follow.failed", error_code="signature_unsigned")[0]
        assert failed["digest"] == unsigned.partition("@")[2]
        assert _serves(d) == "1.0.0"
        third = push_plugin(oci_registry, tmp_path, repo, "stable", version="3.0.0")
        d.wait_for("plugin.follow.updated", version="3.0.0", digest=third.partition("@")[2])
        assert _serves(d) == "3.0.0"
        assert len(d.events("plugin.follow.failed")) == 1  # the refused digest is not retried
    assert sorted(p.name for p in (plugins / ".previous").iterdir()) == [f"{PLUGIN_ID}@1.0.0"]
    with live_daemon(tmp_path / "d", plugins=plugins, keys=keys, extra=extra, env=env) as d:
        assert _serves(d) == "3.0.0"
        time.sleep(INTERVAL_S * 4)  # several polls of an unchanged tag
        assert d.events("plugin.install.completed") == []
        assert d.events("plugin.follow.updated") == []
        push_plugin(oci_registry, tmp_path, repo, "stable", version="4.0.0")
        d.wait_for("plugin.follow.updated", version="4.0.0")
        assert _serves(d) == "4.0.0"


@pytest.mark.oci
def test_follow_with_the_registry_down_backs_off(tmp_path: Path) -> None:
    """Nothing listens: follow.failed (oci_unreachable) with growing delays; the daemon serves."""
    host = f"127.0.0.1:{free_port()}"
    plugins, keys = tmp_path / "plugins", _keys(tmp_path)
    plugins.mkdir()
    extra = _follow_config(host, f"{host}/aisoc/gone:stable")
    with live_daemon(tmp_path / "d", plugins=plugins, keys=keys, extra=extra) as d:
        failed = d.wait_for("plugin.follow.failed", count=3)
        assert {e["error_code"] for e in failed} == {"oci_unreachable"}
        assert [e["attempt"] for e in failed[:3]] == [1, 2, 3]
        delays = [e["delay_s"] for e in failed[:3]]
        assert delays == pytest.approx([INTERVAL_S * 2, INTERVAL_S * 4, INTERVAL_S * 8])
        at = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in failed[:3]]
        assert at[1] - at[0] >= delays[0] * 0.9 and at[2] - at[1] >= delays[1] * 0.9
        status, health = d.request("GET", "/healthz")
        assert status == 200 and health["status"] == "ok"
        assert d.proc.poll() is None


async def test_follow_state_survives_a_new_reader(tmp_path: Path) -> None:
    """What is put is written atomically (0600) and read back by a fresh FollowState."""
    path = tmp_path / "state" / ".daemon" / "follow.json"
    state = FollowState(path)
    assert state.get("r.example/a/b:stable") is None
    await state.put("r.example/a/b:stable", Followed(digest="sha256:" + "1" * 64, plugin_id="p"))
    assert path.stat().st_mode & 0o777 == 0o600
    again = FollowState(path)
    assert again.get("r.example/a/b:stable") == Followed(digest="sha256:" + "1" * 64, plugin_id="p")


@pytest.mark.parametrize("text", ["", "not json", '{"refs": 3}', '{"refs": {"r": {"x": 1}}}'])
def test_an_unreadable_follow_state_is_empty(tmp_path: Path, text: str) -> None:
    """A damaged state file means nothing is known: at worst, one reinstall with replace."""
    path = tmp_path / "follow.json"
    path.write_text(text)
    assert FollowState(path).get("r") is None
