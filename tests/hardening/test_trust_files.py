"""Files that carry trust are checked: trusted keys, the keys dir, the tokens file.

A trusted key or the tokens file that group or others may write, that another unprivileged
user owns, or that is not a regular file is refused with an event naming it; a FIFO at such a
path never hangs the daemon. Links are followed only where kubelet lays them out (every link
inside the directory). `token create` / `revoke` keep the tokens file's mode and group.
(The tests run as root: "another unprivileged user" is uid 65534, nobody.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisoc_plugind.api.app import serve
from aisoc_plugind.api.tokens import TokenStore
from aisoc_plugind.api.tokens_file import read_tokens_file, write_tokens_file
from aisoc_plugind.cli.main import run_plugind
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.errors import ConfigError, TokenFileError
from aisoc_plugind.files import FileRefused, read_trusted
from tests.api_fixtures import write_tokens
from tests.conftest import VECTOR_PUB, Env, ManagerFactory, PluginFactory
from tests.hardening.live import wait_exit, wait_ready
from tests.hardening.unsafe import NOBODY, spoil
from tests.live import live_daemon, wait_until
from tests.mounts import kubelet_mount

pytestmark = pytest.mark.timeout(120)

KEY = VECTOR_PUB.read_bytes()
READY_S = 60.0


def _hostile_keys(keys: Path, outside: Path) -> dict[str, str]:
    """Fill `keys` with copies of the trusted key that must all be refused; return
    {file name: expected code}."""
    (keys / "group-writable.pem").write_bytes(KEY)
    (keys / "group-writable.pem").chmod(0o664)
    (keys / "world-writable.pub").write_bytes(KEY)
    (keys / "world-writable.pub").chmod(0o646)
    (keys / "nobody.pem").write_bytes(KEY)
    os.chown(keys / "nobody.pem", NOBODY, NOBODY)
    os.mkfifo(keys / "fifo.pem")
    (keys / "directory.pem").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(keys / "socket.pem"))
    outside.write_bytes(KEY)
    (keys / "outside.pem").symlink_to(outside)
    (keys / "escape.pub").symlink_to(Path("..") / outside.name)
    hidden = keys / "..real"
    hidden.mkdir()
    (hidden / "key").write_bytes(KEY)
    (keys / "nobody-link.pem").symlink_to(Path("..real") / "key")
    os.lchown(keys / "nobody-link.pem", NOBODY, NOBODY)
    return {
        "group-writable.pem": "key_file_insecure",
        "world-writable.pub": "key_file_insecure",
        "nobody.pem": "key_file_insecure",
        "fifo.pem": "key_file_not_regular",
        "directory.pem": "key_file_not_regular",
        "socket.pem": "key_file_not_regular",
        "outside.pem": "key_symlink",
        "escape.pub": "key_symlink",
        "nobody-link.pem": "key_file_insecure",
    }


@pytest.fixture
def bare_keys(env: Env) -> Path:
    """The env's keys dir, emptied (the tests lay out their own)."""
    for entry in env.keys.iterdir():
        entry.unlink()
    return env.keys


# ---- trusted keys, with the real daemon ----------------------------------------------------


def test_unsafe_key_files_are_skipped_with_events_and_never_hang(
    tmp_path: Path, env: Env, plugins: PluginFactory, bare_keys: Path
) -> None:
    """Nine unsafe copies of the trusted key: each skipped with its code, none trusted, so
    the signed plugin is refused in strict mode; the daemon gets ready regardless."""
    expected = _hostile_keys(bare_keys, tmp_path / "outside.pem")
    plugins.write("signed", plugin_id="acme.signed")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=bare_keys, wait_ready=False) as d:
        ready = wait_ready(d, READY_S)
        assert ready["keys"] == 0, ready
        skipped = {Path(e["path"]).name: e["error_code"] for e in d.events("trust.key.skipped")}
        assert skipped == expected
        status, record = d.request("GET", "/api/v1/plugins/acme.signed")
        assert status == 200 and record["state"] == "failed", record
        assert record["error"]["code"] == "signature_invalid"


def test_keys_behind_kubelet_links_in_a_sticky_mount_are_trusted(
    tmp_path: Path, env: Env, plugins: PluginFactory, bare_keys: Path
) -> None:
    """A Secret mount (1777 root, key.pem -> ..data/key.pem -> ..<stamp>/key.pem): trusted."""
    kubelet_mount(bare_keys, {"vector-signer.pem": KEY})
    bare_keys.chmod(0o1777)
    plugins.write("signed", plugin_id="acme.signed")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=bare_keys, wait_ready=False) as d:
        ready = wait_ready(d, READY_S)
        assert ready["keys"] == 1 and d.events("trust.key.skipped") == [], ready
        record = d.request("GET", "/api/v1/plugins/acme.signed")[1]
        assert (record["state"], record["signing_key_id"]) == ("enabled", "vector-signer")


@pytest.mark.parametrize(("mode", "owner"), [(0o777, 0), (0o775, 0), (0o755, NOBODY)])
def test_an_unsafe_keys_dir_gives_no_key(
    tmp_path: Path, env: Env, plugins: PluginFactory, mode: int, owner: int
) -> None:
    """A keys dir others may write (no sticky bit) or another user owns: no key, one event."""
    env.keys.chmod(mode)
    os.chown(env.keys, owner, owner)
    plugins.write("signed", plugin_id="acme.signed")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, wait_ready=False) as d:
        ready = wait_ready(d, READY_S)
        assert ready["keys"] == 0
        skipped = d.events("trust.key.skipped")
        assert [(e["path"], e["error_code"]) for e in skipped] == [
            (str(env.keys), "keys_dir_insecure")
        ]
        assert d.request("GET", "/api/v1/plugins/acme.signed")[1]["state"] == "failed"


# ---- the tokens file, with the real daemon -------------------------------------------------


def _unsafe_tokens(path: Path, kind: str) -> None:
    if kind not in ("fifo", "directory"):
        write_tokens(path)
    spoil(path, kind)


TOKEN_KINDS = ["group-writable", "world-writable", "nobody", "fifo", "directory"]


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_an_unsafe_tokens_file_stops_the_start(
    tmp_path: Path, env: Env, plugins: PluginFactory, kind: str
) -> None:
    """The daemon refuses to start on an untrustworthy tokens file (a FIFO never hangs it):
    `api.tokens.refused` names it, the exit status is 1 and stderr says why."""
    tokens = tmp_path / "unsafe-tokens.toml"
    _unsafe_tokens(tokens, kind)
    with live_daemon(
        tmp_path / "d",
        plugins=env.plugins,
        keys=env.keys,
        wait_ready=False,
        env={"AISOC_PLUGIND_TOKENS_FILE": str(tokens)},
    ) as d:
        assert wait_exit(d, 60) == 1
        refused = d.events("api.tokens.refused")
        assert refused and refused[0]["path"] == str(tokens), d.stderr_text()
        assert refused[0]["error_code"] == "tokens_file_insecure"
        assert str(tokens) in d.stderr_text()
        assert d.events("daemon.ready") == []


def test_a_tokens_file_turned_unsafe_keeps_the_tokens_before(
    tmp_path: Path, env: Env, plugins: PluginFactory
) -> None:
    """Made group-writable, replaced by a FIFO, then fixed: the tokens read before keep
    working meanwhile (`api.tokens.refused` each time, on a change and on SIGHUP); a good
    file is read again."""
    plugins.write("a")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        tokens = d.root / "tokens.toml"
        tokens.chmod(0o666)
        assert d.request("GET", "/api/v1/plugins")[0] == 200
        d.wait_for("api.tokens.refused", trigger="file_changed")
        d.signal(signal.SIGHUP)
        d.wait_for("api.tokens.refused", trigger="sighup")
        assert d.request("GET", "/api/v1/plugins")[0] == 200
        fifo = d.root / "fifo"
        os.mkfifo(fifo)
        fifo.replace(tokens)
        assert d.request("GET", "/api/v1/plugins", timeout=10)[0] == 200
        tokens.unlink()
        fresh = write_tokens(tokens, {"ops": ("plugins:read",)})
        wait_until(
            lambda: d.request("GET", "/api/v1/plugins", token=fresh["ops"])[0] == 200 or None,
            30,
            "the fixed tokens file to be read",
        )
        assert d.request("GET", "/api/v1/plugins")[0] == 401  # the old token is gone now
        d.wait_for("api.tokens.loaded", names=["ops"])
        assert d.proc.poll() is None


# ---- token create / revoke keep the file's mode and group ----------------------------------


def _token(*args: str) -> int:
    return run_plugind(["token", *args])


def test_token_commands_keep_the_mode_and_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new file is 0600; once the operator made it 0640 with the service's group, create
    and revoke keep exactly that (and the owner)."""
    path = tmp_path / "tokens.toml"
    assert (
        _token("create", "--tokens-file", str(path), "--name", "a", "--permissions", "plugins:read")
        == 0
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    os.chown(path, 0, NOBODY)
    assert (
        _token(
            "create", "--tokens-file", str(path), "--name", "b", "--permissions", "plugins:admin"
        )
        == 0
    )
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o640, NOBODY)
    assert _token("revoke", "--tokens-file", str(path), "--name", "a") == 0
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, NOBODY)
    assert sorted(read_tokens_file(path)[0]) == ["b"]
    capsys.readouterr()


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_token_commands_refuse_an_unsafe_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """create, revoke and list refuse (exit 1, saying why) what the daemon would refuse; a
    FIFO never hangs them; nothing is rewritten."""
    path = tmp_path / "tokens.toml"
    _unsafe_tokens(path, kind)
    before = os.stat(path, follow_symlinks=False)
    for args in (
        ["create", "--name", "c", "--permissions", "plugins:read"],
        ["revoke", "--name", "c"],
        ["list"],
    ):
        assert _token(*args, "--tokens-file", str(path)) == 1
        assert "refusing to trust it" in capsys.readouterr().err
    after = os.stat(path, follow_symlinks=False)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


# ---- in process: the readers ---------------------------------------------------------------


@pytest.fixture
def trust_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "trust"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _refusal(path: Path, within: Path | None = None) -> str:
    with pytest.raises(FileRefused) as info:
        read_trusted(path, cap=1024, links_within=within)
    return info.value.reason


def test_read_trusted_refuses_what_may_not_carry_trust(trust_dir: Path, tmp_path: Path) -> None:
    """Mode, owner, type, and links that leave the directory, each with its reason."""
    good = trust_dir / "good"
    good.write_bytes(b"ok")
    assert read_trusted(good, cap=16) == b"ok"
    expected = _hostile_keys(trust_dir, tmp_path / "outside.pem")
    reasons = {name: _refusal(trust_dir / name, trust_dir) for name in expected}
    assert reasons == {
        "group-writable.pem": "unsafe_mode",
        "world-writable.pub": "unsafe_mode",
        "nobody.pem": "unsafe_owner",
        "fifo.pem": "not_regular",
        "directory.pem": "not_regular",
        "socket.pem": "not_regular",
        "outside.pem": "symlink",
        "escape.pub": "symlink",
        "nobody-link.pem": "unsafe_owner",
    }
    (trust_dir / "link").symlink_to("good")
    assert _refusal(trust_dir / "link") == "symlink"  # no links_within: no link at all
    assert read_trusted(trust_dir / "link", cap=16, links_within=trust_dir) == b"ok"
    big = trust_dir / "big"
    big.write_bytes(b"x" * 2048)
    assert _refusal(big) == "too_large"


def test_links_inside_the_directory_are_followed_and_checked(trust_dir: Path) -> None:
    """Relative and absolute links inside, through sticky or safe directories, are fine;
    loops, an unsafe directory on the way, or a file used as a directory are not."""
    kubelet_mount(trust_dir, {"k.pem": KEY})
    assert read_trusted(trust_dir / "k.pem", cap=4096, links_within=trust_dir) == KEY
    (trust_dir / "abs.pem").symlink_to(trust_dir / "k.pem")
    assert read_trusted(trust_dir / "abs.pem", cap=4096, links_within=trust_dir) == KEY
    alias = trust_dir.parent / "alias"
    alias.symlink_to(trust_dir)
    (trust_dir / "via-alias.pem").symlink_to(alias / "k.pem")
    assert read_trusted(alias / "via-alias.pem", cap=4096, links_within=alias) == KEY
    (trust_dir / "sub").mkdir()
    (trust_dir / "winding.pem").symlink_to("./sub/../k.pem")
    assert read_trusted(trust_dir / "winding.pem", cap=4096, links_within=trust_dir) == KEY
    (trust_dir / "loop.pem").symlink_to("loop.pem")
    assert _refusal(trust_dir / "loop.pem", trust_dir) == "symlink"
    (trust_dir / "up.pem").symlink_to("../trust/k.pem")
    assert _refusal(trust_dir / "up.pem", trust_dir) == "symlink"
    shared = trust_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (shared / "k").write_bytes(KEY)
    (trust_dir / "shared.pem").symlink_to("shared/k")
    assert _refusal(trust_dir / "shared.pem", trust_dir) == "unsafe_mode"
    shared.chmod(0o1777)
    assert read_trusted(trust_dir / "shared.pem", cap=4096, links_within=trust_dir) == KEY
    (trust_dir / "file-as-dir.pem").symlink_to("k.pem/x")
    assert _refusal(trust_dir / "file-as-dir.pem", trust_dir) == "not_regular"
    (trust_dir / "dangling.pem").symlink_to("nothing-here")
    with pytest.raises(FileNotFoundError):
        read_trusted(trust_dir / "dangling.pem", cap=16, links_within=trust_dir)


def test_keyring_codes(trust_dir: Path, tmp_path: Path) -> None:
    """load_keyring maps each refusal to its key code; a good key beside them loads."""
    expected = _hostile_keys(trust_dir, tmp_path / "outside.pem")
    (trust_dir / "good.pem").write_bytes(KEY)
    ring = load_keyring(trust_dir)
    assert list(ring.keys) == ["good"]
    assert {s.path.name: s.code for s in ring.skipped} == expected
    trust_dir.chmod(0o757)
    assert [s.code for s in load_keyring(trust_dir).skipped] == ["keys_dir_insecure"]
    trust_dir.chmod(0o755)
    (trust_dir / "huge.pem").write_bytes(b"x" * (64 * 1024))
    assert {s.path.name: s.code for s in load_keyring(trust_dir).skipped}["huge.pem"] == (
        "key_unreadable"
    )


def _refused(store: TokenStore) -> str | None:
    return store.refused.code if store.refused is not None else None


def test_token_store_keeps_the_tokens_before_a_refusal(tmp_path: Path) -> None:
    """Refused at the first read: no token, the problem said; refused later: the tokens read
    before stay, `refused` says why; fixed: read again."""
    path = tmp_path / "tokens.toml"
    first = write_tokens(path, {"ops": ("plugins:read",)})
    path.chmod(0o620)
    store = TokenStore(path)
    assert _refused(store) == "tokens_file_insecure"
    assert len(store) == 0 and "writable by group or others" in store.problems[0]
    path.chmod(0o600)
    store.reload()
    assert _refused(store) is None
    assert store.authenticate(f"Bearer {first['ops']}") is not None
    path.chmod(0o660)
    assert store.refresh()  # chmod moves ctime: the store looks again
    assert _refused(store) == "tokens_file_insecure"
    assert store.authenticate(f"Bearer {first['ops']}") is not None
    path.unlink()
    os.mkfifo(path)
    store.reload()
    assert _refused(store) == "tokens_file_insecure"
    assert store.authenticate(f"Bearer {first['ops']}") is not None


def test_oversized_tokens_file_is_unreadable(tmp_path: Path) -> None:
    """A tokens file over its cap is refused as unreadable, not parsed."""
    path = tmp_path / "tokens.toml"
    write_tokens_file(path, {})
    with path.open("ab") as fh:
        fh.write(b"#" * (4 * 1024 * 1024 + 1))
    with pytest.raises(TokenFileError) as info:
        read_tokens_file(path)
    assert info.value.code == "tokens_file_unreadable"


async def test_serve_refuses_an_unsafe_tokens_file(env: Env, make_manager: ManagerFactory) -> None:
    """The API component does not start (ConfigError `tokens_file_insecure`) after writing
    `api.tokens.refused`."""
    tokens = env.tmp / "tokens.toml"
    write_tokens(tokens)
    os.chown(tokens, NOBODY, NOBODY)
    manager = await make_manager()
    settings = env.settings(tokens_file=tokens, api_listen="127.0.0.1:0")
    events = env.events()
    with pytest.raises(ConfigError) as info:
        async with serve(settings=settings, events=events, manager=manager, ready=lambda: True):
            pass
    assert info.value.code == "tokens_file_insecure"
    refused = [e for e in env.audit_events() if e["event"] == "api.tokens.refused"]
    assert refused and refused[0]["trigger"] == "startup"
