"""Plugin configuration values never leave: not in events, records, or error answers.

The values of `[plugin_config."<id>"]` can be credentials, and plugin code puts them in
exception text all the time (`raise ValueError(f"bad config {config}")`). Every such text is
scrubbed by value before it reaches stdout, the audit file, a record or an HTTP answer; a
`502 plugin_error` names the exception's type only. The live tests drive a real daemon in both
isolation modes through every place a plugin's text can come out (load, setup, run, teardown,
reload, a configuration that does not match its schema) and then look for the values, in every
form they can take, in everything the daemon wrote or answered.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.log import EventLog, LogOptions, log_options
from aisoc_plugind.core.redact import MARK, MIN_CHARS, NO_REDACTION, SCAN_CAP, Redactor
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.hosts.faults import describe
from aisoc_plugind.errors import PluginDError, PluginLoadError, PluginRunError
from tests.conftest import Env, ManagerFactory, PluginFactory, sign_dir
from tests.live import LiveDaemon, live_daemon

TOKEN = "SECRET-SENTINEL-token-5f1c"
QUOTED = 'SECRET-SENTINEL-it\'s\n"quoted"'
UNICODE = "SECRET-SENTINEL-clé-\u00e9\u4e2d"
NESTED = "SECRET-SENTINEL-nested-77a0"
IN_LIST = "SECRET-SENTINEL-listed-0c3e"
NUMBER = 987654321
SENTINELS = (TOKEN, QUOTED, UNICODE, NESTED, IN_LIST, str(NUMBER))
CONFIG: dict[str, Any] = {
    "token": TOKEN,
    "quoted": QUOTED,
    "unicode": UNICODE,
    "nested": {"deeper": {"value": NESTED}},
    "listed": ["x", IN_LIST],
    "number": NUMBER,
    "short": "on",
}


def _forms(value: str) -> set[str]:
    """The ways a value can show up in text (what the redactor looks for)."""
    return {
        value,
        repr(value)[1:-1],
        ascii(value)[1:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }


def _leaks(text: str) -> list[str]:
    return sorted(f for s in SENTINELS for f in _forms(s) if f in text)


# ---- the redactor ------------------------------------------------------------------------


REDACTOR = Redactor.of_configs({"a": CONFIG, "b": {"other": "another-secret"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"bad token {TOKEN}!", f"bad token {MARK}!"),
        (f"{TOKEN}{TOKEN}", f"{MARK}"),  # touching occurrences merge into one mark
        (repr({"token": TOKEN}), f"{{'token': '{MARK}'}}"),
        (repr(QUOTED), f"'{MARK}'"),
        (json.dumps({"q": QUOTED}), f'{{"q": "{MARK}"}}'),
        (json.dumps(UNICODE), f'"{MARK}"'),
        (ascii(UNICODE), f"'{MARK}'"),
        (repr(UNICODE.encode()), f"b'{MARK}'"),
        (f"deep: {NESTED}", f"deep: {MARK}"),
        (f"list: {IN_LIST}", f"list: {MARK}"),
        (f"port {NUMBER}.", f"port {MARK}."),
        ("turn it on now", "turn it on now"),  # too short to look for
        ("uses another-secret here", f"uses {MARK} here"),  # any plugin's value
        ("", ""),
    ],
)
def test_the_redactor_finds_values_in_every_form(text: str, expected: str) -> None:
    """Values are found as written, in repr/ascii/JSON/bytes form, nested, and as numbers;
    short values are left alone."""
    assert REDACTOR(text) == expected


def test_values_shorter_than_the_threshold_are_not_looked_for() -> None:
    """The threshold is MIN_CHARS characters: shorter values would shred ordinary text."""
    short = "x" * (MIN_CHARS - 1)
    just = "y" * MIN_CHARS
    redactor = Redactor([short, just, True, False, None, 7, 3.5])
    assert not Redactor([short, True, None, 7])
    assert redactor(f"{short} {just}") == f"{short} {MARK}"
    assert redactor("True False None 7 3.5") == "True False None 7 3.5"


def test_overlapping_values_are_covered_whole() -> None:
    """Two values that overlap in a text leave nothing of either."""
    redactor = Redactor(["abcdef", "defghi"])
    assert redactor("xxabcdefghixx") == f"xx{MARK}xx"


def test_dates_and_times_are_found_in_their_text_forms() -> None:
    """TOML dates and times are values too: their str() and ISO forms are found."""
    when = datetime.datetime(2031, 5, 6, 7, 8, 9)
    redactor = Redactor([{"at": when}, [datetime.date(2030, 1, 2)]])
    assert redactor(f"at {when} / {when.isoformat()}") == f"at {MARK} / {MARK}"
    assert redactor("on 2030-01-02") == f"on {MARK}"


def test_keys_are_names_not_values() -> None:
    """Configuration keys are never redacted (only values are secrets)."""
    redactor = Redactor.of_configs({"p": {"api_token": "tok-value-1"}})
    assert redactor("api_token is missing") == "api_token is missing"


def test_a_cut_text_never_shows_half_a_value() -> None:
    """`clip` redacts before cutting; a text longer than the scan cap loses the tail where
    a value could start."""
    secret = "S" * 40
    redactor = Redactor([secret])
    text = "a" * 490 + secret + "b" * 100
    clipped = redactor.clip(text, 500)
    assert "S" not in clipped and clipped.endswith("…")
    huge = "c" * (SCAN_CAP - 10) + secret
    out = redactor(huge)
    assert "S" not in out and out.endswith("…") and len(out) <= SCAN_CAP + 1


def test_no_redaction_changes_nothing() -> None:
    """The empty redactor returns text as is (and cuts only in `clip`)."""
    assert not NO_REDACTION
    assert NO_REDACTION(TOKEN) == TOKEN
    assert NO_REDACTION.clip("x" * 10, 5) == "xxxxx…"


def test_odd_values_from_a_caller_are_handled() -> None:
    """Whatever a caller passes (sets, tuples, objects, deep nesting) builds a redactor."""

    class Thing:
        def __repr__(self) -> str:
            return "Thing-repr-value"

    deep: Any = "deep-secret-value"
    for _ in range(200):
        deep = [deep]
    redactor = Redactor([{"s": {"set-value-1"}}, ("tuple-value",), Thing(), deep])
    assert redactor("set-value-1 tuple-value Thing-repr-value") == f"{MARK} {MARK} {MARK}"
    assert redactor("deep-secret-value") == "deep-secret-value"  # past the depth bound


def test_describe_redacts_and_bounds_a_plugin_exception() -> None:
    """An exception's text is redacted before it is cut, so no half value is ever shown."""
    exc = ValueError(f"{'x' * 495} {TOKEN} tail")
    text = describe(exc, REDACTOR)
    assert TOKEN not in text and not _leaks(text)
    assert text.startswith("ValueError: ") and len(text) <= 501


# ---- the event log, the engine ----------------------------------------------------------


def test_the_event_log_redacts_free_text_fields(env: Env) -> None:
    """`error`, `reason`, `message` and `detail` are scrubbed by value in every event;
    identity fields are not touched."""
    log = EventLog(LogOptions(path=env.audit, redactor=REDACTOR), stream=env.stdout)
    env.logs.append(log)
    log.emit(
        "plugin.load.failed",
        level="error",
        plugin_id="a",
        error=f"boom {TOKEN}",
        reason=repr(CONFIG),
        message=QUOTED,
        detail=json.dumps(CONFIG),
        error_code="plugin_init_failed",
    )
    log.emit_log("log.record", message=f"Task exception was never retrieved: {NESTED}")
    written = env.audit_text() + env.stdout.getvalue()
    assert _leaks(written) == []
    assert MARK in written and '"plugin_id":"a"' in written


def test_log_options_take_the_redactor_from_the_settings(env: Env) -> None:
    """The daemon's event log knows every plugin's configuration values."""
    settings = env.settings(plugin_config={"p": {"token": TOKEN}})
    assert log_options(settings).redactor(TOKEN) == MARK


SECRETIVE = """
import json
class Plugin:
    def __init__(self, config):
        self.config = config
        if config.get("fail") == "init":
            raise ValueError(f"bad config {config!r}")
    def setup(self):
        if self.config.get("fail") == "setup":
            raise RuntimeError("cannot log in with " + json.dumps(self.config))
    def run(self, payload, context):
        raise KeyError(self.config["token"])
    def teardown(self):
        raise ValueError("teardown: " + str(self.config))
"""


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_the_engine_scrubs_every_plugin_error(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, isolation: str
) -> None:
    """Load, setup, run and teardown failures carry no configuration value, in the error
    the caller gets, the record and the events; a run failure names the type only."""
    for name in ("init", "setup", "runs"):
        plugins.write(name, code=SECRETIVE)
    configs = {f"test.{n}": {**CONFIG, "fail": n} for n in ("init", "setup", "runs")}
    manager = await make_manager(TrustMode.STRICT, plugin_config=configs, isolation_mode=isolation)
    result = await manager.discover()
    assert sorted(r.error.code for r in result.failed) == [
        "plugin_init_failed",
        "plugin_setup_failed",
    ]
    for failed in result.failed:
        assert MARK in failed.error.message and not _leaks(json.dumps(failed.to_json()))
    assert not _leaks(json.dumps([r.to_json() for r in manager.records()]))
    with pytest.raises(PluginRunError) as ran:
        await manager.run("test.runs", {})
    assert ran.value.message == "plugin raised KeyError"
    await manager.unload("test.runs")
    events = env.audit_events()
    torn = [e for e in events if e["event"] == "plugin.teardown.failed"]
    assert torn and MARK in torn[0]["error"]
    assert _leaks(env.audit_text() + env.stdout.getvalue()) == []


UNENCODABLE = """
import math
class Plugin:
    def run(self, payload, context):
        secret = payload["secret"]
        shape = payload["shape"]
        if shape == "class":  # a class named after the payload: the encoder quotes the name
            return {"x": type(secret, (), {})()}
        if shape == "key":
            return {(secret, 1): 1}
        if shape == "nan":
            return {secret: math.nan}
        if shape == "circular":
            loop = {secret: None}
            loop[secret] = loop
            return loop
        if shape == "set":
            return {"x": {secret}}
        return {"x": b"bytes " + secret.encode()}
"""


@pytest.mark.parametrize("isolation", ["process", "none"])
@pytest.mark.parametrize("shape", ["class", "key", "nan", "circular", "set", "bytes"])
async def test_a_result_that_cannot_be_encoded_quotes_nothing_of_it(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, isolation: str, shape: str
) -> None:
    """`plugin_result_invalid` says why in fixed words: the encoder's own text names the
    offending value's class or key, which a plugin can make from the payload."""
    plugins.write("enc", code=UNENCODABLE)
    manager = await make_manager(TrustMode.STRICT, isolation_mode=isolation)
    await manager.discover()
    secret = "PayloadSecret4d2a"
    with pytest.raises(PluginDError) as ran:
        await manager.run("test.enc", {"secret": secret, "shape": shape})
    assert ran.value.code == "plugin_result_invalid"
    assert ran.value.message.startswith("the result is not JSON-serialisable")
    assert secret not in ran.value.message
    assert secret not in env.audit_text() + env.stdout.getvalue()


async def test_a_config_that_fails_its_schema_is_reported_without_its_values(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A configuration that fails its schema is refused without quoting the value."""
    plugins.write(
        "schema",
        manifest_extra={
            "config_schema": {
                "type": "object",
                "properties": {"token": {"type": "integer"}},
            }
        },
    )
    manager = await make_manager(plugin_config={"test.schema": {"token": TOKEN}})
    result = await manager.discover()
    assert result.failed[0].error.code == "plugin_config_invalid"
    assert _leaks(env.audit_text() + env.stdout.getvalue() + repr(manager.records())) == []


async def test_a_failed_reload_keeps_values_out_of_its_error(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A reload whose new version fails to set up: the raised error, the record and the
    `plugin.reload.failed` event are scrubbed."""
    path = plugins.write("re", code=SECRETIVE)
    manager = await make_manager(plugin_config={"test.re": {**CONFIG}})
    await manager.discover()
    # The configuration is fixed for a daemon's run: the new code's setup fails by itself.
    (path / "plugin.py").write_text(SECRETIVE.replace('== "setup"', '!= "never"'))
    sign_dir(path)
    with pytest.raises(PluginDError) as info:
        await manager.reload("test.re")
    assert info.value.code == "plugin_setup_failed" and MARK in info.value.message
    assert not _leaks(info.value.message + json.dumps(manager.get("test.re").to_json()))
    assert _leaks(env.audit_text() + env.stdout.getvalue()) == []


def test_an_error_scrubbed_in_place_keeps_its_class_and_code() -> None:
    """EngineEvents.redacted rewrites the message (and args) only."""
    from aisoc_plugind.engine.emitter import EngineEvents

    events = EngineEvents(EventLog(LogOptions(path=Path("/nonexistent/a"))), REDACTOR)
    exc = PluginLoadError(f"x {TOKEN}", code="plugin_setup_failed")
    same = events.redacted(exc)
    assert same is exc and exc.message == f"x {MARK}" and exc.args == (f"x {MARK}",)
    assert exc.code == "plugin_setup_failed"
    clean = PluginLoadError("nothing here")
    assert events.redacted(clean).message == "nothing here"


# ---- the real daemon ----------------------------------------------------------------------


LIVE_PLUGIN = """
import json
{at_import}
class Plugin:
    def __init__(self, config):
        self.config = config
        if config.get("fail") == "init":
            raise ValueError(f"bad config {{config!r}}")
    async def setup(self):
        if self.config.get("fail") == "setup":
            raise RuntimeError("cannot log in with " + json.dumps(self.config))
    def run(self, payload, context):
        if payload.get("echo"):
            return {{"ok": True}}
        raise KeyError(repr(self.config))
    async def teardown(self):
        raise ValueError("teardown: " + str(self.config))
"""


def _write(root: Path, name: str, *, at_import: str = "", schema: bool = False) -> None:
    path = root / name
    path.mkdir()
    manifest: dict[str, Any] = {
        "id": f"secret.{name}",
        "name": name,
        "version": "1.0.0",
        "plugin_type": "enricher",
    }
    if schema:
        manifest["config_schema"] = {
            "type": "object",
            "properties": {"token": {"type": "integer"}},
        }
    (path / "plugin.yaml").write_text(json.dumps(manifest))
    (path / "plugin.py").write_text(LIVE_PLUGIN.format(at_import=at_import))
    sign_dir(path)


def _toml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _config_table(plugin_id: str, fail: str) -> str:
    return (
        f'[plugin_config."{plugin_id}"]\n'
        f"token = {_toml(TOKEN)}\nquoted = {_toml(QUOTED)}\nunicode = {_toml(UNICODE)}\n"
        f'listed = ["x", {_toml(IN_LIST)}]\nnumber = {NUMBER}\nfail = {_toml(fail)}\n'
        f'[plugin_config."{plugin_id}".nested]\nvalue = {_toml(NESTED)}\n'
    )


@pytest.fixture(scope="module", params=["process", "none"])
def secretive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveDaemon, list[str]]]:
    """A daemon whose plugins fail at every step with their configuration in the text."""
    root = tmp_path_factory.mktemp(f"secrets-{request.param}")
    plugins, keys = root / "plugins", root / "keys"
    plugins.mkdir()
    keys.mkdir()
    (keys / "vector-signer.pem").write_bytes(
        (Path(__file__).parents[1] / "vectors" / "keys" / "vector-signer.pem").read_bytes()
    )
    for name in ("init", "setup", "runs", "schema"):
        _write(plugins, name, schema=name == "schema")
    # The module's own code quotes a configured value at import (a value found anywhere).
    _write(plugins, "imports", at_import=f"raise ImportError({TOKEN!r} + ' unreachable')")
    extra = "".join(_config_table(f"secret.{n}", n) for n in ("init", "setup", "runs"))
    extra += _config_table("secret.schema", "none") + _config_table("secret.imports", "none")
    answers: list[str] = []
    with live_daemon(
        root / "daemon",
        plugins=plugins,
        keys=keys,
        extra=extra,
        isolation_extra=f'mode = "{request.param}"\n',
    ) as daemon:
        yield daemon, answers


def _call(
    daemon: LiveDaemon, answers: list[str], method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    status, data = daemon.request(method, path, body)
    answers.append(json.dumps(data, ensure_ascii=False))
    return status, data


def test_a_live_daemon_never_shows_a_configuration_value(
    secretive: tuple[LiveDaemon, list[str]],
) -> None:
    """Load, setup, import and schema failures, a failed run, a failed reload and a failed
    teardown: the values are in no answer, no stdout line and no audit line."""
    daemon, answers = secretive
    status, listed = _call(daemon, answers, "GET", "/api/v1/plugins")
    by_id = {p["id"]: p for p in listed["plugins"]}
    assert {i: by_id[f"secret.{i}"]["error"]["code"] for i in ("init", "setup", "schema")} == {
        "init": "plugin_init_failed",
        "setup": "plugin_setup_failed",
        "schema": "plugin_config_invalid",
    }
    assert by_id["secret.imports"]["error"]["code"] == "plugin_import_failed"
    assert all(MARK in by_id[f"secret.{i}"]["error"]["message"] for i in ("init", "setup"))
    status, ran = _call(daemon, answers, "POST", "/api/v1/plugins/secret.runs/run", {})
    assert (status, ran["error"]["code"]) == (502, "plugin_error")
    assert ran["error"]["message"] == "plugin raised KeyError"
    status, reloaded = _call(daemon, answers, "POST", "/api/v1/plugins/secret.setup/reload")
    assert status in (409, 422) and MARK in reloaded["error"]["message"]
    status, discovered = _call(daemon, answers, "POST", "/api/v1/plugins/discover")
    assert status == 200 and any(MARK in f["error"] for f in discovered["failed"])
    assert _call(daemon, answers, "DELETE", "/api/v1/plugins/secret.runs")[0] == 204
    daemon.wait_for("plugin.teardown.failed", plugin_id="secret.runs")
    daemon.wait_for("plugin.run.failed", plugin_id="secret.runs")
    daemon.stop()
    written = daemon.stdout.read_text() + daemon.audit.read_text() + daemon.stderr_text()
    assert _leaks(written) == []
    assert _leaks("\n".join(answers)) == []
    assert MARK in written
