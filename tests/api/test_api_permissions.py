"""The permission matrix, generated from `ROUTES`: every route x every kind of caller.

A route added to the app without a declared permission, or without a spec entry, or without
an expected answer here, fails this suite (deny by default, OWASP API5).
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from aisoc_plugind.api.app import build_app
from aisoc_plugind.api.context import Route
from aisoc_plugind.api.openapi import openapi_document
from aisoc_plugind.api.routes import ROUTES
from aisoc_plugind.api.tokens import PERMISSIONS, new_token
from aisoc_plugind.audit.names import (
    API_DENIED,
    API_REQUEST,
    PLUGIN_RUN_COMPLETED,
    PLUGIN_RUN_FAILED,
)
from tests.api_fixtures import ECHO_ID, Api, serve_api
from tests.conftest import Env, PluginFactory

# Routes anyone may call: adding one is a deliberate, reviewed change to this set.
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/api/v1/openapi.json")}
# Callers: token name in the fixture's tokens file, or a raw Authorization header.
CALLERS: dict[str, dict[str, str] | str] = {
    "no-token": {},
    "malformed": {"Authorization": "Bearer not-a-token"},
    "wrong-scheme": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "unknown": {"Authorization": f"Bearer {new_token()}"},
    "revoked": "revoked",
    "read": "reader",
    "admin": "admin",
    "execute": "runner",
    "all": "root",
}
GRANTED = {
    "read": {"plugins:read"},
    "admin": {"plugins:admin"},
    "execute": {"plugins:execute"},
    "all": set(PERMISSIONS),
}
# What an authorised call answers (the route's own success or documented non-auth error).
AUTHORISED: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {
    ("GET", "/api/v1/plugins"): (200, {}),
    ("POST", "/api/v1/plugins/discover"): (200, {}),
    ("POST", "/api/v1/plugins/install_from_oci"): (501, {"json": {"oci_ref": "r.example/p:1"}}),
    ("GET", "/api/v1/plugins/{id}"): (200, {}),
    ("DELETE", "/api/v1/plugins/{id}"): (204, {}),
    ("POST", "/api/v1/plugins/{id}/enable"): (200, {}),
    ("POST", "/api/v1/plugins/{id}/disable"): (200, {}),
    ("POST", "/api/v1/plugins/{id}/reload"): (200, {}),
    ("POST", "/api/v1/plugins/{id}/run"): (200, {"json": {"payload": {"x": 1}}}),
    ("GET", "/healthz"): (200, {}),
    ("GET", "/readyz"): (200, {}),
    ("GET", "/metrics"): (200, {}),
    ("GET", "/api/v1/openapi.json"): (200, {}),
}


def expected_status(route: Route, caller: str) -> int:
    """Return what `caller` must get from `route`: 401, 403 or the authorised answer."""
    if route.permission is None:
        return AUTHORISED[(route.method, route.path)][0]
    if caller not in GRANTED:
        return 401
    if route.permission not in GRANTED[caller]:
        return 403
    return AUTHORISED[(route.method, route.path)][0]


MATRIX = [
    pytest.param(route, caller, id=f"{route.method} {route.path} as {caller}")
    for route in ROUTES
    for caller in CALLERS
]


@pytest.mark.parametrize(("route", "caller"), MATRIX)
async def test_permission_matrix(
    env: Env, plugins: PluginFactory, route: Route, caller: str
) -> None:
    """Each caller gets exactly its row's answer; a denied call changes nothing."""
    async with serve_api(env, plugins, oci=False) as api:
        before = api.manager.get(ECHO_ID).state
        kwargs = dict(AUTHORISED[(route.method, route.path)][1])
        entry = CALLERS[caller]
        headers = entry if isinstance(entry, dict) else api.auth(entry)
        response = await api.client.request(
            route.method, route.path.replace("{id}", ECHO_ID), headers=headers, **kwargs
        )
        status = response.status
        after = api.manager.get(ECHO_ID).state
        denied, requests = api.events(API_DENIED), api.events(API_REQUEST)
        runs = api.events(PLUGIN_RUN_COMPLETED) + api.events(PLUGIN_RUN_FAILED)
    assert status == expected_status(route, caller)
    assert response.headers["X-Request-Id"]
    if status in (401, 403):
        assert after == before
        assert len(denied) == 1
        assert denied[0]["required_permission"] == route.permission
        assert denied[0]["status"] == status
    else:
        assert denied == []
    if route.path.endswith("/run") and status not in (401, 403):
        # One event per run: the run's own event names the caller and request; no
        # api.request line repeats it.
        assert requests == []
        assert [(r["actor"], r["request_id"]) for r in runs] == [
            (CALLERS[caller], response.headers["X-Request-Id"])
        ]
    elif route.method in ("POST", "DELETE") and status not in (401, 403):
        assert [r["status"] for r in requests] == [status]
        assert requests[0]["request_id"] == response.headers["X-Request-Id"]
    else:  # a denied request has its api.denied line and no api.request line
        assert requests == []


def test_every_route_declares_a_known_permission_or_is_public() -> None:
    """No route without a permission slips in: it is in PERMISSIONS or explicitly public."""
    for route in ROUTES:
        key = (route.method, route.path)
        if route.permission is None:
            assert key in PUBLIC, f"{key} has no permission and is not listed as public"
        else:
            assert route.permission in PERMISSIONS, key
            assert key not in PUBLIC
        assert key in AUTHORISED, f"{key} has no expected answer in the matrix"


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


async def test_app_routes_are_exactly_the_route_table(env: Env, plugins: PluginFactory) -> None:
    """The running app serves ROUTES and nothing else (no route added around the table)."""
    async with serve_api(env, plugins) as api:
        app = build_app(
            manager=api.manager,
            events=api.env.events(),
            tokens=_tokens(api),
            settings=api.env.settings(),
            ready=lambda: True,
        )
    assert _app_routes(app) == {(r.method, r.path) for r in ROUTES}


def _tokens(api: Api) -> Any:
    from aisoc_plugind.api.tokens import TokenStore

    return TokenStore(api.tokens_file)


def test_spec_lists_exactly_the_app_routes_with_their_permissions() -> None:
    """The OpenAPI document has one operation per route, naming its permission."""
    doc = openapi_document()
    ops = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert set(ops) == {(r.method, r.path) for r in ROUTES}
    for route in ROUTES:
        op = ops[(route.method, route.path)]
        assert op["x-required-permission"] == route.permission
        assert op["security"] == ([{"bearer": []}] if route.permission else [])
        if route.permission:
            assert {"401", "403"} <= set(op["responses"])
