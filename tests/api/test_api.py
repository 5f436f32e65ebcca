"""The control API against a real manager: routes, error codes, bad input, guards, events."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import jsonschema
import pytest
import schemathesis

from aisoc_plugind.api.guards import browser_refusal, host_allowed, request_id
from aisoc_plugind.api.listen import check_listen
from aisoc_plugind.api.openapi import openapi_document, openapi_yaml
from aisoc_plugind.audit.names import API_DENIED, API_ERROR, API_REQUEST, API_TOKENS_LOADED
from aisoc_plugind.errors import ConfigError
from tests.api_fixtures import (
    ECHO_ID,
    SECRET_MARK,
    Api,
    running_component,
    serve_api,
)
from tests.conftest import REPO, Env, PluginFactory
from tests.tls import self_signed

P = "/api/v1/plugins"
RECORD_KEYS = {
    "id",
    "name",
    "version",
    "plugin_type",
    "state",
    "enabled",
    "signature_status",
    "signing_key_id",
    "error",
    "path",
    "loaded_at",
    "manifest",
}


@pytest.fixture
async def api(env: Env, plugins: PluginFactory) -> AsyncIterator[Api]:
    async with serve_api(env, plugins) as live:
        yield live


def assert_error(body: Any, code: str) -> None:
    """Assert the INTERFACE §6 error shape with this code."""
    assert body["error"]["code"] == code, body
    assert body["detail"] == body["error"]["message"]
    assert body["detail"]


# ---- routes and shapes ---------------------------------------------------------------------


async def test_list_returns_every_record_in_the_interface_shape(api: Api) -> None:
    """GET /plugins lists loaded and failed plugins with every §6 record field."""
    status, body = await api.json("GET", P, "reader")
    assert status == 200
    by_id = {r["id"]: r for r in body["plugins"]}
    assert {ECHO_ID, "example.geoip-enricher", "example.legacy-connector", "test.unsigned"} <= set(
        by_id
    )
    assert all(set(r) >= RECORD_KEYS for r in body["plugins"])
    echo = by_id[ECHO_ID]
    assert echo["state"] == "enabled"
    assert echo["enabled"] is True
    assert echo["signature_status"] == "verified"
    assert echo["signing_key_id"] == "vector-signer"
    assert echo["loaded_at"].endswith("Z")
    assert echo["error"] is None
    assert by_id["test.unsigned"]["state"] == "failed"
    assert by_id["test.unsigned"]["error"]["code"] == "signature_unsigned"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("plugin_type=connector", {"example.legacy-connector"}),
        ("state=failed", {"test.unsigned"}),
        ("plugin_type=enricher&state=failed", {"test.unsigned"}),
    ],
)
async def test_list_filters(api: Api, query: str, expected: set[str]) -> None:
    """plugin_type and state filter the list."""
    status, body = await api.json("GET", f"{P}?{query}", "reader")
    assert status == 200
    assert {r["id"] for r in body["plugins"]} == expected


@pytest.mark.parametrize("query", ["state=sleeping", "plugin_type=nope", "state=%00"])
async def test_list_rejects_unknown_filter_values(api: Api, query: str) -> None:
    """An unknown state or type is 400 invalid_query, not an empty list."""
    status, body = await api.json("GET", f"{P}?{query}", "reader")
    assert status == 400
    assert_error(body, "invalid_query")


async def test_show_returns_one_record(api: Api) -> None:
    """GET /plugins/{id} returns the record."""
    status, body = await api.json("GET", f"{P}/{ECHO_ID}", "reader")
    assert status == 200
    assert body["id"] == ECHO_ID
    assert set(body) >= RECORD_KEYS


async def test_show_unknown_plugin_is_404(api: Api) -> None:
    """An unknown id is 404 plugin_not_found."""
    status, body = await api.json("GET", f"{P}/test.nothing", "reader")
    assert status == 404
    assert_error(body, "plugin_not_found")


async def test_discover_reports_new_and_failed(api: Api, plugins: PluginFactory) -> None:
    """POST /discover loads new directories and lists the ones that failed."""
    plugins.write("fresh")
    plugins.write("broken", code="this is not python")
    status, body = await api.json("POST", f"{P}/discover", "admin")
    assert status == 200
    assert body["discovered"] == ["test.fresh"]
    failed = {f["path"]: f["error"] for f in body["failed"]}
    assert str(api.env.plugins / "broken") in failed  # failed dirs are retried too
    assert all(failed.values())


async def test_disable_blocks_runs_and_enable_restores(api: Api) -> None:
    """disable -> run is 409 plugin_disabled; enable -> run works again."""
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/disable", "admin")
    assert status == 200
    assert body["state"] == "disabled"
    assert body["enabled"] is False
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/run", "runner", json={})
    assert status == 409
    assert_error(body, "plugin_disabled")
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/enable", "admin")
    assert status == 200
    assert body["state"] == "enabled"
    assert (await api.json("POST", f"{P}/{ECHO_ID}/run", "runner"))[0] == 200


async def test_enable_of_a_failed_plugin_is_409(api: Api) -> None:
    """Enabling a `failed` plugin is a conflict, not a silent load."""
    status, body = await api.json("POST", f"{P}/test.unsigned/enable", "admin")
    assert status == 409
    assert_error(body, "plugin_failed")


async def test_reload_swaps_in_new_signed_code(api: Api, plugins: PluginFactory) -> None:
    """POST /reload re-reads the directory; the record shows the new version."""
    plugins.write("echo", version="2.0.0")
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/reload", "admin")
    assert status == 200
    assert body["version"] == "2.0.0"
    assert body["state"] == "enabled"
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/run", "runner")
    assert body["result"]["version"] == "2.0.0"


async def test_failed_reload_is_409_and_old_version_serves(api: Api) -> None:
    """Tampered code fails to verify: 409 with the reason; version 1.0.0 keeps running."""
    code = api.env.plugins / "echo" / "plugin.py"
    code.write_text(code.read_text().replace("1.0.0", "6.6.6"))
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/reload", "admin")
    assert status == 409
    assert_error(body, "signature_invalid")
    assert "1.0.0 keeps serving" in body["error"]["message"]
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/run", "runner")
    assert status == 200
    assert body["result"]["version"] == "1.0.0"
    _, record = await api.json("GET", f"{P}/{ECHO_ID}", "reader")
    assert record["state"] == "enabled"
    assert record["error"]["code"] == "signature_invalid"


async def test_unload_is_204_and_leaves_files(api: Api) -> None:
    """DELETE unloads from memory (204, empty body); the directory stays on disk."""
    response = await api.call("DELETE", f"{P}/{ECHO_ID}", "admin")
    assert response.status == 204
    assert await response.read() == b""
    assert (api.env.plugins / "echo" / "plugin.py").is_file()
    _, record = await api.json("GET", f"{P}/{ECHO_ID}", "reader")
    assert record["state"] == "unloaded"
    status, _body = await api.json("DELETE", f"{P}/{ECHO_ID}", "admin")
    assert status == 409


async def test_run_returns_result_and_duration(api: Api) -> None:
    """POST /run hands payload and context over and returns plugin_id, result, duration_ms."""
    status, body = await api.json(
        "POST",
        f"{P}/example.geoip-enricher/run",
        "runner",
        json={"payload": {"ip": "1.2.3.4"}, "context": {"a": 1}},
    )
    assert status == 200
    assert body["plugin_id"] == "example.geoip-enricher"
    assert body["result"] == {"ip": "1.2.3.4", "country": "AU"}
    assert isinstance(body["duration_ms"], float | int)


@pytest.mark.parametrize("kwargs", [{}, {"data": b""}, {"json": {}}, {"json": {"payload": {}}}])
async def test_run_body_and_its_fields_are_optional(api: Api, kwargs: dict[str, Any]) -> None:
    """No body, an empty body, `{}` or a missing context all mean empty objects."""
    status, body = await api.json("POST", f"{P}/example.legacy-connector/run", "runner", **kwargs)
    assert status == 200
    assert body["result"] == {"result": "pong"}


@pytest.mark.parametrize(
    ("plugin_id", "status", "code"),
    [
        ("test.boom", 502, "plugin_error"),
        ("test.badresult", 502, "plugin_result_invalid"),
        ("test.unsigned", 409, "plugin_failed"),
        ("test.nothing", 404, "plugin_not_found"),
    ],
)
async def test_run_errors_have_their_codes(
    api: Api, plugin_id: str, status: int, code: str
) -> None:
    """Plugin failures map to §6 codes and statuses."""
    got, body = await api.json("POST", f"{P}/{plugin_id}/run", "runner", json={})
    assert got == status
    assert_error(body, code)


async def test_run_timeout_is_504(env: Env, plugins: PluginFactory) -> None:
    """A plugin over plugins.run_timeout_s is 504 plugin_timeout."""
    async with serve_api(env, plugins, run_timeout_s=0.3) as api:
        status, body = await api.json("POST", f"{P}/test.sleepy/run", "runner")
    assert status == 504
    assert_error(body, "plugin_timeout")


async def test_install_requires_an_oci_ref(api: Api) -> None:
    """install_from_oci validates its body before anything else."""
    for body in ({}, {"oci_ref": ""}, {"oci_ref": 5}, {"oci_ref": "a b"}):
        status, answer = await api.json("POST", f"{P}/install_from_oci", "admin", json=body)
        assert status == 400, body
        assert_error(answer, "invalid_body")


async def test_install_without_oci_support_is_501(env: Env, plugins: PluginFactory) -> None:
    """A manager without install_from_oci answers 501 oci_not_configured."""
    async with serve_api(env, plugins, oci=False) as api:
        status, body = await api.json(
            "POST", f"{P}/install_from_oci", "admin", json={"oci_ref": "registry.example/p/x:1"}
        )
    assert status == 501
    assert_error(body, "oci_not_configured")


async def test_install_calls_the_manager(api: Api) -> None:
    """With OCI support the manager's error comes back as JSON (nothing listens on :9)."""
    status, body = await api.json(
        "POST", f"{P}/install_from_oci", "admin", json={"oci_ref": "127.0.0.1:9/plugins/none:1.0.0"}
    )
    assert status not in (401, 403, 500, 501)
    assert body["error"]["code"] != "internal_error"


DEEP_RESULT_CODE = """
class Plugin:
    def run(self, payload, context):
        value = 1
        for _ in range(5000):
            value = [value]
        return {"deep": value}
"""


async def test_too_deep_result_is_plugin_result_invalid(env: Env, plugins: PluginFactory) -> None:
    """A result nested deeper than JSON encoding allows is 502, not 500."""
    plugins.write("deep", code=DEEP_RESULT_CODE)
    async with serve_api(env, plugins, internal_errors_expected=True) as api:
        status, body = await api.json("POST", f"{P}/test.deep/run", "runner")
    assert status == 502
    assert_error(body, "plugin_result_invalid")


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{", "invalid_json"),
        (b"\xff\xfe\x00", "invalid_json"),
        (b'{"payload": NaN}', "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'"text"', "invalid_body"),
        (b'{"payload": [1]}', "invalid_body"),
        (b'{"context": "x"}', "invalid_body"),
        (b'{"payload": {}, "extra": 1}', "invalid_body"),
        (b'{"payload": ' + b'{"a": ' * 100 + b"1" + b"}" * 101, "invalid_body"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    ],
)
async def test_malformed_run_bodies_are_400(api: Api, data: bytes, code: str) -> None:
    """Malformed JSON and wrong shapes are 400 with a code, never 500."""
    status, body = await api.json(
        "POST",
        f"{P}/{ECHO_ID}/run",
        "runner",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert_error(body, code)


async def test_body_over_the_limit_is_413_and_denied(env: Env, plugins: PluginFactory) -> None:
    """A body over api.max_body_bytes is 413 JSON and an api.denied event (both framings)."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 512

    async with serve_api(env, plugins, api_max_body_bytes=1024) as api:
        s1, b1 = await api.json("POST", f"{P}/{ECHO_ID}/run", "runner", data=b" " * 2048)
        s2, b2 = await api.json("POST", f"{P}/{ECHO_ID}/run", "runner", data=chunks())
        denied = api.events(API_DENIED)
    assert (s1, s2) == (413, 413)
    assert_error(b1, "payload_too_large")
    assert_error(b2, "payload_too_large")
    assert [d["reason"] for d in denied] == ["body_too_large", "body_too_large"]
    assert denied[0]["status"] == 413
    assert denied[0]["route"] == f"{P}/{{id}}/run"


@pytest.mark.parametrize(
    "path",
    [
        f"{P}/a%2Fb",
        f"{P}/..",
        f"{P}/%2e%2e",
        f"{P}/../../etc/passwd",
        f"{P}/%00",
        f"{P}/{'x' * 300}",
        f"{P}/caf%C3%A9",
        f"{P}/a%0Ab",
        f"{P}/%2e%2e%2fplugins",
        f"{P}/-leading",
        f"{P}/a/b/c/run",
    ],
)
async def test_strange_ids_are_404_or_400_never_500(api: Api, path: str) -> None:
    """Ids with slashes, dots, NUL, newlines or 300 characters never reach a file or a 500."""
    for method in ("GET", "DELETE"):
        status, body = await api.json(method, path, "root")
        assert status in (400, 404), (method, path, status)
        assert body["error"]["code"] in ("plugin_not_found", "not_found")
    status, body = await api.json("POST", path + "/run", "root")
    assert status in (400, 404)


async def test_unknown_route_is_404_json(api: Api) -> None:
    """Unknown routes answer the JSON error shape."""
    status, body = await api.json("GET", "/nothing/here", None)
    assert status == 404
    assert_error(body, "not_found")


async def test_wrong_method_is_405_json(api: Api) -> None:
    """A known route with the wrong method is 405 JSON with an Allow header."""
    response = await api.call("PUT", f"{P}/{ECHO_ID}/run", "root")
    body = await response.json()
    assert response.status == 405
    assert "POST" in response.headers["Allow"]
    assert_error(body, "method_not_allowed")


async def test_unexpected_exceptions_become_500_json(env: Env, plugins: PluginFactory) -> None:
    """The catch-all answers 500 internal_error and logs the type, never the text."""

    class Broken:
        def __init__(self, manager: Any) -> None:
            self._manager = manager

        def __getattr__(self, name: str) -> Any:
            return getattr(self._manager, name)

        def records(self, **kwargs: Any) -> Any:
            raise RuntimeError(SECRET_MARK)

    async with serve_api(env, plugins, wrap=Broken, internal_errors_expected=True) as api:
        status, body = await api.json("GET", P, "reader")
        errors = api.events(API_ERROR)
        text = api.audit_text()
    assert status == 500
    assert_error(body, "internal_error")
    assert errors[0]["error"] == "RuntimeError"
    assert SECRET_MARK not in text


# ---- Host, Origin, browsers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8470", True),
        ("localhost", True),
        ("LOCALHOST:1", True),
        ("[::1]:8470", True),
        ("[::1]", True),
        ("127.9.9.9", True),
        ("api.internal:8470", True),
        ("api.internal", True),
        ("evil.example", False),
        ("evil.example:8470", False),
        ("127.0.0.1.evil.example", False),
        ("", False),
        (None, False),
        ("[::2]:1", False),
        ("0.0.0.0", False),
        ("localhost.evil.example", False),
    ],
)
def test_host_allow_list(host: str | None, allowed: bool) -> None:
    """Loopback names and api.allowed_hosts pass, with or without a port."""
    assert host_allowed(host, {"api.internal"}) is allowed


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, None),
        ({"Origin": "http://127.0.0.1:8470", "Host": "127.0.0.1:8470"}, None),
        ({"Origin": "https://api.internal"}, None),
        ({"Origin": "http://evil.example", "Host": "127.0.0.1:8470"}, "origin_not_allowed"),
        ({"Origin": "http://127.0.0.1:3000", "Host": "127.0.0.1:8470"}, "origin_not_allowed"),
        ({"Origin": "null"}, "origin_null"),
        ({"Origin": "file://"}, "origin_not_allowed"),
        ({"Origin": "http://[::1"}, "origin_not_allowed"),
        ({"Sec-Fetch-Mode": "no-cors"}, "fetch_mode_no_cors"),
        ({"Upgrade": "websocket"}, "websocket_refused"),
    ],
)
def test_browser_refusals(headers: dict[str, str], reason: str | None) -> None:
    """Foreign or null origins, no-cors fetches and WebSocket upgrades are refused."""
    assert browser_refusal(headers, {"api.internal"}) == reason


async def test_foreign_host_is_421_and_denied(api: Api) -> None:
    """A DNS-rebinding request (foreign Host) is refused before authentication."""
    status, body = await api.json("GET", P, "root", headers={"Host": "evil.example"})
    assert status == 421
    assert_error(body, "host_not_allowed")
    event = api.events(API_DENIED)[-1]
    assert event["reason"] == "host_not_allowed"
    assert event["peer"] == "127.0.0.1"


async def test_allowed_hosts_admits_a_named_host(env: Env, plugins: PluginFactory) -> None:
    """api.allowed_hosts admits the operator's DNS name."""
    async with serve_api(env, plugins, api_allowed_hosts=("plugind.example",)) as api:
        status, _ = await api.json("GET", P, "reader", headers={"Host": "plugind.example:1"})
    assert status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Mode": "no-cors"},
    ],
)
async def test_browser_requests_from_elsewhere_are_403(api: Api, headers: dict[str, str]) -> None:
    """Browser-shaped requests from other origins are refused with 403 and an event."""
    status, body = await api.json("POST", f"{P}/{ECHO_ID}/disable", "root", headers=headers)
    assert status == 403
    assert_error(body, "origin_not_allowed")
    assert api.manager.get(ECHO_ID).state.value == "enabled"


async def test_no_cors_headers_even_on_preflight(api: Api) -> None:
    """The API never sends CORS headers; a preflight is simply 405."""
    response = await api.call(
        "OPTIONS",
        P,
        None,
        headers={
            "Origin": f"http://127.0.0.1:{api.client.port}",
            "Access-Control-Request-Method": "GET",
        },
    )
    assert response.status == 405
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]


# ---- request ids, events, audit ------------------------------------------------------------


async def test_every_response_has_a_request_id(api: Api) -> None:
    """X-Request-Id is on success, error, 404 and 401 responses alike."""
    for method, path, token in (
        ("GET", P, "reader"),
        ("GET", "/nope", None),
        ("GET", P, None),
        ("GET", "/healthz", None),
    ):
        response = await api.call(method, path, token)
        assert len(response.headers["X-Request-Id"]) == 32, path


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("trace-0123456789", True),
        ("short", False),
        ("bad id with spaces!", False),
        ("x" * 65, False),
    ],
)
async def test_client_request_id_is_echoed_only_when_safe(
    api: Api, sent: str, echoed: bool
) -> None:
    """A client X-Request-Id is reused only when it matches ^[A-Za-z0-9-]{8,64}$."""
    response = await api.call("GET", P, "reader", headers={"X-Request-Id": sent})
    assert (response.headers["X-Request-Id"] == sent) is echoed


async def test_mutating_call_events_carry_actor_and_request_id(api: Api) -> None:
    """POST /disable: plugin.disabled and api.request both name the token and request id."""
    response = await api.call("POST", f"{P}/{ECHO_ID}/disable", "admin")
    rid = response.headers["X-Request-Id"]
    disabled = api.events("plugin.disabled")[-1]
    request = api.events(API_REQUEST)[-1]
    assert disabled["actor"] == "admin"
    assert disabled["request_id"] == rid
    assert request["actor"] == "admin"
    assert request["request_id"] == rid
    assert request["route"] == f"{P}/{{id}}/disable"
    assert request["method"] == "POST"
    assert request["status"] == 200
    assert request["plugin_id"] == ECHO_ID
    assert request["duration_ms"] >= 0


async def test_reads_write_no_request_event(api: Api) -> None:
    """GETs are not audited as api.request (only changes and denials are)."""
    await api.call("GET", P, "reader")
    assert api.events(API_REQUEST) == []


@pytest.mark.parametrize(
    ("token", "status", "reason", "actor"),
    [
        (None, 401, "token_missing", None),
        ("revoked", 401, "token_unknown", None),
        ("reader", 403, "permission_missing", "reader"),
    ],
)
async def test_denials_are_events(
    api: Api, token: str | None, status: int, reason: str, actor: str | None
) -> None:
    """401 and 403 each write api.denied with route, permission, reason, actor and peer."""
    response = await api.call("POST", f"{P}/{ECHO_ID}/reload", token)
    assert response.status == status
    event = api.events(API_DENIED)[-1]
    assert event["reason"] == reason
    assert event.get("actor") == actor
    assert event["required_permission"] == "plugins:admin"
    assert event["route"] == f"{P}/{{id}}/reload"
    assert event["method"] == "POST"
    assert event["peer"] == "127.0.0.1"
    assert event["request_id"] == response.headers["X-Request-Id"]
    assert api.events(API_REQUEST) == []  # denied: one api.denied line, no api.request


async def test_401_names_the_bearer_scheme(api: Api) -> None:
    """401 carries WWW-Authenticate: Bearer."""
    response = await api.call("GET", P, None)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_audit_never_holds_tokens_or_payloads(api: Api) -> None:
    """Neither a token (valid or not) nor payload content reaches the audit file or stdout."""
    bogus = "aisoc_pd_" + "A" * 51
    await api.call(
        "POST",
        f"{P}/{ECHO_ID}/run",
        "runner",
        json={"payload": {"k": SECRET_MARK}, "context": {"c": SECRET_MARK}},
    )
    await api.call("POST", f"{P}/test.boom/run", "runner", json={"payload": {"k": SECRET_MARK}})
    await api.call("POST", f"{P}/{ECHO_ID}/run", None, headers={"Authorization": f"Bearer {bogus}"})
    await api.call("POST", f"{P}/{ECHO_ID}/reload", "reader")
    written = api.audit_text() + api.env.stdout.getvalue()
    assert "plugin.run.completed" in written
    assert "api.denied" in written
    assert SECRET_MARK not in written
    assert bogus not in written
    for token in api.tokens.values():
        assert token not in written


# ---- health, metrics, spec -----------------------------------------------------------------


async def test_healthz_is_liveness_and_readyz_is_readiness(api: Api) -> None:
    """Both are public. /healthz answers 200 while the daemon serves, saying whether it is
    ready, how the audit file is and how many plugins are in each state; /readyz is 503
    until ready."""
    api.ready.clear()
    status, body = await api.json("GET", "/healthz", None)
    assert (status, body["status"], body["audit"]) == (200, "starting", "ok")
    status, body = await api.json("GET", "/readyz", None)
    assert status == 503
    assert_error(body, "not_ready")
    api.ready.set()
    status, body = await api.json("GET", "/healthz", None)
    assert (status, body["status"]) == (200, "ok")
    assert body["plugins"]["enabled"] >= 1
    status, body = await api.json("GET", "/readyz", None)
    assert (status, body["status"], body["audit"]) == (200, "ok", "ok")


async def test_readyz_is_503_and_healthz_says_failing_while_audit_is_down(api: Api) -> None:
    """An unwritable audit file makes the daemon unready (still alive)."""
    log_dir = api.env.audit.parent
    shutil.move(log_dir, api.env.tmp / "log-away")
    log_dir.write_text("a file where the audit directory was")
    await api.call("POST", f"{P}/{ECHO_ID}/run", "runner")  # the writer notices now
    status, body = await api.json("GET", "/healthz", None)
    assert (status, body["audit"]) == (200, "failing")
    status, body = await api.json("GET", "/readyz", None)
    assert status == 503
    assert_error(body, "audit_unavailable")


async def test_metrics_count_plugins_runs_reloads_and_denials(api: Api) -> None:
    """/metrics (plugins:read) exposes states, runs with latency, reloads and denials."""
    await api.call("POST", f"{P}/{ECHO_ID}/run", "runner")
    await api.call("POST", f"{P}/test.boom/run", "runner")
    await api.call("POST", f"{P}/{ECHO_ID}/reload", "admin")
    await api.call("GET", P, None)
    response = await api.call("GET", "/metrics", "reader")
    text = await response.text()
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert 'aisoc_plugind_plugins{state="enabled"} 6.0' in text
    assert 'aisoc_plugind_plugins{state="failed"} 1.0' in text
    assert f'aisoc_plugind_runs_total{{outcome="ok",plugin_id="{ECHO_ID}"}} 1.0' in text
    assert 'aisoc_plugind_runs_total{outcome="plugin_error",plugin_id="test.boom"} 1.0' in text
    assert f'aisoc_plugind_run_duration_seconds_count{{plugin_id="{ECHO_ID}"}} 1.0' in text
    assert 'aisoc_plugind_reloads_total{outcome="ok"} 1.0' in text
    assert 'aisoc_plugind_api_denied_total{reason="token_missing"} 1.0' in text


async def test_metrics_need_read_permission(api: Api) -> None:
    """/metrics is not public."""
    assert (await api.call("GET", "/metrics", None)).status == 401
    assert (await api.call("GET", "/metrics", "runner")).status == 403


async def test_security_headers(api: Api) -> None:
    """Responses are not cached or sniffed and do not advertise the framework."""
    response = await api.call("GET", P, "reader")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Server"] == "aisoc-plugind"


def test_request_id_generation() -> None:
    """Generated ids are uuid4 hex; unsafe candidates are replaced."""
    assert request_id(None) != request_id(None)
    assert request_id("abc\ndefgh") != "abc\ndefgh"
    assert json.dumps(request_id("good-id-123")) == '"good-id-123"'


# ---- the component: listening, TLS, unix socket, SIGHUP ------------------------------------


async def get(
    url: str,
    *,
    unix: Path | None = None,
    ssl_context: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """GET with a throwaway session (TCP, TLS or unix socket)."""
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, ssl=ssl_context, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_component_serves_tcp_and_healthz_follows_ready(
    env: Env, plugins: PluginFactory
) -> None:
    """The component listens on api.listen; /healthz is 503 until the service is ready."""
    async with running_component(env, plugins, "127.0.0.1:0") as daemon:
        url = f"http://{daemon.address()}"
        assert (await get(f"{url}/readyz"))[0] == 503
        assert (await get(f"{url}/healthz"))[1]["status"] == "starting"
        daemon.service.ready.set()
        assert (await get(f"{url}/readyz"))[0] == 200
        assert (await get(f"{url}/healthz"))[1]["status"] == "ok"
        headers = {"Authorization": f"Bearer {daemon.tokens['reader']}"}
        status, body = await get(f"{url}{P}/{ECHO_ID}", headers=headers)
        assert status == 200
        assert body["id"] == ECHO_ID
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{url}/healthz")


async def test_sighup_hook_rereads_tokens(env: Env, plugins: PluginFactory) -> None:
    """The yielded hook re-reads the tokens file and says so in an event."""
    async with running_component(env, plugins, "127.0.0.1:0") as daemon:
        assert daemon.hangup is not None
        await daemon.hangup()
    events = env.audit_events()
    loaded = [e for e in events if e["event"] == API_TOKENS_LOADED]
    assert [e["trigger"] for e in loaded] == ["startup", "sighup"]
    assert loaded[-1]["tokens"] == 5
    assert "root" in loaded[-1]["names"]


@pytest.mark.parametrize(
    ("listen", "extra", "ok"),
    [
        ("127.0.0.1:8470", {}, True),
        ("[::1]:8470", {}, True),
        ("localhost:8470", {}, True),
        ("unix:/run/x.sock", {}, True),
        ("0.0.0.0:8470", {}, False),
        ("[::]:8470", {}, False),
        ("10.1.2.3:8470", {}, False),
        ("myhost:8470", {}, False),
        ("0.0.0.0:8470", {"api_allow_insecure_listen": True}, True),
        ("0.0.0.0:8470", {"api_tls_cert": Path("c.pem"), "api_tls_key": Path("k.pem")}, True),
        ("0.0.0.0:8470", {"api_tls_cert": Path("c.pem")}, False),
    ],
)
def test_listen_check(env: Env, listen: str, extra: dict[str, Any], ok: bool) -> None:
    """Plain HTTP off loopback is a startup error unless TLS or the explicit opt-in is set."""
    settings = env.settings(api_listen=listen, **extra)
    if ok:
        check_listen(settings)
    else:
        with pytest.raises(ConfigError, match="not a loopback address"):
            check_listen(settings)


async def test_component_refuses_insecure_listen_before_binding(
    env: Env, plugins: PluginFactory
) -> None:
    """api_component raises ConfigError at startup for 0.0.0.0 without TLS."""
    with pytest.raises(ConfigError, match="allow_insecure_listen"):
        async with running_component(env, plugins, "0.0.0.0:0"):
            pass


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    return self_signed(tmp)


async def test_component_serves_tls(env: Env, plugins: PluginFactory) -> None:
    """With api.tls_cert/tls_key the API speaks HTTPS."""
    cert, key = _self_signed(env.tmp)
    async with running_component(
        env, plugins, "localhost:0", api_tls_cert=cert, api_tls_key=key
    ) as daemon:
        daemon.service.ready.set()
        port = daemon.address().rpartition(":")[2]
        context = ssl.create_default_context(cafile=str(cert))
        assert (await get(f"https://localhost:{port}/healthz", ssl_context=context))[0] == 200


async def test_bad_tls_files_are_a_config_error(env: Env, plugins: PluginFactory) -> None:
    """Unreadable TLS material stops startup with a clear message."""
    with pytest.raises(ConfigError, match=r"cannot load api\.tls_cert"):
        async with running_component(
            env,
            plugins,
            "127.0.0.1:0",
            api_tls_cert=env.tmp / "no.crt",
            api_tls_key=env.tmp / "no.key",
        ):
            pass


async def test_unix_socket_is_0660_skips_host_check_and_names_the_peer(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """On a unix socket: mode 0660, any Host accepted, peer = uid/pid; removed on exit."""
    sock = tmp_path / "api.sock"
    async with running_component(env, plugins, f"unix:{sock}") as daemon:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        status, _ = await get(f"http://evil.example{P}", unix=sock)
        assert status == 401
    assert not sock.exists()
    denied = [e for e in env.audit_events() if e["event"] == "api.denied"]
    assert denied[0]["peer"].startswith(f"unix:uid={os.getuid()},")
    assert daemon.address() == f"unix:{sock}"


async def test_stale_socket_is_replaced(env: Env, plugins: PluginFactory, tmp_path: Path) -> None:
    """A socket file nobody listens on (a crashed run) is replaced."""
    sock = tmp_path / "api.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(sock))
    leftover.close()
    async with running_component(env, plugins, f"unix:{sock}") as daemon:
        daemon.service.ready.set()
        assert (await get("http://localhost/healthz", unix=sock))[0] == 200


async def test_socket_path_holding_a_file_is_refused(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """A regular file at the socket path is never deleted."""
    path = tmp_path / "api.sock"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        async with running_component(env, plugins, f"unix:{path}"):
            pass
    assert path.read_text() == "keep me"


async def test_socket_in_use_is_refused(env: Env, plugins: PluginFactory, tmp_path: Path) -> None:
    """A socket another process listens on is not stolen."""
    sock = tmp_path / "api.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    other.listen(1)
    try:
        with pytest.raises(ConfigError, match="in use"):
            async with running_component(env, plugins, f"unix:{sock}"):
                pass
    finally:
        other.close()


# ---- the OpenAPI document ------------------------------------------------------------------


async def test_spec_is_served_without_a_token(api: Api) -> None:
    """GET /api/v1/openapi.json is public and is the document built from ROUTES."""
    status, body = await api.json("GET", "/api/v1/openapi.json", None)
    assert status == 200
    assert body == json.loads(json.dumps(openapi_document()))
    assert body["openapi"] == "3.1.0"


def test_docs_openapi_yaml_is_up_to_date() -> None:
    """docs/openapi.yaml is the generated document (regenerate it when this fails)."""
    path = REPO / "docs" / "openapi.yaml"
    assert path.read_text() == openapi_yaml(), "regenerate docs/openapi.yaml (see its header)"


def test_spec_is_a_valid_openapi_31_document() -> None:
    """schemathesis accepts the document; every schema is valid JSON Schema 2020-12."""
    schemathesis.openapi.from_dict(openapi_document()).validate()
    for schema in openapi_document()["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


async def test_metrics_count_reloads_not_made_through_the_api(api: Api) -> None:
    """A reload by the watcher (or any non-API caller) shows in aisoc_plugind_reloads."""
    await api.manager.reload(ECHO_ID)
    async with await api.call("GET", "/metrics", "reader") as response:
        text = await response.text()
        assert response.status == 200
    assert 'aisoc_plugind_reloads_total{outcome="ok"} 1.0' in text


async def test_changes_and_runs_fail_closed_while_audit_cannot_be_written(api: Api) -> None:
    """Audit file unwritable: run/admin get 503 audit_unavailable, reads work; then it heals."""
    log_dir = api.env.audit.parent
    shutil.move(log_dir, api.env.tmp / "log-away")
    log_dir.write_text("a file where the audit directory was: every write fails now")
    status, body = await api.json("POST", f"/api/v1/plugins/{ECHO_ID}/run", "runner")
    assert (status, body["error"]["code"]) == (503, "audit_unavailable")
    status, body = await api.json("POST", f"/api/v1/plugins/{ECHO_ID}/disable", "admin")
    assert status == 503
    assert api.manager.get(ECHO_ID).state.value == "enabled"  # nothing changed unaudited
    assert (await api.json("GET", f"/api/v1/plugins/{ECHO_ID}", "reader"))[0] == 200
    log_dir.unlink()  # the directory can be created again
    status, _ = await api.json("POST", f"/api/v1/plugins/{ECHO_ID}/run", "runner")
    assert status == 200
    assert "plugin.run.completed" in api.audit_text()


async def test_non_utf8_directory_name_does_not_break_listing(api: Api) -> None:
    """A plugin dir whose name is not UTF-8 is listed (escaped), never a 500."""
    weird = os.fsencode(api.env.plugins) + b"/zz\xff"
    os.mkdir(weird)
    with open(weird + b"/plugin.yaml", "w") as fh:
        fh.write('{"id": "zz.bad", "name": "x", "version": "1", "plugin_type": "widget"}')
    status, body = await api.json("POST", "/api/v1/plugins/discover", "admin")
    assert status == 200 and body["failed"][0]["code"] == "signature_unsigned"
    assert (await api.json("GET", "/api/v1/plugins", "reader"))[0] == 200
    assert (await api.json("GET", "/api/v1/plugins/zz.bad", "reader"))[0] == 200


async def test_lone_surrogate_in_payload_is_not_a_500(api: Api) -> None:
    """A payload string holding a lone surrogate round-trips escaped (the echo plugin)."""
    status, body = await api.json(
        "POST",
        f"/api/v1/plugins/{ECHO_ID}/run",
        "runner",
        data='{"payload": {"a": "\\ud800"}}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body


async def test_denial_flood_is_limited_without_locking_out_valid_tokens(
    env: Env, plugins: PluginFactory
) -> None:
    """120 bad-token requests: past the burst they get 429 and are audited in aggregate;
    a valid token from the same address is served throughout."""
    async with serve_api(env, plugins, api_denied_burst=20, api_denied_per_second=1) as api:
        statuses = []
        for n in range(120):
            statuses.append(
                (
                    await api.json(
                        "GET", "/api/v1/plugins", None, headers={"Authorization": "Bearer nope"}
                    )
                )[0]
            )
            if n % 30 == 0:
                assert (await api.json("GET", "/api/v1/plugins", "reader"))[0] == 200
        assert set(statuses[:20]) == {401}
        assert statuses[-1] == 429
        denied = api.events(API_DENIED)
        assert len(denied) <= 20 + 3  # the burst, the first limited request, a refill or two
        assert any(e["reason"] == "rate_limited" and e["status"] == 429 for e in denied)
        async with await api.call("GET", "/metrics", "reader") as response:
            metrics = await response.text()
        limited = statuses.count(429)
        assert f'aisoc_plugind_api_denied_total{{reason="rate_limited"}} {limited}.0' in metrics
        await anyio.sleep(1.1)  # the budget refills one denial per second here
        status, _ = await api.json(
            "GET", "/api/v1/plugins", None, headers={"Authorization": "Bearer nope"}
        )
        assert status == 401
        assert api.events(API_DENIED)[-1]["suppressed"] >= 1  # the aggregate is reported
