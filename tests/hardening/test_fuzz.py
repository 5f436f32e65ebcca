"""Fuzz the manifest parser (bytes, text mutations, structured values) and every API body.

The parser's contract: whatever the bytes, `manifest.parse` returns a Manifest whose
canonical form can be signed, or raises ManifestError, and it returns quickly (the grammar
is bounded). The API's: whatever the body of whatever route, an answer in the error shape,
never a 500, and the daemon keeps serving. Bounded examples, derandomized: part of the
normal suite, a few seconds each.
"""

from __future__ import annotations

import json
import time
from typing import Any

import hypothesis
import pytest
import requests
import yaml
from hypothesis import strategies as st

from aisoc_plugind.core import manifest
from aisoc_plugind.core.signing import plugin_digest
from aisoc_plugind.errors import ManifestError
from tests.api_fixtures import ECHO_ID, api_in_thread
from tests.conftest import Env, PluginFactory

# Slow: the main test run has it; the interpreter and dependency-floor runs skip it.
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

BOUND_S = 3.0  # one parse of at most 64 KiB; it takes milliseconds


def settings(examples: int) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,  # the bound is asserted below, with room for a busy machine
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


SEEDS = [
    "id: acme.x\nname: X\nversion: 1.0.0\nplugin_type: enricher\n",
    "id: acme.x\nname: X\nversion: '2.1'\nplugin_type: action\ntags: [a, b]\n"
    "config_schema:\n  type: object\n  properties:\n    port: {type: integer, maximum: 65535}\n",
    '{"id": "acme.x", "name": "X", "version": "1.0.0", "plugin_type": "widget",'
    ' "x_vendor": {"a": [1, 2.5, null, true]}}',
    "id: acme.x\nname: |\n  multi\n  line\nversion: 1.0.0\nplugin_type: detection\n"
    'entry_point: pkg/main.py\nauthor: "\\u00e9"\n',
]
# Fragments that mean something to YAML or JSON parsers, and values that stress them.
TOKENS = [
    "&a ",
    "*a",
    "!!",
    "!!python/object:os.system ",
    "!!binary ",
    "!!set ",
    "!local ",
    "<<: ",
    "? ",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    '"',
    "\\u",
    "\\ud800",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:x,1:\n",
    "\t",
    "\x00",
    "\ufeff",
    "\r",
    "#",
    "|",
    ">",
    ".nan",
    "-.inf",
    "1e999",
    "0x" + "f" * 80,
    "9" * 4400,
    "59:" * 50,
    "2024-13-45",
    "~",
    "NaN",
    "Infinity",
    "[" * 70,
    "{a: " * 30,
    "\udcff",
    "\u2028",
    "id: ",
]


def _check(data: bytes, source: str) -> None:
    """The property: a signable Manifest or a ManifestError, within the bound."""
    started = time.perf_counter()
    parsed: manifest.Manifest | None = None
    error: ManifestError | None = None
    try:
        parsed = manifest.parse(data, source)
    except ManifestError as exc:
        error = exc
    if error is not None:
        assert error.code.startswith("manifest_"), error.code
        assert error.problems
    else:
        assert parsed is not None
        assert len(plugin_digest(parsed.as_json(), {})) == 32  # it has a canonical form
        assert parsed.id and parsed.plugin_type in manifest.PLUGIN_TYPES
    assert time.perf_counter() - started < BOUND_S


SOURCES = st.sampled_from(manifest.MANIFEST_NAMES)


@hypothesis.given(data=st.binary(max_size=4096), source=SOURCES)
@settings(1500)
def test_any_bytes_are_a_manifest_or_a_manifest_error(data: bytes, source: str) -> None:
    """Random bytes."""
    _check(data, source)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid manifest with fragments inserted, spans deleted or repeated."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "repeat", "text"]))
        if action == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        elif action == "text":
            text = text[:at] + draw(st.text(max_size=20)) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 10)) :]
        else:
            span = text[at : at + draw(st.integers(1, 40))]
            text = text[:at] + span * draw(st.integers(2, 200)) + text[at:]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="surrogatepass" if encoding != "latin-1" else "replace")


@hypothesis.given(data=mutated(), source=SOURCES)
@settings(1000)
def test_mutated_manifests_are_a_manifest_or_a_manifest_error(data: bytes, source: str) -> None:
    """Valid manifests, mutated as text (both parsers get every mutation)."""
    _check(data, source)


LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**4290), max_value=10**4290),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=40,
)


@st.composite
def structured(draw: st.DrawFn) -> tuple[bytes, str]:
    """A manifest mapping with random values in and around its fields, as YAML or JSON."""
    doc: dict[Any, Any] = {
        "id": draw(st.one_of(st.just("acme.x"), VALUES)),
        "name": draw(st.one_of(st.just("X"), VALUES)),
        "version": draw(st.one_of(st.just("1.0.0"), VALUES)),
        "plugin_type": draw(st.one_of(st.just("enricher"), VALUES)),
    }
    for key in draw(st.lists(st.text(max_size=10), max_size=4)):
        doc[key] = draw(VALUES)
    nest = draw(st.integers(0, 80))
    for _ in range(nest):
        doc = {"id": "acme.x", "name": "X", "version": "1", "plugin_type": "widget", "n": doc}
    if draw(st.booleans()):
        return json.dumps(doc).encode(), manifest.JSON_MANIFEST
    try:
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    except (RecursionError, ValueError):
        text = json.dumps(doc)
    return text.encode("utf-8", errors="surrogatepass"), manifest.YAML_MANIFEST


@hypothesis.given(case=structured())
@settings(250)
def test_structured_manifests_are_a_manifest_or_a_manifest_error(case: tuple[bytes, str]) -> None:
    """Any JSON-like value in any field, nested up to 80 levels, in both formats."""
    _check(*case)


# ---- API bodies ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
FIELDS = st.sampled_from(["payload", "context", "allow_downgrade", "replace", "oci_ref"])
BODIES = st.one_of(
    st.binary(max_size=2048),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(FIELDS, JSON_VALUES, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.integers(100, 5000).map(lambda n: b'{"payload": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 3).map(lambda n: b'{"payload": {"k": "' + b"x" * (n * 400_000) + b'"}}'),
    st.just(b'{"payload": {}, "payload": {"dup": 1}}'),
    st.just(b'{"payload": NaN}'),
    st.just(b"\xef\xbb\xbf{}"),
)
ROUTES = [
    ("POST", "/api/v1/plugins/discover"),
    ("POST", f"/api/v1/plugins/{ECHO_ID}/run"),
    ("POST", "/api/v1/plugins/test.boom/run"),
    ("POST", "/api/v1/plugins/test.unsigned/run"),
    ("POST", f"/api/v1/plugins/{ECHO_ID}/enable"),
    ("POST", f"/api/v1/plugins/{ECHO_ID}/disable"),
    ("POST", f"/api/v1/plugins/{ECHO_ID}/reload"),
    ("POST", "/api/v1/plugins/install_from_oci"),
    ("POST", "/api/v1/plugins/nope.nope/run"),
    ("DELETE", "/api/v1/plugins/test.boom"),
    ("GET", "/api/v1/plugins"),
]
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=latin-1", "text/plain", "", "multipart/x"]
)


def test_any_body_on_any_route_is_answered_in_the_error_shape(
    env: Env, plugins: PluginFactory
) -> None:
    """Garbage, odd JSON, deep nesting, big bodies, duplicate keys, on every route: never a
    500 (the fixture also fails on any `api.error`), always the error shape; still serving."""
    seen: set[int] = set()
    with api_in_thread(env, plugins, oci=False) as api, requests.Session() as session:
        headers = api.auth("root")

        @hypothesis.given(route=st.sampled_from(ROUTES), body=BODIES, ctype=CONTENT_TYPES)
        @settings(150)
        def send(route: tuple[str, str], body: bytes, ctype: str) -> None:
            method, path = route
            response = session.request(
                method,
                f"{api.url}{path}",
                data=body,
                headers={**headers, "Content-Type": ctype} if ctype else headers,
                timeout=30,
            )
            seen.add(response.status_code)
            assert response.status_code != 500, response.text
            assert response.status_code < 500 or response.status_code in (502, 503, 504, 501)
            if response.status_code >= 400 and response.content:
                answer = response.json()
                assert answer["error"]["code"] and answer["detail"] == answer["error"]["message"]

        send()
        assert session.get(f"{api.url}/healthz", timeout=10).status_code == 200
    assert 200 in seen and any(s >= 400 for s in seen), seen
