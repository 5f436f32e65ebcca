"""Hostile manifests: bounded to parse, off the event loop, and always a coded refusal.

A manifest is hostile until its signature is checked. Whatever a YAML or JSON document holds
(aliases, tags, huge numbers, deep nesting, odd encodings, several documents, ...) ends in a
`manifest_*` refusal with an event, never a crash, a 500 or a stalled loop; a daemon with
dozens of them in `plugins.dir` is ready quickly and answers throughout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.core import documents, manifest
from aisoc_plugind.engine import bundle
from aisoc_plugind.engine.loading import read_and_parse
from aisoc_plugind.errors import BundleError, ManifestError
from tests.conftest import Env, PluginFactory
from tests.hardening.hostile import KINDS, head, variants
from tests.hardening.live import wait_ready
from tests.live import LiveDaemon, live_daemon

pytestmark = pytest.mark.timeout(180)

GOOD = head(0)
HOSTILE = 50
READY_S = 60.0  # generous for a busy 2-core machine; it takes a few seconds


def _codes(data: bytes, source: str = "plugin.yaml") -> set[str]:
    with pytest.raises(ManifestError) as info:
        manifest.parse(data, source)
    return {p.code for p in info.value.problems}


def _stage_hostile(plugins: Path, count: int) -> dict[Path, str]:
    """Write `count` hostile plugin directories; return {directory: kind}."""
    made = {}
    for i, (kind, name, data) in enumerate(variants(count)):
        path = plugins / f"hostile-{i:03d}-{kind}"
        path.mkdir()
        (path / name).write_bytes(data)
        (path / "plugin.py").write_text(
            "class Plugin:\n    def run(self, p, c):\n        return {}\n"
        )
        made[path] = kind
    return made


def _failures_by_path(daemon: LiveDaemon) -> dict[str, str]:
    return {
        e["path"]: e["error_code"] for e in daemon.events("plugin.load.failed") if e.get("path")
    }


# ---- the real daemon -----------------------------------------------------------------------


def test_ready_quickly_with_fifty_hostile_manifests(
    tmp_path: Path, plugins: PluginFactory, env: Env
) -> None:
    """50 hostile directories of every kind: READY in seconds, each refused with a
    manifest code and an event, and the good plugin beside them serves."""
    plugins.write("good", plugin_id="acme.good")
    hostile = _stage_hostile(env.plugins, HOSTILE)
    started = time.monotonic()
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, wait_ready=False) as d:
        ready = wait_ready(d, READY_S)
        took = time.monotonic() - started
        failures = _failures_by_path(d)
        assert ready["plugins"] == 1, ready  # the hostile ones never had an id
        for path, kind in hostile.items():
            assert failures.get(str(path), "").startswith("manifest_"), (kind, failures)
        assert d.request("POST", "/api/v1/plugins/acme.good/run", {"payload": {}})[0] == 200
        assert d.request("GET", "/healthz")[0] == 200
    assert took < READY_S


def test_the_loop_answers_while_hostile_manifests_are_parsed(
    tmp_path: Path, plugins: PluginFactory, env: Env
) -> None:
    """While a discovery parses 50 hostile manifests (warn mode, so nothing short-cuts on
    the signature), /healthz keeps answering and the discovery answers every failure."""
    plugins.write("good", plugin_id="acme.good")
    with live_daemon(
        tmp_path / "d", plugins=env.plugins, keys=env.keys, trust_extra='mode = "warn"\n'
    ) as d:
        hostile = _stage_hostile(env.plugins, HOSTILE)
        box: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: box.update(
                answer=d.request("POST", "/api/v1/plugins/discover", timeout=READY_S)
            )
        )
        worker.start()
        slowest = 0.0
        while worker.is_alive():
            sent = time.monotonic()
            assert d.request("GET", "/healthz", timeout=10)[0] == 200
            slowest = max(slowest, time.monotonic() - sent)
            time.sleep(0.05)
        worker.join()
        status, body = box["answer"]
        assert status == 200, body
        assert {f["path"] for f in body["failed"]} == {str(p) for p in hostile}
        assert all(f["code"].startswith("manifest_") for f in body["failed"]), body
        assert slowest < 5.0


def test_a_hostile_manifest_dropped_in_is_refused_by_the_watcher(
    tmp_path: Path, plugins: PluginFactory, env: Env
) -> None:
    """The watcher's path: a new hostile directory fails with a manifest code; a serving
    plugin whose manifest turns hostile keeps serving (plugin.reload.failed)."""
    serving = plugins.write("good", plugin_id="acme.good")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, watch=True) as d:
        _, name, data = variants(1)[0]
        new = env.plugins / "dropped"
        new.mkdir()
        (new / "plugin.py").write_text("class Plugin:\n    pass\n")
        (new / name).write_bytes(data)
        failed = d.wait_for("plugin.load.failed", path=str(new), timeout=30)
        assert failed[0]["error_code"] == "manifest_too_deep"
        (serving / "plugin.yaml").write_bytes(KINDS["alias_bomb"](3)[1])
        reload_failed = d.wait_for("plugin.reload.failed", plugin_id="acme.good", timeout=30)
        assert reload_failed[0]["error_code"] == "manifest_bad_syntax"
        assert d.request("POST", "/api/v1/plugins/acme.good/run", {"payload": {}})[0] == 200
        assert d.proc.poll() is None


def test_reload_of_a_hostile_manifest_is_a_409_and_the_old_version_serves(
    tmp_path: Path, plugins: PluginFactory, env: Env
) -> None:
    """POST /reload over each kind of hostile manifest: 409 with the manifest code, never a
    500; the signed version keeps serving."""
    path = plugins.write("good", plugin_id="acme.good")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys) as d:
        for kind, make in KINDS.items():
            name, data = make(7)
            for other in manifest.MANIFEST_NAMES:
                (path / other).unlink(missing_ok=True)
            (path / name).write_bytes(data)
            status, body = d.request("POST", "/api/v1/plugins/acme.good/reload", {})
            assert status == 409, (kind, body)
            assert body["error"]["code"].startswith("manifest_"), (kind, body)
            assert body["detail"] == body["error"]["message"]
        status, _ = d.request("POST", "/api/v1/plugins/acme.good/run", {"payload": {}})
        assert status == 200
        assert d.events("api.error") == []


def test_a_fifo_manifest_never_hangs_the_daemon(
    tmp_path: Path, plugins: PluginFactory, env: Env
) -> None:
    """A FIFO named plugin.yaml (or aisoc-plugin.json) is refused by type; nothing blocks."""
    for name in manifest.MANIFEST_NAMES:
        fifo_dir = env.plugins / f"fifo-{name}"
        fifo_dir.mkdir()
        os.mkfifo(fifo_dir / name)
    plugins.write("good", plugin_id="acme.good")
    with live_daemon(tmp_path / "d", plugins=env.plugins, keys=env.keys, wait_ready=False) as d:
        ready = wait_ready(d, READY_S)
        assert ready["plugins"] == 1, ready
        codes = {e["error_code"] for e in d.events("plugin.load.failed")}
        assert codes == {"bundle_not_regular"}
        status, body = d.request("POST", "/api/v1/plugins/discover")
        assert status == 200 and len(body["failed"]) == 2


# ---- in process: the parser's bounds, branch by branch --------------------------------------


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ("x: " + "[" * 65 + "]" * 65, "manifest_too_deep"),  # the pre-pass
        ("x: '" + "{" * 65 + "'", "manifest_too_deep"),  # counted even inside a string
        ("".join("  " * n + f"k{n}:\n" for n in range(70)) + "  " * 70 + "v", "manifest_too_deep"),
        ("x: [" + "1, " * documents.MAX_NODES + "1]", "manifest_too_large"),
        ("n: " + "1" * (documents.MAX_INT_DIGITS + 1), "manifest_bad_field"),
        ("n: 0x" + "f" * 4000, "manifest_bad_field"),  # short text, too many bits
        ("n: " + "59:" * 2000 + "1", "manifest_bad_field"),  # base 60, by length
        ("f: 1." + "1" * 5000, "manifest_bad_field"),
        ("n: -" + "9" * documents.MAX_INT_DIGITS + "9", "manifest_bad_field"),
        ("d: 2024-13-45", "manifest_bad_syntax"),
        ("d: 2024-02-30 10:99:00", "manifest_bad_syntax"),
        ("d: !!timestamp nonsense", "manifest_bad_syntax"),
        ("b: !!bool maybe", "manifest_bad_syntax"),
        ("i: !!int zero", "manifest_bad_syntax"),
        ("i: !!int '0x'", "manifest_bad_syntax"),
        ("f: !!float many", "manifest_bad_syntax"),
        ("s: !!set [a]", "manifest_unsafe_yaml"),
        ("m: !!map [a]", "manifest_unsafe_yaml"),
        ("m: !!seq {a: 1}", "manifest_unsafe_yaml"),
        ("p: !!pairs [a: 1]", "manifest_unsafe_yaml"),
        ("o: !!omap [a: 1]", "manifest_unsafe_yaml"),
        ("x: !local thing", "manifest_unsafe_yaml"),
        ("x: !!python/tuple [1]", "manifest_unsafe_yaml"),
        ("x: !<tag:example.com,2000:app/x> y", "manifest_unsafe_yaml"),
        ("? [a]\n: b", "manifest_unsafe_yaml"),
        ("1: one", "manifest_bad_field"),
        ("~: nothing", "manifest_bad_field"),
        ("n: .nan", "manifest_bad_field"),
        ("n: -.inf", "manifest_bad_field"),
        ("n: 1.0e+999", "manifest_bad_field"),
        ("---\nid: again", "manifest_bad_syntax"),
        ("x: a\x00b", "manifest_bad_syntax"),
        ("? " * 2000 + "k", "manifest_too_deep"),  # libyaml's own nesting bound
        ("x: a\tb: c", "manifest_bad_syntax"),
    ],
)
def test_yaml_oddities_are_coded_refusals(extra: str, code: str) -> None:
    """Each oddity of YAML is one coded problem (several collapse to manifest_invalid)."""
    assert _codes((GOOD + extra + "\n").encode()) == {code}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"a": ' + "[" * 65 + "]" * 65 + "}", "manifest_too_deep"),
        ('{"a": [' + "1," * documents.MAX_NODES + "1]}", "manifest_too_large"),
        ('{"n": ' + "9" * 5000 + "}", "manifest_bad_field"),  # as in YAML: a value too big
        ('{"n": -' + "9" * (documents.MAX_INT_DIGITS + 1) + "}", "manifest_bad_field"),
        ('{"n": [1, 2, ' + "1" * (documents.MAX_INT_DIGITS + 1) + "]}", "manifest_bad_field"),
        ('{"n": NaN}', "manifest_bad_syntax"),
        ('{"n": -Infinity}', "manifest_bad_syntax"),
        ('{"a": 1, "a": 2}', "manifest_duplicate_key"),
        ("\ufeff{}", "manifest_bad_syntax"),
        ("[1, 2]", "manifest_not_mapping"),
        ('"id"', "manifest_not_mapping"),
        ("", "manifest_bad_syntax"),
        ('{"a": 1}{"b": 2}', "manifest_bad_syntax"),
    ],
)
def test_json_oddities_are_coded_refusals(text: str, code: str) -> None:
    """The legacy JSON manifest gets the same bounds as YAML."""
    assert _codes(text.encode(), "aisoc-plugin.json") == {code}


def test_documents_within_the_bounds_load() -> None:
    """64 levels, just under the node bound and a 4300-digit int are fine."""
    deep = manifest.parse((GOOD + "x: " + "[" * 63 + "]" * 63 + "\n").encode())
    assert "x" in deep.plain
    wide = manifest.parse((GOOD + "x: [" + "1, " * 4000 + "1]\n").encode())
    assert len(wide.plain["x"]) == 4001
    big = manifest.parse((GOOD + "n: " + "9" * documents.MAX_INT_DIGITS + "\n").encode())
    assert big.as_json()["n"] > 0
    as_json = {**manifest.parse(GOOD.encode()).as_json(), "n": 0}
    text = json.dumps(as_json).replace('"n": 0', '"n": -' + "9" * documents.MAX_INT_DIGITS)
    assert manifest.parse(text.encode(), "aisoc-plugin.json").as_json()["n"] < 0
    assert manifest.parse((GOOD + "s: !!str 12\ni: !!int '7'\n").encode()).plain["s"] == "12"


def test_an_unexpected_parser_error_is_a_manifest_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a parser raises (here an injected TypeError) ends as manifest_bad_syntax."""

    def broken(text: str, source: str) -> Any:
        raise TypeError("a bug in a parser we do not control")

    monkeypatch.setattr(manifest, "load_document", broken)
    assert _codes(GOOD.encode()) == {"manifest_bad_syntax"}


def test_an_oversized_manifest_file_is_manifest_too_large(plugins: PluginFactory) -> None:
    """The reader refuses a manifest over the cap before any parser sees it."""
    path = plugins.write("big", sign=False)
    (path / "plugin.yaml").write_bytes(GOOD.encode() + b"#" * manifest.MAX_MANIFEST_BYTES)
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(path)
    assert info.value.code == "manifest_too_large"


async def test_reading_a_manifest_runs_off_the_event_loop(plugins: PluginFactory) -> None:
    """Preparer.read parses in a worker thread (the loop's thread never parses)."""
    path = plugins.write("good")
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = manifest.validate

    def spy(*args: Any, **kwargs: Any) -> manifest.Manifest:
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest, "validate", spy)
        _, parsed = await anyio.to_thread.run_sync(read_and_parse, path)
    assert parsed.id == "test.good"
    assert seen and loop_thread not in seen


def test_read_and_parse_turns_os_errors_into_bundle_errors(tmp_path: Path) -> None:
    """A directory that cannot be listed is bundle_unreadable, not an OSError."""
    path = tmp_path / "p"
    path.mkdir()
    (path / "plugin.yaml").write_text(GOOD)
    sub = path / "sub"
    sub.mkdir()
    (sub / "x.py").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bundle, "read_bundle", _raise_oserror)
        mp.setattr("aisoc_plugind.engine.loading.read_bundle", _raise_oserror)
        with pytest.raises(BundleError) as info:
            read_and_parse(path)
    assert info.value.code == "bundle_unreadable"


def _raise_oserror(path: Path) -> Any:
    raise PermissionError(13, "Permission denied")
