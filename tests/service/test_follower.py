"""The follower's polls, in this process: a real registry, a real manager, real installs.

The live tests (test_follow.py) drive a daemon process; these call `Follower.poll` one at a
time, so each decision (install, keep, refuse once, back off) is checked on its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.config.settings import OciFollow
from aisoc_plugind.service.follow import (
    Followed,
    Follower,
    FollowState,
    _resolver,
    _Track,
    state_path,
)
from tests.conftest import Env, ManagerFactory
from tests.delivery.pushes import PLUGIN_ID, push_plugin
from tests.oci_registry import free_port, oci_registry_fixture  # noqa: F401 - the fixture

INTERVAL_S = 5.0


async def _follower(
    env: Env, make_manager: ManagerFactory, registry: str, ref: str
) -> tuple[Follower, _Track, Any]:
    manager = await make_manager(oci_allow_insecure_registries=(registry,))
    settings = env.settings(oci_allow_insecure_registries=(registry,))
    entry = OciFollow(ref=ref, interval_s=INTERVAL_S)
    follower = Follower(
        (entry,), env.logs[-1], manager, _resolver(settings), FollowState(state_path(settings))
    )
    return follower, _Track(entry), manager


def _events(env: Env, name: str) -> list[dict[str, Any]]:
    return [e for e in env.audit_events() if e["event"] == name]


@pytest.mark.oci
async def test_a_new_digest_is_installed_once_and_remembered(
    env: Env, make_manager: ManagerFactory, oci_registry: str, tmp_path: Path
) -> None:
    """First poll installs and writes the state; the next poll of the same digest waits."""
    pinned = push_plugin(oci_registry, tmp_path, "fol", "stable", version="1.0.0")
    ref = f"{oci_registry}/aisoc/fol:stable"
    follower, track, manager = await _follower(env, make_manager, oci_registry, ref)
    assert await follower.poll(track) == INTERVAL_S
    assert manager.get(PLUGIN_ID).version == "1.0.0"
    updated = _events(env, "plugin.follow.updated")
    assert [(e["ref"], e["version"], e["plugin_id"]) for e in updated] == [
        (ref, "1.0.0", PLUGIN_ID)
    ]
    assert updated[0]["digest"] == pinned.split("@", 1)[1]
    saved = json.loads(follower.state.path.read_text())["refs"][ref]
    assert saved == {"digest": updated[0]["digest"], "plugin_id": PLUGIN_ID}
    assert await follower.poll(track) == INTERVAL_S
    assert len(_events(env, "plugin.follow.updated")) == 1  # nothing reinstalled


@pytest.mark.oci
async def test_an_unsigned_build_is_refused_once_and_the_old_one_serves(
    env: Env, make_manager: ManagerFactory, oci_registry: str, tmp_path: Path
) -> None:
    push_plugin(oci_registry, tmp_path, "uns", "stable", version="1.0.0")
    ref = f"{oci_registry}/aisoc/uns:stable"
    follower, track, manager = await _follower(env, make_manager, oci_registry, ref)
    await follower.poll(track)
    push_plugin(oci_registry, tmp_path, "uns", "stable", version="1.1.0", sign=False)
    assert await follower.poll(track) == INTERVAL_S
    assert await follower.poll(track) == INTERVAL_S  # the refused digest is not pulled again
    failed = _events(env, "plugin.follow.failed")
    assert len(failed) == 1
    assert failed[0]["error_code"] == "signature_unsigned"
    assert manager.get(PLUGIN_ID).version == "1.0.0"
    push_plugin(oci_registry, tmp_path, "uns", "stable", version="1.2.0")
    await follower.poll(track)
    assert manager.get(PLUGIN_ID).version == "1.2.0"


async def test_an_unreachable_registry_backs_off(env: Env, make_manager: ManagerFactory) -> None:
    """Nothing listens on the port: each failure doubles the wait and says which attempt."""
    registry = f"127.0.0.1:{free_port()}"
    follower, track, _ = await _follower(env, make_manager, registry, f"{registry}/aisoc/x:1")
    delays = [await follower.poll(track) for _ in range(3)]
    assert delays == [INTERVAL_S * 2, INTERVAL_S * 4, INTERVAL_S * 8]
    failed = _events(env, "plugin.follow.failed")
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    assert {e["error_code"] for e in failed} == {"oci_unreachable"}


async def test_a_bug_in_a_poll_is_reported_and_following_goes_on(
    env: Env, make_manager: ManagerFactory
) -> None:
    manager = await make_manager()
    calls: list[str] = []

    def broken(ref: str) -> str:
        calls.append(ref)
        raise KeyError("a bug")

    entry = OciFollow(ref="127.0.0.1:1/aisoc/x:1", interval_s=0.01)
    follower = Follower(
        (entry,), env.logs[-1], manager, broken, FollowState(env.tmp / "follow.json")
    )
    with anyio.move_on_after(0.5):
        await follower.follow(_Track(entry))
    assert len(calls) >= 2  # still polling after the first failure
    codes = {e["error_code"] for e in _events(env, "plugin.follow.failed")}
    assert codes == {"follow_internal_error"}


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[]", b'{"refs": {"a": {"digest": 1}}}', b'{"refs": 3}'],
)
def test_a_damaged_state_file_reads_as_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "follow.json"
    path.write_bytes(content)
    assert FollowState(path).get("a") is None


async def test_the_state_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "d" / "follow.json"
    state = FollowState(path)
    await state.put("r/a:1", Followed(digest="sha256:" + "a" * 64, plugin_id="p.a"))
    assert FollowState(path).get("r/a:1") == Followed(digest="sha256:" + "a" * 64, plugin_id="p.a")
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.oci
async def test_a_digest_refused_for_its_key_is_retried_once_the_keys_change(
    env: Env, make_manager: ManagerFactory, oci_registry: str, tmp_path: Path
) -> None:
    """Signed by a key the daemon does not trust yet: refused once, not pulled again; after
    SIGHUP re-reads the keys (now with that key) it is polled at once and installed."""
    from aisoc_plugind.engine.keyring import load_keyring

    push_plugin(oci_registry, tmp_path, "later", "stable", version="2.0.0")
    ref = f"{oci_registry}/aisoc/later:stable"
    untrusting = tmp_path / "no-keys"
    untrusting.mkdir(mode=0o755)
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,), keys_dir=untrusting)
    settings = env.settings(oci_allow_insecure_registries=(oci_registry,))
    entry = OciFollow(ref=ref, interval_s=3600.0)
    follower = Follower(
        (entry,), env.logs[-1], manager, _resolver(settings), FollowState(state_path(settings))
    )
    track = follower.tracks[0]
    assert await follower.poll(track) == 3600.0
    assert await follower.poll(track) == 3600.0  # refused: not pulled again
    failed = _events(env, "plugin.follow.failed")
    assert len(failed) == 1 and failed[0]["error_code"].startswith("signature_")
    await manager.adopt_keyring(load_keyring(env.keys))
    follower.keys_reloaded()  # what the SIGHUP hook does after the keys were re-read
    assert track.wake.is_set()  # the waiting poll loop wakes at once, not in an hour
    await follower.poll(track)
    assert manager.get(PLUGIN_ID).version == "2.0.0"
    assert len(_events(env, "plugin.follow.updated")) == 1


async def test_the_poll_loop_wakes_for_new_keys(env: Env, make_manager: ManagerFactory) -> None:
    """`follow` waits out its interval unless the keys change: then it polls at once."""
    manager = await make_manager()
    polled: list[float] = []

    def resolve(ref: str) -> str:
        polled.append(time.monotonic())  # in a worker thread
        raise KeyError("not a registry")  # reported; the next poll waits the backoff

    entry = OciFollow(ref="127.0.0.1:1/aisoc/x:1", interval_s=3600.0)
    follower = Follower(
        (entry,), env.logs[-1], manager, resolve, FollowState(env.tmp / "follow.json")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.follow, follower.tracks[0])
        await anyio.sleep(0.2)
        assert len(polled) == 1
        follower.keys_reloaded()
        await anyio.sleep(0.2)
        assert len(polled) == 2  # woken, not an hour later
        tg.cancel_scope.cancel()
