"""Render the files of a new plugin (`aisoc plugin new`): manifest, Plugin class, test, README."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from aisoc_plugind.core import manifest as manifest_mod

ENTRY_POINT = "plugin.py"
INITIAL_VERSION = "0.1.0"
_SLUG_DROP_RE = re.compile(r"[^a-z0-9._-]+")
_SLUG_DASHES_RE = re.compile(r"-{2,}")
_PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeTemplate:
    """What `new` generates for one plugin type, and the example its test checks."""

    summary: str
    code: str
    config_schema: Mapping[str, Any]
    example_payload: Mapping[str, Any]
    example_result: Mapping[str, Any]
    extra_tests: str


def derive_id(name: str) -> str | None:
    """Return a manifest id made from a display name (`GeoIP Enricher` -> `geoip-enricher`).

    Accents are folded to ASCII and anything else outside `[a-z0-9._-]` becomes `-`;
    returns None when what is left does not match the manifest's id rule.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = _SLUG_DASHES_RE.sub("-", _SLUG_DROP_RE.sub("-", folded.lower()))
    slug = slug.strip("-._")[:64].rstrip("-._")
    return slug if manifest_mod.ID_RE.fullmatch(slug) else None


def generated_test_name(plugin_id: str) -> str:
    """Return the generated test file's name; unique per plugin so one pytest run can hold many."""
    return f"test_{re.sub(r'[^a-z0-9]+', '_', plugin_id.lower()).strip('_')}.py"


def render(*, plugin_type: str, name: str, plugin_id: str, author: str | None) -> dict[str, str]:
    """Return `{relative path: text}` for a new plugin; the manifest is checked by the parser."""
    template = TEMPLATES[plugin_type]
    values = {
        "id": plugin_id,
        "name": name,
        "type": plugin_type,
        "package": "_plugin_under_test_" + re.sub(r"\W", "_", plugin_id),
        "test_module": generated_test_name(plugin_id),
        "payload": _py_literal(template.example_payload),
        "result": _py_literal(template.example_result),
        "extra_tests": template.extra_tests,
        "summary": template.summary,
    }
    files = {
        manifest_mod.YAML_MANIFEST: _manifest_text(template, name, plugin_id, plugin_type, author),
        ENTRY_POINT: _fill(template.code, values),
        values["test_module"]: _fill(_TEST_MODULE, values),
        "README.md": _fill(_README, values),
    }
    # The generated manifest must pass the daemon's own parser; a failure here is our bug.
    manifest_mod.parse(files[manifest_mod.YAML_MANIFEST].encode("utf-8"))
    return files


def _manifest_text(
    template: TypeTemplate, name: str, plugin_id: str, plugin_type: str, author: str | None
) -> str:
    doc: dict[str, Any] = {
        "id": plugin_id,
        "name": name,
        "version": INITIAL_VERSION,
        "plugin_type": plugin_type,
        "description": template.summary,
        **({"author": author} if author else {}),
        "tags": [plugin_type],
        "entry_point": ENTRY_POINT,
        "config_schema": _thaw(template.config_schema),
    }
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False,
                          width=100)
    return _MANIFEST_HEADER + body


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value


def _py_literal(value: Any, indent: int = 0) -> str:
    """Return `value` (JSON-shaped) as Python source, one item a line when it is long."""
    flat = _flat_literal(value)
    if len(flat) + indent <= 60 or not isinstance(value, Mapping | list | tuple):
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, Mapping):
        items = [f"{pad}{json.dumps(k)}: {_py_literal(v, indent + 4)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{_py_literal(v, indent + 4)}," for v in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def _flat_literal(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)}: {_flat_literal(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flat_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _fill(text: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


_MANIFEST_HEADER = """\
# Plugin manifest (INTERFACE §3). plugin.sig covers every key here except `signature` and
# `trust`, and every *.py file in this directory: sign again after any change.
"""

_README = """\
# {{name}}

`{{id}}` is an AiSOC **{{type}}** plugin: {{summary}}

| file | what |
|---|---|
| `plugin.yaml` | the manifest; `config_schema` documents the plugin's settings |
| `plugin.py` | `class Plugin`, the code the daemon runs |
| `{{test_module}}` | tests of the Plugin class: `python -m pytest -q` in this directory |
| `plugin.sig` | written by `aisoc plugin sign`: signs the manifest and every `*.py` file |

## Develop, sign, ship

```sh
python -m pytest -q                                    # run the tests
aisoc plugin validate .                                # manifest and layout checks
aisoc plugin sign --plugin-dir . --private-key ~/.aisoc/signing.key
aisoc plugin verify --plugin-dir . --keys-dir ~/.aisoc/trusted
aisoc plugin package . -o ../{{id}}.tar.gz             # reproducible archive, plugin.sig included
```

The signature covers only `plugin.yaml` and the `*.py` files. Keep data the plugin needs in
Python modules, not in side files, or a changed data file will not be noticed.

## Operator settings

Settings come from the daemon's `[plugin_config."{{id}}"]` table and must match
`config_schema` in `plugin.yaml`; every setting has a default.
"""

_TEST_MODULE = '''\
"""Tests of the {{id}} plugin; run `python -m pytest -q` in the plugin directory."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE = "{{package}}"
EXAMPLE_PAYLOAD: dict[str, Any] = {{payload}}
EXPECTED_RESULT: dict[str, Any] = {{result}}


def load_plugin_class() -> Any:
    """Import plugin.py as a module of a package (so relative imports work); return Plugin."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(HERE)]
        sys.modules[PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.plugin", HERE / "plugin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Plugin


def run_plugin(config: dict[str, Any] | None, payload: dict[str, Any]) -> Any:
    """Build the plugin as the daemon does, then set it up, run it once and tear it down."""
    return asyncio.run(_lifecycle(config or {}, payload))


async def _lifecycle(config: dict[str, Any], payload: dict[str, Any]) -> Any:
    plugin_class = load_plugin_class()
    takes_config = bool(inspect.signature(plugin_class).parameters)
    plugin = plugin_class(config) if takes_config else plugin_class()
    if hasattr(plugin, "setup"):
        await plugin.setup()
    try:
        result = plugin.run(payload, {})
        if inspect.isawaitable(result):
            result = await result
    finally:
        if hasattr(plugin, "teardown"):
            await plugin.teardown()
    return result


def test_example_payload_gives_the_documented_result() -> None:
    """The example payload produces exactly the documented result."""
    assert run_plugin(None, EXAMPLE_PAYLOAD) == EXPECTED_RESULT
{{extra_tests}}'''

_ENRICHER_CODE = '''\
"""{{id}}: add the scope of the event's IP address to the payload."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any


class Plugin:
    """Enrich an event with `ip_scope` (field names come from the plugin config)."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.ip_field = str(settings.get("ip_field", "ip"))
        self.output_field = str(settings.get("output_field", "ip_scope"))

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of the payload with the scope of its IP address added."""
        return {**payload, self.output_field: scope_of(payload.get(self.ip_field))}


def scope_of(value: object) -> str:
    """Classify an IP address; a missing one is `unknown`, a malformed one `invalid`."""
    if value is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        return "invalid"
    if address.is_loopback:
        return "loopback"
    if address.is_private:
        return "private"
    return "public"
'''

_ENRICHER_TESTS = '''

def test_malformed_address_is_labelled_invalid() -> None:
    """A value that is not an IP address is labelled `invalid`, not an error."""
    assert run_plugin(None, {"ip": "not-an-ip"})["ip_scope"] == "invalid"


def test_output_field_comes_from_the_config() -> None:
    """`output_field` in the plugin config names the added field."""
    assert run_plugin({"output_field": "scope"}, {"ip": "8.8.8.8"})["scope"] == "public"
'''

_DETECTION_CODE = '''\
"""{{id}}: judge a process command line by the attacker indicators it holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_INDICATORS = ("mimikatz", "invoke-expression", "-encodedcommand",
                      "vssadmin delete shadows")


class Plugin:
    """Detect suspicious command lines; `threshold` matches make a `malicious` verdict."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        indicators = settings.get("indicators", DEFAULT_INDICATORS)
        self.indicators = tuple(str(i).lower() for i in indicators)
        self.threshold = int(settings.get("threshold", 2))

    def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return the verdict, a 0-100 score and the indicators found in `command_line`."""
        command_line = str(payload.get("command_line", "")).lower()
        matched = [i for i in self.indicators if i in command_line]
        if len(matched) >= self.threshold:
            verdict = "malicious"
        elif matched:
            verdict = "suspicious"
        else:
            verdict = "benign"
        return {"verdict": verdict, "score": min(100, 50 * len(matched)), "matched": matched}
'''

_DETECTION_TESTS = '''

def test_ordinary_command_is_benign() -> None:
    """A command line without indicators is benign with score 0."""
    result = run_plugin(None, {"command_line": "notepad.exe report.txt"})
    assert result == {"verdict": "benign", "score": 0, "matched": []}


def test_one_indicator_is_suspicious() -> None:
    """A single indicator below the threshold gives a suspicious verdict."""
    assert run_plugin(None, {"command_line": "mimikatz.exe"})["verdict"] == "suspicious"
'''

_RESPONDER_CODE = '''\
"""{{id}}: plan the isolation of a host; dry-run (the default) never acts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Plugin:
    """Respond to an alert by isolating its host; in dry-run, only report the intended action."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.dry_run = bool(settings.get("dry_run", True))

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return the intended action; outside dry-run, carry it out first."""
        host = str(payload.get("host", "")).strip()
        if not host:
            return {"action": "none", "reason": "the payload names no host",
                    "dry_run": self.dry_run, "executed": False}
        plan = {"action": "isolate_host", "target": host,
                "reason": str(payload.get("reason", "unspecified")), "dry_run": self.dry_run}
        if self.dry_run:
            return {**plan, "executed": False}
        return {**plan, "executed": await self.isolate(host)}

    async def isolate(self, host: str) -> bool:
        """Isolate `host` through your EDR's API; the template has none, so it refuses."""
        raise NotImplementedError(f"connect an EDR client before isolating {host} for real")
'''

_RESPONDER_TESTS = '''

def test_missing_host_plans_nothing() -> None:
    """Without a host the responder plans no action."""
    assert run_plugin(None, {})["action"] == "none"


def test_live_mode_without_an_edr_client_refuses() -> None:
    """With dry_run off, the template refuses instead of pretending to act."""
    try:
        run_plugin({"dry_run": False}, {"host": "ws-042"})
    except NotImplementedError:
        return
    raise AssertionError("live mode must not report success without an EDR client")
'''

_ACTION_CODE = '''\
"""{{id}}: turn an alert into the ticket an analyst should work on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PRIORITIES = {"critical": "P1", "high": "P2", "medium": "P3", "low": "P4"}


class Plugin:
    """Build a ticket (queue, title, priority, labels) from the alert in the payload."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.queue = str(settings.get("queue", "SOC"))

    def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return the ticket for the alert; an unknown severity is treated as medium."""
        severity = str(payload.get("severity", "medium")).lower()
        if severity not in PRIORITIES:
            severity = "medium"
        title = str(payload.get("title", "Untitled alert"))
        ticket = {"queue": self.queue, "title": f"[{severity.upper()}] {title}",
                  "priority": PRIORITIES[severity], "labels": sorted({"aisoc", severity})}
        return {"alert_id": payload.get("alert_id"), "ticket": ticket}
'''

_ACTION_TESTS = '''

def test_unknown_severity_is_treated_as_medium() -> None:
    """An unrecognised severity files a P3 ticket."""
    result = run_plugin(None, {"severity": "weird", "title": "x"})
    assert result["ticket"]["priority"] == "P3"


def test_queue_comes_from_the_config() -> None:
    """`queue` in the plugin config selects the ticket queue."""
    assert run_plugin({"queue": "IR"}, {"title": "x"})["ticket"]["queue"] == "IR"
'''

_CONNECTOR_CODE = '''\
"""{{id}}: normalise raw `key=value` log lines from a source into events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Plugin:
    """Connect to a log source and turn its raw lines into events."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.source = str(settings.get("source", "syslog"))
        self.connected = False

    async def setup(self) -> None:
        """Open the connection to the source (the template reads lines from the payload)."""
        self.connected = True

    async def teardown(self) -> None:
        """Close the connection before the daemon unloads or replaces the plugin."""
        self.connected = False

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return one event per non-blank line of `payload["lines"]`."""
        lines = [str(line) for line in payload.get("lines", [])]
        events = [parse_line(line) for line in lines if line.strip()]
        return {"source": self.source, "count": len(events), "events": events}


def parse_line(line: str) -> dict[str, str]:
    """Split `a=1 b=two rest` into `{"a": "1", "b": "two", "message": "rest"}`."""
    fields: dict[str, str] = {}
    words: list[str] = []
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep and key:
            fields[key] = value
        else:
            words.append(token)
    if words:
        fields["message"] = " ".join(words)
    return fields
'''

_CONNECTOR_TESTS = '''

def test_blank_lines_are_skipped() -> None:
    """Blank lines produce no events."""
    assert run_plugin(None, {"lines": ["", "   "]})["count"] == 0


def test_words_without_equals_become_the_message() -> None:
    """Tokens that are not `key=value` are joined into `message`."""
    events = run_plugin(None, {"lines": ["host=a disk full"]})["events"]
    assert events == [{"host": "a", "message": "disk full"}]
'''

_WIDGET_CODE = '''\
"""{{id}}: a dashboard widget that charts alerts by severity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SEVERITIES = ("critical", "high", "medium", "low")


class Plugin:
    """Count the alerts in the payload by severity, as the data of a bar chart."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.title = str(settings.get("title", "Alerts by severity"))

    def run(self, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Return one bar per severity in fixed order; unknown severities count as low."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in payload.get("alerts", []):
            severity = str(alert.get("severity", "")).lower() if isinstance(alert, dict) else ""
            counts[severity if severity in counts else "low"] += 1
        series = [{"label": label, "value": value} for label, value in counts.items()]
        return {"widget": "bar_chart", "title": self.title, "series": series,
                "total": sum(counts.values())}
'''

_WIDGET_TESTS = '''

def test_no_alerts_gives_empty_bars() -> None:
    """Without alerts every bar is zero."""
    result = run_plugin(None, {})
    assert result["total"] == 0
    assert all(bar["value"] == 0 for bar in result["series"])


def test_title_comes_from_the_config() -> None:
    """`title` in the plugin config titles the chart."""
    assert run_plugin({"title": "Today"}, {})["title"] == "Today"
'''


def _schema(properties: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({"type": "object", "additionalProperties": False,
                             "properties": MappingProxyType(dict(properties))})


TEMPLATES: Mapping[str, TypeTemplate] = MappingProxyType({
    "enricher": TypeTemplate(
        summary="adds the scope of the event's IP address (private, public, ...)",
        code=_ENRICHER_CODE,
        config_schema=_schema({
            "ip_field": {"type": "string", "default": "ip",
                         "description": "payload field holding the IP address"},
            "output_field": {"type": "string", "default": "ip_scope",
                             "description": "field the scope is written to"},
        }),
        example_payload={"ip": "10.1.2.3", "host": "web-01"},
        example_result={"ip": "10.1.2.3", "host": "web-01", "ip_scope": "private"},
        extra_tests=_ENRICHER_TESTS,
    ),
    "detection": TypeTemplate(
        summary="gives a verdict on a process command line from known attacker indicators",
        code=_DETECTION_CODE,
        config_schema=_schema({
            "indicators": {"type": "array", "items": {"type": "string"},
                           "description": "case-insensitive substrings to look for"},
            "threshold": {"type": "integer", "minimum": 1, "default": 2,
                          "description": "matches needed for a malicious verdict"},
        }),
        example_payload={"command_line": "powershell.exe -EncodedCommand SQBFAFgA "
                                         "; Invoke-Expression $payload"},
        example_result={"verdict": "malicious", "score": 100,
                        "matched": ["invoke-expression", "-encodedcommand"]},
        extra_tests=_DETECTION_TESTS,
    ),
    "responder": TypeTemplate(
        summary="plans the network isolation of a host, in dry-run unless configured otherwise",
        code=_RESPONDER_CODE,
        config_schema=_schema({
            "dry_run": {"type": "boolean", "default": True,
                        "description": "report the intended action without carrying it out"},
        }),
        example_payload={"host": "ws-042", "reason": "ransomware beacon"},
        example_result={"action": "isolate_host", "target": "ws-042",
                        "reason": "ransomware beacon", "dry_run": True, "executed": False},
        extra_tests=_RESPONDER_TESTS,
    ),
    "action": TypeTemplate(
        summary="turns an alert into the ticket an analyst should work on",
        code=_ACTION_CODE,
        config_schema=_schema({
            "queue": {"type": "string", "default": "SOC",
                      "description": "ticket queue to file into"},
        }),
        example_payload={"alert_id": "A-1001", "severity": "High",
                         "title": "Impossible travel for j.doe"},
        example_result={"alert_id": "A-1001",
                        "ticket": {"queue": "SOC", "title": "[HIGH] Impossible travel for j.doe",
                                   "priority": "P2", "labels": ["aisoc", "high"]}},
        extra_tests=_ACTION_TESTS,
    ),
    "connector": TypeTemplate(
        summary="normalises raw key=value log lines from a source into events",
        code=_CONNECTOR_CODE,
        config_schema=_schema({
            "source": {"type": "string", "default": "syslog",
                       "description": "name of the log source, copied into the result"},
        }),
        example_payload={"lines": ["user=alice action=login result=ok", "",
                                   "user=bob action=login result=fail bad password"]},
        example_result={"source": "syslog", "count": 2, "events": [
            {"user": "alice", "action": "login", "result": "ok"},
            {"user": "bob", "action": "login", "result": "fail", "message": "bad password"},
        ]},
        extra_tests=_CONNECTOR_TESTS,
    ),
    "widget": TypeTemplate(
        summary="charts the alerts in the payload by severity",
        code=_WIDGET_CODE,
        config_schema=_schema({
            "title": {"type": "string", "default": "Alerts by severity",
                      "description": "chart title"},
        }),
        example_payload={"alerts": [{"severity": "high"}, {"severity": "low"},
                                    {"severity": "HIGH"}, {"severity": "bogus"}]},
        example_result={"widget": "bar_chart", "title": "Alerts by severity", "series": [
            {"label": "critical", "value": 0}, {"label": "high", "value": 2},
            {"label": "medium", "value": 0}, {"label": "low", "value": 2},
        ], "total": 4},
        extra_tests=_WIDGET_TESTS,
    ),
})
