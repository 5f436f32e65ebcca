"""The tokens file's change flag (inotify, for real) and revocation without a stat per request.

The flag may only ever err towards "changed": a change it misses would let a revoked token
work. Each way a file is changed in practice is made here for real and must raise it; where
inotify cannot see (its directory deleted) the flag must fall back to answering True.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aisoc_plugind.api.filewatch import ChangeFlag
from aisoc_plugind.api.tokens import TokenStore
from tests.api_fixtures import write_tokens
from tests.conftest import Env
from tests.live import live_daemon
from tests.mounts import kubelet_mount

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux only")


async def _settle() -> None:
    """Let the loop read pending inotify events (its reader runs before later handlers)."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
async def flag(tmp_path: Path) -> ChangeFlag:
    target = tmp_path / "etc" / "tokens.toml"
    target.parent.mkdir()
    target.write_text("x")
    watch = ChangeFlag(target)
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()  # the first question always looks
    assert not watch.changed()
    return watch


async def test_an_unchanged_file_is_not_looked_at_again(flag: ChangeFlag) -> None:
    await _settle()
    assert not flag.changed()
    flag.close()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p.write_text("rewritten in place"), id="in-place write"),
        pytest.param(
            lambda p: (p.with_name("t.tmp").write_text("new"), os.replace(p.with_name("t.tmp"), p)),
            id="atomic rename over it",
        ),
        pytest.param(lambda p: p.unlink(), id="deleted"),
        pytest.param(lambda p: os.chmod(p, 0o600), id="mode changed"),
        pytest.param(lambda p: os.utime(p, (1, 1)), id="mtime set back"),
        pytest.param(lambda p: p.rename(p.with_name("moved.toml")), id="moved away"),
    ],
)
async def test_every_kind_of_change_raises_the_flag(flag: ChangeFlag, change: object) -> None:
    assert callable(change)
    change(flag.path)
    await _settle()
    assert flag.changed()
    assert not flag.changed()
    flag.close()


async def test_a_symlinked_file_is_watched_where_it_points(tmp_path: Path) -> None:
    """tokens.toml -> /elsewhere/real.toml: a change of the target raises the flag, and so
    does pointing the link somewhere new (whose directory is then watched too)."""
    elsewhere, other = tmp_path / "secrets", tmp_path / "other"
    elsewhere.mkdir()
    other.mkdir()
    (elsewhere / "real.toml").write_text("a")
    (other / "real.toml").write_text("b")
    link = tmp_path / "etc" / "tokens.toml"
    link.parent.mkdir()
    link.symlink_to(elsewhere / "real.toml")
    watch = ChangeFlag(link)
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()
    (elsewhere / "real.toml").write_text("changed where the link points")
    await _settle()
    assert watch.changed()
    link.unlink()
    link.symlink_to(other / "real.toml")
    await _settle()
    assert watch.changed()
    (other / "real.toml").write_text("changed in the new place")
    await _settle()
    assert watch.changed()
    watch.close()


async def test_a_deleted_directory_falls_back_to_always_looking(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    (directory / "tokens.toml").write_text("x")
    watch = ChangeFlag(directory / "tokens.toml")
    assert watch.attach(asyncio.get_running_loop())
    watch.changed()
    (directory / "tokens.toml").unlink()
    directory.rmdir()
    await _settle()
    assert watch.changed()
    assert not watch.watching
    assert watch.changed() and watch.changed()  # no watch: every question looks


async def test_no_directory_means_no_watch(tmp_path: Path) -> None:
    watch = ChangeFlag(tmp_path / "missing" / "tokens.toml")
    assert not watch.attach(asyncio.get_running_loop())
    assert watch.changed() and watch.changed()


async def test_an_unattached_flag_always_says_changed(tmp_path: Path) -> None:
    watch = ChangeFlag(tmp_path / "tokens.toml")
    assert watch.changed() and watch.changed()


async def test_revocation_is_seen_by_the_next_authentication(tmp_path: Path) -> None:
    """With the flag attached, a revoked token fails on the next call, with no stat before
    calls while nothing changed; an expired entry fails by the clock alone."""
    tokens = write_tokens(tmp_path / "tokens.toml", {"a": ["plugins:read"], "b": ["plugins:read"]})
    store = TokenStore(tmp_path / "tokens.toml")
    assert store.flag.attach(asyncio.get_running_loop())
    header = f"Bearer {tokens['a']}"
    assert store.authenticate(header) is not None
    assert store.authenticate(header) is not None  # from the header cache
    write_tokens(tmp_path / "tokens.toml", {"b": ["plugins:read"]})
    await _settle()
    assert store.authenticate(header) is None
    assert store.authenticate(f"Bearer {tokens['b']}") is None  # rewritten: b has a new token
    store.flag.close()


def test_a_live_daemon_refuses_a_revoked_token_on_the_very_next_request(
    tmp_path: Path, env: Env
) -> None:
    """The real daemon (inotify attached), the real CLI: revoke, then one request: 401."""
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as daemon:
        tokens_file = daemon.root / "tokens.toml"
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "aisoc_plugind",
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "ops",
                "--permissions",
                "plugins:read",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        token = made.stdout.strip()
        fds = Path(f"/proc/{daemon.proc.pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir()]
        assert "anon_inode:inotify" in links  # plugins.watch is off: this is the tokens flag
        for _ in range(3):
            assert daemon.request("GET", "/api/v1/plugins", token=token)[0] == 200
        subprocess.run(
            [
                sys.executable,
                "-m",
                "aisoc_plugind",
                "token",
                "revoke",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "ops",
            ],
            check=True,
            capture_output=True,
        )
        assert daemon.request("GET", "/api/v1/plugins", token=token)[0] == 401


async def test_writes_to_a_neighbour_do_not_raise_the_flag(flag: ChangeFlag) -> None:
    """An audit file beside the tokens file is written on every request: its writes must not
    make every request look at the tokens file again."""
    neighbour = flag.path.with_name("audit.jsonl")
    neighbour.touch()
    await _settle()
    assert flag.changed()  # a creation counts
    with neighbour.open("a") as fh:
        for n in range(50):
            fh.write(f"line {n}\n")
            fh.flush()
    await _settle()
    assert not flag.changed()
    neighbour.with_name("plugin.state").write_text("rewritten")  # a write, then a close
    await _settle()
    assert flag.changed()  # its creation counts (it might become the file by a rename)
    neighbour.with_name("plugin.state").write_text("again")
    await _settle()
    assert not flag.changed()
    flag.path.write_text("the file itself")
    await _settle()
    assert flag.changed()
    flag.close()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p.with_name("tokens.next").rename(p), id="neighbour renamed over"),
        pytest.param(lambda p: os.link(p.with_name("tokens.next"), p.with_name("x")), id="linked"),
        pytest.param(lambda p: p.with_name("tokens.next").unlink(), id="neighbour deleted"),
        pytest.param(lambda p: os.chmod(p.with_name("tokens.next"), 0o600), id="neighbour chmod"),
    ],
)
async def test_other_changes_in_the_directory_still_raise_it(
    tmp_path: Path, change: object
) -> None:
    """Only writes are filtered by name: anything else in the directory errs towards looking."""
    target = tmp_path / "tokens.toml"
    target.write_text("x")
    target.with_name("tokens.next").write_text("y")
    watch = ChangeFlag(target)
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()
    await _settle()
    assert not watch.changed()
    assert callable(change)
    change(target)
    await _settle()
    assert watch.changed()
    watch.close()


async def test_a_write_through_a_hard_link_raises_it(tmp_path: Path) -> None:
    """inotify names the link a write went through: with other links every write counts."""
    target = tmp_path / "tokens.toml"
    target.write_text("x")
    os.link(target, tmp_path / "alias.toml")
    watch = ChangeFlag(target)
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()
    await _settle()
    assert not watch.changed()
    with (tmp_path / "alias.toml").open("a") as fh:
        fh.write("revoked through the alias")
    await _settle()
    assert watch.changed()
    watch.close()


async def test_a_write_to_a_same_directory_link_target_raises_it(tmp_path: Path) -> None:
    """tokens.toml -> tokens.v2 in the same directory: writes to tokens.v2 count."""
    (tmp_path / "tokens.v2").write_text("x")
    (tmp_path / "tokens.toml").symlink_to("tokens.v2")
    watch = ChangeFlag(tmp_path / "tokens.toml")
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()
    (tmp_path / "audit.jsonl").write_text("noise")
    await _settle()
    assert watch.changed()  # the creation of audit.jsonl counts
    with (tmp_path / "audit.jsonl").open("a") as fh:
        fh.write("more noise")
    await _settle()
    assert not watch.changed()
    (tmp_path / "tokens.v2").write_text("rotated")
    await _settle()
    assert watch.changed()
    watch.close()


async def test_a_kubelet_secret_swap_raises_it(tmp_path: Path) -> None:
    """A kubelet projected secret: tokens.toml -> ..data/tokens.toml, ..data -> ..ts1; an
    update writes ..ts2 and renames a new ..data link over the old one."""
    secret = tmp_path / "secret"
    kubelet_mount(secret, {"tokens.toml": b"a"})
    watch = ChangeFlag(secret / "tokens.toml")
    assert watch.attach(asyncio.get_running_loop())
    assert watch.changed()
    await _settle()
    assert not watch.changed()
    (secret / "..2026_11_27_00_00_00.000000002").mkdir()
    (secret / "..2026_11_27_00_00_00.000000002" / "tokens.toml").write_bytes(b"b")
    await _settle()
    watch.changed()  # the new directory's creation may have raised it already
    (secret / "..data_tmp").symlink_to("..2026_11_27_00_00_00.000000002")
    os.replace(secret / "..data_tmp", secret / "..data")
    await _settle()
    assert watch.changed()
    watch.close()
