"""Signature events say what the seed says: `plugin.signature.unsigned` means an unsigned
plugin *loaded*.

A real daemon per trust mode holds unsigned, invalid (tampered after signing), untrusted
(another key) and verified plugins, each once with code that loads and once with code that
fails at import. `plugin.signature.unsigned` appears exactly for the unsigned plugins that
loaded (warn mode), after the host loaded them; a strict refusal is `plugin.load.failed` with
`signature_unsigned` and nothing else. `verified`, `invalid` and `skipped` are trust decisions:
written when made, whatever the load then does (`decision` says `load` or `refuse`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from aisoc_plugind.core.signing import private_key_pem
from tests.conftest import VECTOR_PUB, sign_dir
from tests.live import LiveDaemon, live_daemon

SIGNATURES = ("unsigned", "invalid", "untrusted", "verified")
FATES = ("loads", "broken")
GOOD = "class Plugin:\n    def run(self, payload, context):\n        return {'ok': True}\n"
BROKEN = "raise SystemExit('no')\n" + GOOD
EVENT_OF = {
    "verified": "plugin.signature.verified",
    "invalid": "plugin.signature.invalid",
    "skipped": "plugin.signature.skipped",
    "unsigned": "plugin.signature.unsigned",
}
ALL_SIGNATURE_EVENTS = set(EVENT_OF.values())


def _write(root: Path, plugin_id: str, code: str, signature: str, other_key: Path) -> Path:
    path = root / plugin_id
    path.mkdir(exist_ok=True)
    manifest = {"id": plugin_id, "name": plugin_id, "version": "1.0.0", "plugin_type": "widget"}
    (path / "plugin.yaml").write_text(json.dumps(manifest))
    (path / "plugin.py").write_text(code)
    (path / "plugin.sig").unlink(missing_ok=True)
    if signature == "untrusted":
        sign_dir(path, other_key)
    elif signature in ("verified", "invalid"):
        sign_dir(path)
    if signature == "invalid":  # signed, then changed
        (path / "plugin.py").write_text(code + "# changed after signing\n")
    return path


def expected(mode: str, signature: str, fate: str) -> dict[str, Any]:
    """What the contract says for a plugin: state, error code, status, events."""
    status = "skipped" if mode == "disabled" else signature.replace("untrusted", "invalid")
    refused = mode == "strict" and status in ("unsigned", "invalid")
    loaded = not refused and fate == "loads"
    code = None
    if refused:
        code = f"signature_{status}"
    elif fate == "broken":
        code = "plugin_import_failed"
    events = {EVENT_OF[status]} if status != "unsigned" or loaded else set()
    return {
        "state": "enabled" if loaded else "failed",
        "code": code,
        "status": status,
        "events": events,
        "decision": "refuse" if refused else "load",
    }


@pytest.fixture(scope="module", params=["strict", "warn", "disabled"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LiveDaemon]]:
    """A daemon in one trust mode over every signature x fate."""
    mode = str(request.param)
    root = tmp_path_factory.mktemp(f"seed-{mode}")
    plugins, keys = root / "plugins", root / "keys"
    plugins.mkdir()
    keys.mkdir()
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    other = root / "other.key"
    other.write_bytes(private_key_pem(nacl.signing.SigningKey.generate()))
    for signature in SIGNATURES:
        for fate in FATES:
            code = GOOD if fate == "loads" else BROKEN
            _write(plugins, f"seed.{signature}.{fate}", code, signature, other)
    _write(plugins, "seed.reload", GOOD, "unsigned", other)
    with live_daemon(
        root / "daemon", plugins=plugins, keys=keys, trust_extra=f'mode = "{mode}"\n'
    ) as daemon:
        yield mode, daemon
        assert daemon.proc.poll() is None


def _of(daemon: LiveDaemon, plugin_id: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("plugin_id") == plugin_id]


@pytest.mark.parametrize("fate", FATES)
@pytest.mark.parametrize("signature", SIGNATURES)
def test_signature_events_follow_the_contract(
    seeded: tuple[str, LiveDaemon], signature: str, fate: str
) -> None:
    """Each plugin ends in the contract's state and code, with exactly the signature events
    the contract gives (an unsigned one only when it loaded, before `plugin.loaded`)."""
    mode, daemon = seeded
    plugin_id = f"seed.{signature}.{fate}"
    want = expected(mode, signature, fate)
    status, record = daemon.request("GET", f"/api/v1/plugins/{plugin_id}")
    assert status == 200
    assert record["state"] == want["state"]
    assert (record["error"] or {}).get("code") == want["code"]
    assert record["signature_status"] == want["status"]
    mine = _of(daemon, plugin_id)
    names = [e["event"] for e in mine]
    assert set(names) & ALL_SIGNATURE_EVENTS == want["events"], names
    for event in mine:
        if event["event"] in ALL_SIGNATURE_EVENTS:
            assert event["decision"] == want["decision"]
            assert names.count(event["event"]) == 1
    if want["state"] == "failed":
        failed = next(e for e in mine if e["event"] == "plugin.load.failed")
        assert failed["error_code"] == want["code"]
        assert failed["signature_status"] == want["status"]
    else:
        signed = next(e for e in mine if e["event"] in want["events"])
        assert signed["seq"] < next(e["seq"] for e in mine if e["event"] == "plugin.loaded")


def test_a_reload_announces_an_unsigned_version_only_when_it_loads(
    seeded: tuple[str, LiveDaemon],
) -> None:
    """Reloading an unsigned plugin to code that fails adds no `plugin.signature.unsigned`;
    in warn mode the reload that succeeds adds one, before `plugin.reload.completed`; in
    strict mode every attempt is refused with `signature_unsigned` and none appears."""
    mode, daemon = seeded
    path = daemon.root.parent / "plugins" / "seed.reload"
    loads = {"strict": 0, "warn": 1, "disabled": 0}[mode]  # unsigned events per good load

    def unsigned_events() -> list[dict[str, Any]]:
        mine = _of(daemon, "seed.reload")
        return [e for e in mine if e["event"] == "plugin.signature.unsigned"]

    assert len(unsigned_events()) == loads
    (path / "plugin.py").write_text(BROKEN)
    status, body = daemon.request("POST", "/api/v1/plugins/seed.reload/reload")
    refused = "signature_unsigned" if mode == "strict" else "plugin_import_failed"
    assert (status, body["error"]["code"]) == (409, refused)
    assert len(unsigned_events()) == loads
    (path / "plugin.py").write_text(GOOD + "# v2\n")
    status, body = daemon.request("POST", "/api/v1/plugins/seed.reload/reload")
    if mode == "strict":
        assert (status, body["error"]["code"]) == (409, "signature_unsigned")
        assert unsigned_events() == []
        return
    assert status == 200
    done = daemon.wait_for("plugin.reload.completed", plugin_id="seed.reload")[0]
    assert len(unsigned_events()) == 2 * loads
    if loads:
        assert unsigned_events()[-1]["seq"] < done["seq"]
