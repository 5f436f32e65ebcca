"""Run the attacks corpus: every hostile plugin or manifest, in every trust mode, for real.

`tests/fixtures/attacks/<case>/` holds one attack (see the README there): `plugin/` lands in
`plugins.dir` as `<case>/` (signed with the test vector key when `sign = true`), an optional
`decoy/` as `0-<case>/` (so it sorts, and is scanned, first), and `expect.toml` says what must
hold in each trust mode. One real daemon per trust mode (module-scoped) loads every case at
once; then one test per (case, mode) checks its expectations, and a last test per mode checks
that the daemon is still alive and answering, and that no plugin configuration value (each
case's plugin gets a `SECRET-SENTINEL-<case>` value) shows in its stdout, its audit file or
any API answer. Cases are picked up from whatever directories exist.

Expectations of a mode (all optional but `state`): `state` (the record state of the case's
plugin id, "absent" for no record), `error_code` (the record's error code; with no record,
that of the `plugin.load.failed` events of the case's directories), `events` and
`absent_events` (event names that must or must not appear for the plugin id, or for the
case's directories when the manifest never parsed), `signature_status`, `path` ("plugin" or
"decoy": which directory owns the id), `manifest_keys` (exactly the keys the record's
`manifest` shows), `run_status` / `run_code` (what `POST /run` answers).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.errors import ManifestError
from tests.conftest import VECTOR_PUB, sign_dir
from tests.hardening.live import wait_ready
from tests.live import LiveDaemon, live_daemon

pytestmark = pytest.mark.timeout(300)  # the first test of a mode starts its daemon

ATTACKS = Path(__file__).resolve().parents[1] / "fixtures" / "attacks"
MODES = ("strict", "warn", "disabled")
SENTINEL = "SECRET-SENTINEL-"
READY_S = 120.0  # a cold start over the whole corpus on a busy 2-core machine
TOP_KEYS = frozenset({"description", "sign", "sign_decoy", "plugin_id", "config", *MODES})
MODE_KEYS = frozenset(
    {
        "state",
        "error_code",
        "events",
        "absent_events",
        "signature_status",
        "path",
        "manifest_keys",
        "run_status",
        "run_code",
    }
)
STATES = frozenset({"absent", "discovered", "loaded", "enabled", "disabled", "unloaded", "failed"})


@dataclass(frozen=True)
class Case:
    """One directory of the corpus."""

    name: str
    root: Path
    expect: dict[str, Any]
    plugin_id: str | None  # what the manifest declares (or `plugin_id`); None: it is hostile

    @property
    def config(self) -> dict[str, Any]:
        """Return the plugin configuration the runner gives the case's plugin id."""
        return {"secret": f"{SENTINEL}{self.name}", **self.expect.get("config", {})}

    def dirs(self, plugins: Path) -> dict[str, Path]:
        """Return where `plugin/` (and `decoy/`) land under `plugins`."""
        out = {"plugin": plugins / self.name}
        if (self.root / "decoy").is_dir():
            out["decoy"] = plugins / f"0-{self.name}"
        return out


def manifest_id(directory: Path) -> str | None:
    """Return the id of the manifest in `directory`, as the daemon parses it, or None."""
    for name in manifest_mod.MANIFEST_NAMES:
        path = directory / name
        if path.is_file():
            try:
                return manifest_mod.parse(path.read_bytes(), name).id
            except ManifestError:
                return None
    return None


def load_cases() -> list[Case]:
    """Return every case of the corpus, sorted by name."""
    cases = []
    for root in sorted(p for p in ATTACKS.iterdir() if p.is_dir()):
        expect = tomllib.loads((root / "expect.toml").read_text())
        given = expect.get("plugin_id")
        plugin_id = str(given) if given else manifest_id(root / "plugin")
        cases.append(Case(name=root.name, root=root, expect=expect, plugin_id=plugin_id))
    return cases


CASES = load_cases()
PAIRS = [(mode, case) for mode in MODES for case in CASES]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def plugin_config(cases: list[Case]) -> str:
    """Return the `[plugin_config."<id>"]` tables of every case whose id is known."""
    tables = []
    for case in cases:
        if case.plugin_id is not None:
            lines = "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in case.config.items())
            tables.append(f'[plugin_config."{case.plugin_id}"]\n{lines}')
    return "\n".join(tables)


def stage(cases: list[Case], plugins: Path) -> None:
    """Copy every case's directories into `plugins`, signing those that ask for it."""
    for case in cases:
        for kind, target in case.dirs(plugins).items():
            shutil.copytree(case.root / kind, target)
            if case.expect.get("sign" if kind == "plugin" else "sign_decoy", False):
                sign_dir(target)


@dataclass
class Fleet:
    """One daemon per trust mode over the whole corpus, started on first use."""

    base: Path
    stack: ExitStack
    daemons: dict[str, LiveDaemon] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)  # every API answer, per mode

    def daemon(self, mode: str) -> LiveDaemon:
        if mode not in self.daemons:
            root = self.base / mode
            plugins, keys = root / "plugins", root / "keys"
            plugins.mkdir(parents=True)
            keys.mkdir()
            shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
            stage(CASES, plugins)
            started = self.stack.enter_context(
                live_daemon(
                    root,
                    plugins=plugins,
                    keys=keys,
                    wait_ready=False,
                    trust_extra=f'mode = "{mode}"\n',
                    extra=plugin_config(CASES),
                )
            )
            wait_ready(started, READY_S)
            self.daemons[mode] = started
        return self.daemons[mode]

    def call(self, mode: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send a request to that mode's daemon; keep the answer for the secrets check."""
        status, answer = self.daemon(mode).request(method, path, body, timeout=30)
        self.answers.setdefault(mode, []).append(json.dumps(answer))
        return status, answer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(base=tmp_path_factory.mktemp("attacks"), stack=stack)


def test_the_corpus_is_well_formed() -> None:
    """Every case has a plugin/, all three modes, a known state and only known keys."""
    assert CASES, "no attack cases found"
    for case in CASES:
        assert (case.root / "plugin").is_dir(), case.name
        assert set(case.expect) <= TOP_KEYS, (case.name, set(case.expect) - TOP_KEYS)
        for mode in MODES:
            wanted = case.expect[mode]
            assert set(wanted) <= MODE_KEYS, (case.name, mode, set(wanted) - MODE_KEYS)
            assert wanted["state"] in STATES, (case.name, mode)
    ids = [c.plugin_id for c in CASES if c.plugin_id is not None]
    assert len(ids) == len(set(ids)), "two cases share a plugin id"


def _case_events(daemon: LiveDaemon, case: Case, plugins: Path) -> list[dict[str, Any]]:
    """Return the events of the case: by plugin id, or by directory when it has none."""
    plugin_id = case.plugin_id
    paths = {str(p) for p in case.dirs(plugins).values()}
    events = daemon.events()
    if plugin_id is not None:
        return [e for e in events if e.get("plugin_id") == plugin_id]
    return [e for e in events if e.get("path") in paths]


@pytest.mark.parametrize(("mode", "case"), PAIRS, ids=[f"{m}-{c.name}" for m, c in PAIRS])
def test_attack(fleet: Fleet, mode: str, case: Case) -> None:
    """The case ends as its expect.toml says for this trust mode."""
    wanted = case.expect[mode]
    daemon = fleet.daemon(mode)
    plugins = daemon.root / "plugins"
    record = _record(fleet, mode, case)
    events = _case_events(daemon, case, plugins)
    names = {e["event"] for e in events}
    if wanted["state"] == "absent":
        assert record is None, record
        if "error_code" in wanted:
            failures = [e for e in events if e["event"] == "plugin.load.failed"]
            assert failures, events
            assert {e.get("error_code") for e in failures} == {wanted["error_code"]}, failures
    else:
        assert record is not None, f"no record for {case.plugin_id}: {events}"
        _check_record(record, wanted, case.dirs(plugins))
    assert set(wanted.get("events", [])) <= names, (wanted.get("events"), sorted(names))
    assert not set(wanted.get("absent_events", [])) & names, sorted(names)
    if "run_status" in wanted:
        status, body = fleet.call(
            mode, "POST", f"/api/v1/plugins/{case.plugin_id}/run", {"payload": {"probe": 1}}
        )
        assert status == wanted["run_status"], body
        if "run_code" in wanted:
            assert body["error"]["code"] == wanted["run_code"], body


def _record(fleet: Fleet, mode: str, case: Case) -> dict[str, Any] | None:
    if case.plugin_id is None:
        return None
    status, body = fleet.call(mode, "GET", f"/api/v1/plugins/{case.plugin_id}")
    assert status in (200, 404), body
    return body if status == 200 else None


def _check_record(record: dict[str, Any], wanted: dict[str, Any], dirs: dict[str, Path]) -> None:
    assert record["state"] == wanted["state"], record
    if "error_code" in wanted:
        assert record["error"] is not None and record["error"]["code"] == wanted["error_code"]
    if "signature_status" in wanted:
        assert record["signature_status"] == wanted["signature_status"], record
    if "path" in wanted:
        assert record["path"] == str(dirs[wanted["path"]]), record
    if "manifest_keys" in wanted:
        assert sorted(record["manifest"]) == sorted(wanted["manifest_keys"]), record


@pytest.mark.parametrize("mode", MODES)
def test_the_daemon_survived_and_kept_every_secret(fleet: Fleet, mode: str) -> None:
    """After every attack the daemon answers, and no configuration value ever left it."""
    daemon = fleet.daemon(mode)
    assert daemon.proc.poll() is None, daemon.stderr_text()
    status, health = fleet.call(mode, "GET", "/healthz")
    assert status == 200, health
    status, listing = fleet.call(mode, "GET", "/api/v1/plugins")
    assert status == 200
    present = {c.plugin_id for c in CASES if c.expect[mode]["state"] != "absent"}
    assert present <= {r["id"] for r in listing["plugins"]}
    assert SENTINEL not in daemon.stdout.read_text(errors="replace")
    assert SENTINEL not in daemon.audit.read_text(errors="replace")
    assert not [a for a in fleet.answers.get(mode, []) if SENTINEL in a]
