"""Revocation (INTERFACE §10) against real daemon processes, real files and real signals.

Revoking a key or a digest disables the plugins it covers within a second of the file
changing (asserted here only as "within a few seconds": CI machines are slow), with
`plugin.revoked`; removing the entry restores them; SIGHUP re-reads the file; a broken file
keeps the last good list and says so with a `revoked_file_*` code.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest

from aisoc_plugind.core.signing import private_key_pem, public_key_pem
from tests.conftest import VECTOR_PUB, PluginFactory
from tests.live import LiveDaemon, live_daemon, wait_until

# Long end-to-end scenarios: the main test run has them; the interpreter and
# dependency-floor runs of scripts/test.sh skip them (-m 'not slow').
pytestmark = pytest.mark.slow

A, B = "test.a", "test.b"  # a: signed by vector-signer; b: signed by the second key
FEW_SECONDS = 5.0


@pytest.fixture
def factory(tmp_path: Path) -> PluginFactory:
    """A plugins dir, a keys dir with the vector key and a second key, under tmp_path."""
    (tmp_path / "plugins").mkdir()
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    second = nacl.signing.SigningKey.generate()
    (keys / "second.pem").write_bytes(public_key_pem(second.verify_key))
    (tmp_path / "second.key").write_bytes(private_key_pem(second))
    return PluginFactory(tmp_path / "plugins")


def _write_plugins(tmp_path: Path, factory: PluginFactory) -> None:
    factory.write("a")
    factory.write("b", key_file=tmp_path / "second.key")


def _revoke(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace the revocation file atomically (what an operator's tooling should do)."""
    tmp = path.with_name(".revoked.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _start(tmp_path: Path, trust: str = "") -> Iterator[LiveDaemon]:
    with live_daemon(
        tmp_path / "daemon", plugins=tmp_path / "plugins", keys=tmp_path / "keys", trust_extra=trust
    ) as daemon:
        yield daemon


@pytest.fixture
def daemon(tmp_path: Path, factory: PluginFactory) -> Iterator[LiveDaemon]:
    """A strict daemon serving `a` and `b`; its revocation file does not exist yet."""
    _write_plugins(tmp_path, factory)
    yield from _start(tmp_path)


def _revoked_path(daemon: LiveDaemon) -> Path:
    return daemon.root / "revoked.toml"


def _record(daemon: LiveDaemon, plugin_id: str) -> dict[str, object]:
    status, body = daemon.request("GET", f"/api/v1/plugins/{plugin_id}")
    assert status == 200, body
    return dict(body)


def _run(daemon: LiveDaemon, plugin_id: str) -> int:
    status, _ = daemon.request("POST", f"/api/v1/plugins/{plugin_id}/run", {"payload": {}})
    return status


def _timed(daemon: LiveDaemon, name: str, **fields: object) -> tuple[dict[str, object], float]:
    """Wait for an event; return it and how long the wait took."""
    started = time.monotonic()
    event = daemon.wait_for(name, timeout=FEW_SECONDS * 2, **fields)[-1]
    return event, time.monotonic() - started


def test_revoking_a_key_disables_its_plugins_and_removing_it_restores_them(
    daemon: LiveDaemon,
) -> None:
    """`keys = ["vector-signer"]` disables `a` within a few seconds; `b` serves on; the
    entry removed, `a` is re-verified, reloaded and enabled again."""
    assert _run(daemon, A) == 200
    _revoke(_revoked_path(daemon), 'keys = ["vector-signer"]\n')
    event, took = _timed(daemon, "plugin.revoked", plugin_id=A)
    assert took < FEW_SECONDS
    assert (event["reason"], event["from_state"], event["to_state"]) == (
        "key_revoked",
        "enabled",
        "disabled",
    )
    assert event["signing_key_id"] == "vector-signer"
    record = _record(daemon, A)
    assert (record["state"], record["signature_status"]) == ("disabled", "revoked")
    assert _run(daemon, A) == 409
    assert _run(daemon, B) == 200
    status, body = daemon.request("POST", f"/api/v1/plugins/{A}/enable")
    assert (status, body["error"]["code"]) == (409, "plugin_revoked")
    changed = daemon.wait_for("trust.revocations.changed")[-1]
    assert changed["keys"] == ["vector-signer"] and changed["plugins_revoked"] == [A]

    _revoke(_revoked_path(daemon), "keys = []\n")
    _, took = _timed(daemon, "plugin.enabled", plugin_id=A, from_state="disabled")
    assert took < FEW_SECONDS
    wait_until(lambda: _run(daemon, A) == 200 or None, FEW_SECONDS, "a serving again")
    record = _record(daemon, A)
    assert (record["state"], record["signature_status"]) == ("enabled", "verified")
    assert daemon.wait_for("trust.revocations.changed", plugins_restored=[A])


def test_revoking_a_digest_disables_that_build_only(daemon: LiveDaemon) -> None:
    """A revoked canonical digest disables the plugin with that digest, and a plain reload
    of the same build is refused as `signature_revoked`."""
    digest = _record(daemon, B)["digest"]
    _revoke(_revoked_path(daemon), f'digests = ["{digest}"]\n')
    event, took = _timed(daemon, "plugin.revoked", plugin_id=B)
    assert took < FEW_SECONDS
    assert (event["reason"], event["digest"]) == ("digest_revoked", digest)
    assert _run(daemon, B) == 409
    assert _run(daemon, A) == 200
    status, body = daemon.request("POST", f"/api/v1/plugins/{B}/reload")
    assert (status, body["error"]["code"]) == (409, "signature_revoked")
    _revoke(_revoked_path(daemon), "digests = []\n")
    daemon.wait_for("plugin.enabled", plugin_id=B, from_state="disabled")
    assert _run(daemon, B) == 200


def test_a_disabled_plugin_stays_disabled_when_restored(daemon: LiveDaemon) -> None:
    """The restore re-enables only what the revocation disabled."""
    assert daemon.request("POST", f"/api/v1/plugins/{A}/disable")[0] == 200
    _revoke(_revoked_path(daemon), 'keys = ["vector-signer"]\n')
    event = daemon.wait_for("plugin.revoked", plugin_id=A)[-1]
    assert (event["from_state"], event["to_state"]) == ("disabled", "disabled")
    _revoke(_revoked_path(daemon), "")
    daemon.wait_for("trust.revocations.changed", plugins_restored=[A])
    record = _record(daemon, A)
    assert (record["state"], record["signature_status"]) == ("disabled", "verified")


def test_warn_mode_refuses_revoked_plugins_at_start_and_loads_them_once_lifted(
    tmp_path: Path, factory: PluginFactory
) -> None:
    """Read at start: in warn mode a plugin signed only by a revoked key is refused
    (`revoked`, not loaded as `invalid`); lifting the entry loads it."""
    _write_plugins(tmp_path, factory)
    revoked = tmp_path / "revoked.toml"
    _revoke(revoked, 'keys = ["second"]\n')
    trust = f'mode = "warn"\nrevoked_file = "{revoked}"\n'
    for daemon in _start(tmp_path, trust):
        record = _record(daemon, B)
        assert (record["state"], record["signature_status"]) == ("failed", "revoked")
        assert record["error"]["code"] == "signature_revoked"  # type: ignore[index]
        refusal = daemon.events("plugin.revoked")[0]
        assert (refusal["decision"], refusal["reason"]) == ("refuse", "key_revoked")
        assert _record(daemon, A)["state"] == "enabled"
        _revoke(revoked, "keys = []\n")
        daemon.wait_for("plugin.enabled", plugin_id=B)
        assert _record(daemon, B)["signature_status"] == "verified"


def test_sighup_rereads_the_file(daemon: LiveDaemon) -> None:
    """SIGHUP reads the file again even when nothing says it changed (a bad file is
    reported again, the good list stays)."""
    path = _revoked_path(daemon)
    _revoke(path, "keys = [\n")
    daemon.wait_for("trust.revocations.failed", error_code="revoked_file_unparseable")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("trust.revocations.failed", count=2, error_code="revoked_file_unparseable")
    assert _run(daemon, A) == 200


@pytest.mark.parametrize(
    ("text", "mode", "code"),
    [
        ("keys = [\n", 0o600, "revoked_file_unparseable"),
        ('keys = "vector-signer"\n', 0o600, "revoked_file_invalid"),
        ('key = ["second"]\n', 0o600, "revoked_file_invalid"),
        ('keys = ["second"]\n', 0o666, "revoked_file_unsafe"),
        ('keys = ["second"]\n', 0o000, "revoked_file_unreadable"),
    ],
)
def test_a_bad_file_keeps_the_last_good_list(
    daemon: LiveDaemon, text: str, mode: int, code: str
) -> None:
    """Fail closed: the last good list stays in force, the event has a code, the daemon
    serves on; fixing the file applies it."""
    if mode == 0 and os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = _revoked_path(daemon)
    _revoke(path, 'keys = ["vector-signer"]\n')
    daemon.wait_for("plugin.revoked", plugin_id=A)
    _revoke(path, text, mode=mode)
    failed = daemon.wait_for("trust.revocations.failed", error_code=code)[-1]
    assert failed["keys"] == ["vector-signer"]  # the list that stays in force
    assert _record(daemon, A)["signature_status"] == "revoked"
    assert _run(daemon, B) == 200
    assert daemon.request("GET", "/healthz")[0] == 200
    _revoke(path, "keys = []\n")
    daemon.wait_for("plugin.enabled", plugin_id=A, from_state="disabled")
    assert daemon.proc.poll() is None


def test_a_symlinked_file_is_refused(daemon: LiveDaemon, tmp_path: Path) -> None:
    """The revocation file is read without following a link, like every trust file."""
    target = tmp_path / "elsewhere.toml"
    target.write_text('keys = ["vector-signer"]\n')
    os.symlink(target, _revoked_path(daemon))
    daemon.wait_for("trust.revocations.failed", error_code="revoked_file_unsafe")
    assert _run(daemon, A) == 200


def test_an_in_place_edit_is_seen(daemon: LiveDaemon) -> None:
    """An editor writing the file in place (truncate, write) is seen as well."""
    path = _revoked_path(daemon)
    path.write_text("")
    path.chmod(0o600)
    with path.open("w") as fh:
        fh.write('keys = ["second"]\n')
    daemon.wait_for("plugin.revoked", plugin_id=B)
    assert _run(daemon, A) == 200
