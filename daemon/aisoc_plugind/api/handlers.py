"""Answer the control API's routes: one handler per route, bodies checked before use."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Any

from aiohttp import web

from aisoc_plugind.api.context import (
    ApiState,
    call_of,
    caller_of,
    state_of,
)
from aisoc_plugind.api.errors import (
    ApiError,
    error_response,
    json_response,
)
from aisoc_plugind.api.metrics import CONTENT_TYPE
from aisoc_plugind.core.manifest import ID_RE, PLUGIN_TYPES
from aisoc_plugind.core.records import SERVING, PluginRecord, State
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.errors import AuditUnavailable, PluginDError, PluginNotFound

__all__ = [
    "disable_plugin",
    "discover_plugins",
    "enable_plugin",
    "healthz",
    "install_from_oci",
    "list_plugins",
    "metrics",
    "openapi",
    "readyz",
    "reload_plugin",
    "run_plugin",
    "show_plugin",
    "unload_plugin",
]


_OCI_REF_RE = re.compile(r"[\x21-\x7e]{1,1024}")


MAX_BODY_DEPTH = 64


def _plugin_id(request: web.Request) -> str:
    plugin_id = request.match_info["id"]
    if not ID_RE.fullmatch(plugin_id):
        raise PluginNotFound(f"no plugin with that id (an id matches {ID_RE.pattern})")
    return plugin_id


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder (json.loads with options builds one per call); NaN and Infinity are refused.
_DECODE = json.JSONDecoder(parse_constant=_reject_constant).decode


def _depth_ok(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        children = (
            value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return True


async def _body(request: web.Request, allowed: Collection[str]) -> dict[str, Any]:
    """Read a JSON-object body (empty means `{}`); raise 400 invalid_json/invalid_body."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        doc = _DECODE(raw.decode("utf-8").removeprefix("\ufeff"))  # RFC 8259: UTF-8 (a BOM
        # is ignored)
    except (ValueError, RecursionError) as exc:
        raise ApiError(
            "the request body is not valid JSON", code="invalid_json", status=400
        ) from exc
    if not isinstance(doc, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_body", status=400)
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ApiError(
            f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; allowed: "
            f"{', '.join(sorted(allowed))}",
            code="invalid_body",
            status=400,
        )
    # Nesting needs an opening bracket per level: a body with few brackets cannot be deep.
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > MAX_BODY_DEPTH and not _depth_ok(doc, MAX_BODY_DEPTH):
        raise ApiError(
            f"the request body nests deeper than {MAX_BODY_DEPTH} levels",
            code="invalid_body",
            status=400,
        )
    return doc


def _object_field(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(f"`{name}` must be a JSON object", code="invalid_body", status=400)
    return value


def _query_choice(request: web.Request, name: str, choices: Collection[str]) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if value not in choices:
        raise ApiError(
            f"{name} must be one of: {', '.join(sorted(choices))}", code="invalid_query", status=400
        )
    return value


def _with_host(manager: PluginManager, record: PluginRecord) -> dict[str, Any]:
    """Return the record's API shape with `host`: where its code runs now (or null)."""
    host = manager.host_of(record.id) if record.state in SERVING else None
    return {**record.to_json(), "host": host.to_json() if host is not None else None}


async def list_plugins(request: web.Request) -> web.Response:
    """GET /api/v1/plugins[?plugin_type=T&state=S]."""
    plugin_type = _query_choice(request, "plugin_type", PLUGIN_TYPES)
    state = _query_choice(request, "state", [s.value for s in State])
    records = state_of(request).manager.records(plugin_type=plugin_type, state=state)
    manager = state_of(request).manager
    return json_response({"plugins": [_with_host(manager, r) for r in records]})


async def show_plugin(request: web.Request) -> web.Response:
    """GET /api/v1/plugins/{id}."""
    manager = state_of(request).manager
    return json_response(_with_host(manager, manager.get(_plugin_id(request))))


async def discover_plugins(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/discover."""
    result = await state_of(request).manager.discover(caller_of(request))
    return json_response(result.to_json())


async def enable_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/enable (409 when the plugin is failed)."""
    record = await state_of(request).manager.enable(_plugin_id(request), caller_of(request))
    return json_response(_with_host(state_of(request).manager, record))


async def disable_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/disable."""
    record = await state_of(request).manager.disable(_plugin_id(request), caller_of(request))
    return json_response(_with_host(state_of(request).manager, record))


async def reload_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/reload [`{"allow_downgrade": true}`]; a failed reload is 409
    (`version_downgrade` for a lower version without the word), the old version serves on."""
    st, plugin_id = state_of(request), _plugin_id(request)
    body = await _body(request, ("allow_downgrade",))
    allow = body.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise ApiError("`allow_downgrade` must be true or false", code="invalid_body", status=400)
    try:
        record = await st.manager.reload(plugin_id, caller_of(request), allow_downgrade=allow)
    except (PluginNotFound, AuditUnavailable):
        raise
    except PluginDError as exc:
        raise _reload_conflict(st.manager, plugin_id, exc) from exc
    return json_response(_with_host(state_of(request).manager, record))


def _reload_conflict(manager: PluginManager, plugin_id: str, exc: PluginDError) -> ApiError:
    record = manager.get(plugin_id)
    now = (
        f"version {record.version} keeps serving ({record.state.value})"
        if record.state in SERVING
        else f"the plugin is {record.state.value}"
    )
    return ApiError(
        f"reload of {plugin_id!r} failed: {exc.message}; {now}", code=exc.code, status=409
    )


async def unload_plugin(request: web.Request) -> web.Response:
    """DELETE /api/v1/plugins/{id}: 204; the files on disk stay."""
    await state_of(request).manager.unload(_plugin_id(request), caller_of(request))
    return web.Response(status=204)


async def run_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/run with `{"payload": {...}, "context": {...}}`."""
    call, plugin_id = call_of(request), _plugin_id(request)
    st = call.state
    body = await _body(request, ("payload", "context"))
    payload, context = _object_field(body, "payload"), _object_field(body, "context")
    st.manager.get(plugin_id)  # 404 before anything is counted under this id
    call.run_audited = True  # every outcome from here on is a plugin.run.* event
    started = time.perf_counter()
    try:
        result = await st.manager.run(plugin_id, payload, context, call.caller())
    except PluginDError as exc:
        st.metrics.run(plugin_id, exc.code, time.perf_counter() - started)
        raise
    st.metrics.run(plugin_id, "ok", time.perf_counter() - started)
    # The host encoded (and so checked) the result once; it is reused here as is.
    return web.Response(text=result.encoded(), content_type="application/json")


async def install_from_oci(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/install_from_oci with `{"oci_ref": "...", "replace": bool}`;
    501 until configured."""
    body = await _body(request, ("oci_ref", "replace"))
    ref = body.get("oci_ref")
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise ApiError("`replace` must be true or false", code="invalid_body", status=400)
    if not isinstance(ref, str) or not _OCI_REF_RE.fullmatch(ref):
        raise ApiError(
            "`oci_ref` is required: a reference such as "
            "registry.example.org/plugins/geoip:1.2.0 (no spaces, <= 1024 chars)",
            code="invalid_body",
            status=400,
        )
    outcome = await state_of(request).manager.install_from_oci(
        ref, caller_of(request), replace=replace
    )
    return json_response(outcome.to_json(), status=201)


def _health(st: ApiState) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for record in st.manager.records():
        counts[record.state.value] = counts.get(record.state.value, 0) + 1
    return {
        "status": "ok" if st.ready() else "starting",
        "audit": "failing" if st.events.failure is not None else "ok",
        "plugins": counts,
    }


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz (liveness): 200 while the daemon serves, with its state and audit health."""
    return json_response(_health(state_of(request)))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz (readiness): 200 once started and while the audit file can be written."""
    st = state_of(request)
    body = _health(st)
    if not st.ready():
        return error_response(503, "not_ready", "the daemon is starting")
    if st.events.failure is not None:
        return error_response(
            503,
            "audit_unavailable",
            "the audit log cannot be written, so changes and runs are refused until it can",
        )
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text."""
    body = state_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: this API's OpenAPI 3.1 description (public)."""
    return web.Response(body=state_of(request).spec, content_type="application/json")
