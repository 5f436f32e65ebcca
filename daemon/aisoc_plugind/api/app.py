"""Serve the control API (INTERFACE §6): one route table, its guards, events and OpenAPI.

Every request passes two middlewares. `_envelope` (outermost) gives it a request id, turns
every error into the JSON error shape, and writes the `api.request` / `api.denied` events and
metrics. `_guard` refuses foreign `Host`/`Origin` headers (DNS rebinding, browsers), bodies
over `api.max_body_bytes`, and callers whose token lacks the route's one permission.
`ROUTES` is the single table the app, the permission checks and the OpenAPI document are
built from, so a route cannot exist without a declared permission and a spec entry.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import ssl
import stat
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from aisoc_plugind import __version__
from aisoc_plugind.api.metrics import CONTENT_TYPE, ApiMetrics
from aisoc_plugind.api.tokens import PERMISSIONS, Principal, TokenStore, denial_reason
from aisoc_plugind.audit.log import API_DENIED, EventLog
from aisoc_plugind.config.settings import Settings, is_loopback_host
from aisoc_plugind.core.manifest import ID_RE, PLUGIN_TYPES
from aisoc_plugind.core.records import SERVING, State
from aisoc_plugind.engine.manager import Caller, PluginManager
from aisoc_plugind.errors import ConfigError, PluginDError, PluginNotFound

if TYPE_CHECKING:
    from aisoc_plugind.service.daemon import HangupHook, Service

API_REQUEST = "api.request"
API_ERROR = "api.error"
API_LISTENING = "api.listening"
API_TOKENS_LOADED = "api.tokens.loaded"
PREFIX = "/api/v1/plugins"
READ, ADMIN, EXECUTE = PERMISSIONS
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9-]{8,64}")
_OCI_REF_RE = re.compile(r"[\x21-\x7e]{1,1024}")
MAX_BODY_DEPTH = 64
_SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                     "Server": "aisoc-plugind"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(PluginDError):
    """An error the API itself decides (bad input, refusal); `reason` marks a denial."""

    def __init__(self, message: str, *, code: str, status: int, reason: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, code=code)
        self.http_status = status
        self.reason = reason
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One API route: what it answers, who may call it, and how the spec describes it."""

    method: str
    path: str
    handler: Handler
    permission: str | None  # None only for deliberately public routes
    summary: str
    ok: int = 200
    response: str | None = None  # component schema of the success body
    body: str | None = None  # component schema of the request body
    body_required: bool = False
    errors: tuple[int, ...] = ()
    query: tuple[str, ...] = ()


class DenialLimiter:
    """Per-peer token buckets for requests that are denied anyway (research item 20).

    Only denials spend from a bucket, so a client with a valid token is never slowed down by
    a noisy neighbour on the same address (everything on loopback shares one). Past the
    budget a would-be 401/403/413/421 is answered 429 and is not written to the audit file
    one line each: the peer's first limited request is audited (`reason: rate_limited`), the
    rest are counted in metrics and reported as `suppressed` on the peer's next audited
    denial. This bounds how many audit lines (and fsyncs) an unauthenticated caller can cause.
    """

    __slots__ = ("_buckets", "_burst", "_rate", "_suppressed")

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst, self._rate = float(burst), per_second
        self._buckets: dict[str, tuple[float, float]] = {}
        # Peers in the limited state -> denials answered 429 without an audit line so far.
        self._suppressed: dict[str, int] = {}

    def take(self, peer: str) -> bool:
        """Spend one denial for `peer`; return False when its budget is exhausted."""
        now = time.monotonic()
        tokens, last = self._buckets.get(peer, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if len(self._buckets) > 10_000:  # bounded memory under many peers
            self._buckets.clear()
        allowed = tokens >= 1
        self._buckets[peer] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def suppress(self, peer: str) -> bool:
        """Record a limited denial; return True when it is the first one (to be audited)."""
        if peer in self._suppressed:
            self._suppressed[peer] += 1
            return False
        self._suppressed[peer] = 0
        return True

    def pending(self, peer: str) -> int:
        """Leave the limited state; return how many denials went unaudited in it."""
        return self._suppressed.pop(peer, 0)


@dataclass(slots=True, kw_only=True)
class ApiState:
    """What the handlers share: the manager, the event log, tokens, settings, metrics."""

    manager: PluginManager
    events: EventLog
    tokens: TokenStore
    settings: Settings
    ready: Callable[[], bool]
    metrics: ApiMetrics
    unix: bool
    allowed_hosts: frozenset[str]
    limiter: DenialLimiter
    spec: bytes = b""
    routes: dict[AbstractRoute, Route] = field(default_factory=dict)


STATE = web.AppKey("aisoc_api_state", ApiState)
_RID = web.RequestKey("aisoc_request_id", str)
_ROUTE = web.RequestKey("aisoc_route", Route)
_PRINCIPAL = web.RequestKey("aisoc_principal", Principal)


# ---- responses -----------------------------------------------------------------------------


def _dumps(data: Any) -> str:
    # ASCII escapes: a lone surrogate (from a non-UTF-8 directory name or a payload) must not
    # make the UTF-8 encoding of the response fail.
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def error_body(code: str, message: str) -> dict[str, Any]:
    """Return the error shape of INTERFACE §6."""
    return {"error": {"code": code, "message": message}, "detail": message}


def _error(status: int, code: str, message: str,
           headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(code, message), status=status, headers=headers,
                             dumps=_dumps)


# ---- request helpers -----------------------------------------------------------------------


def _state(request: web.Request) -> ApiState:
    return request.app[STATE]


def _caller(request: web.Request) -> Caller:
    principal = request.get(_PRINCIPAL)
    return Caller(actor=principal.name if principal else None, request_id=request[_RID])


def _plugin_id(request: web.Request) -> str:
    plugin_id = request.match_info["id"]
    if not ID_RE.fullmatch(plugin_id):
        raise PluginNotFound(f"no plugin with that id (an id matches {ID_RE.pattern})")
    return plugin_id


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_ok(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        children = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return True


async def _body(request: web.Request, allowed: Collection[str]) -> dict[str, Any]:
    """Read a JSON-object body (empty means `{}`); raise 400 invalid_json/invalid_body."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError("the request body is not valid JSON", code="invalid_json",
                       status=400) from exc
    if not isinstance(doc, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_body",
                       status=400)
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ApiError(f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; allowed: "
                       f"{', '.join(sorted(allowed))}", code="invalid_body", status=400)
    if not _depth_ok(doc, MAX_BODY_DEPTH):
        raise ApiError(f"the request body nests deeper than {MAX_BODY_DEPTH} levels",
                       code="invalid_body", status=400)
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
        raise ApiError(f"{name} must be one of: {', '.join(sorted(choices))}",
                       code="invalid_query", status=400)
    return value


# ---- handlers ------------------------------------------------------------------------------


async def list_plugins(request: web.Request) -> web.Response:
    """GET /api/v1/plugins[?plugin_type=T&state=S]."""
    plugin_type = _query_choice(request, "plugin_type", PLUGIN_TYPES)
    state = _query_choice(request, "state", [s.value for s in State])
    records = _state(request).manager.records(plugin_type=plugin_type, state=state)
    return _json({"plugins": [r.to_json() for r in records]})


async def show_plugin(request: web.Request) -> web.Response:
    """GET /api/v1/plugins/{id}."""
    return _json(_state(request).manager.get(_plugin_id(request)).to_json())


async def discover_plugins(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/discover."""
    result = await _state(request).manager.discover(_caller(request))
    return _json(result.to_json())


async def enable_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/enable (409 when the plugin is failed)."""
    record = await _state(request).manager.enable(_plugin_id(request), _caller(request))
    return _json(record.to_json())


async def disable_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/disable."""
    record = await _state(request).manager.disable(_plugin_id(request), _caller(request))
    return _json(record.to_json())


async def reload_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/reload; a failed reload is 409, the old version serves on."""
    st, plugin_id = _state(request), _plugin_id(request)
    try:
        record = await st.manager.reload(plugin_id, _caller(request))
    except PluginNotFound:
        raise
    except PluginDError as exc:
        raise _reload_conflict(st.manager, plugin_id, exc) from exc
    return _json(record.to_json())


def _reload_conflict(manager: PluginManager, plugin_id: str, exc: PluginDError) -> ApiError:
    record = manager.get(plugin_id)
    now = (f"version {record.version} keeps serving ({record.state.value})"
           if record.state in SERVING else f"the plugin is {record.state.value}")
    return ApiError(f"reload of {plugin_id!r} failed: {exc.message}; {now}", code=exc.code,
                    status=409)


async def unload_plugin(request: web.Request) -> web.Response:
    """DELETE /api/v1/plugins/{id}: 204; the files on disk stay."""
    await _state(request).manager.unload(_plugin_id(request), _caller(request))
    return web.Response(status=204)


async def run_plugin(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/{id}/run with `{"payload": {...}, "context": {...}}`."""
    st, plugin_id = _state(request), _plugin_id(request)
    body = await _body(request, ("payload", "context"))
    payload, context = _object_field(body, "payload"), _object_field(body, "context")
    st.manager.get(plugin_id)  # 404 before anything is counted under this id
    started = time.perf_counter()
    try:
        result = await st.manager.run(plugin_id, payload, context, _caller(request))
    except PluginDError as exc:
        st.metrics.run(plugin_id, exc.code, time.perf_counter() - started)
        raise
    st.metrics.run(plugin_id, "ok", time.perf_counter() - started)
    try:
        text = _dumps(result.to_json())
    except (TypeError, ValueError, RecursionError) as exc:
        raise ApiError("the plugin's result cannot be encoded as JSON",
                       code="plugin_result_invalid", status=502) from exc
    return web.Response(text=text, content_type="application/json")


async def install_from_oci(request: web.Request) -> web.Response:
    """POST /api/v1/plugins/install_from_oci with `{"oci_ref": "..."}`; 501 until configured."""
    body = await _body(request, ("oci_ref",))
    ref = body.get("oci_ref")
    if not isinstance(ref, str) or not _OCI_REF_RE.fullmatch(ref):
        raise ApiError("`oci_ref` is required: a reference such as "
                       "registry.example.org/plugins/geoip:1.2.0 (no spaces, <= 1024 chars)",
                       code="invalid_body", status=400)
    install = getattr(_state(request).manager, "install_from_oci", None)
    if install is None:
        raise ApiError("installing plugins from OCI registries is not available in this "
                       "daemon", code="oci_not_configured", status=501)
    outcome = await install(ref, _caller(request))
    data = outcome.to_json() if hasattr(outcome, "to_json") else dict(outcome)
    return _json(data, status=201)


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 once the daemon is ready, 503 before."""
    if _state(request).ready():
        return _json({"status": "ok"})
    return _error(503, "not_ready", "the daemon is starting")


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text."""
    body = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: this API's OpenAPI 3.1 description (public)."""
    return web.Response(body=_state(request).spec, content_type="application/json")


_ID = f"{PREFIX}/{{id}}"
ROUTES: tuple[Route, ...] = (
    Route(method="GET", path=PREFIX, handler=list_plugins, permission=READ,
          summary="List plugins, optionally filtered", response="PluginList", errors=(400,),
          query=("plugin_type", "state")),
    Route(method="POST", path=f"{PREFIX}/discover", handler=discover_plugins,
          permission=ADMIN, summary="Scan the plugins directory now",
          response="DiscoverResult"),
    Route(method="POST", path=f"{PREFIX}/install_from_oci", handler=install_from_oci,
          permission=ADMIN, summary="Install a plugin from an OCI registry", ok=201,
          response="InstallResult", body="InstallRequest", body_required=True,
          errors=(400, 409, 413, 422, 501, 502)),
    Route(method="GET", path=_ID, handler=show_plugin, permission=READ,
          summary="Show one plugin", response="Plugin", errors=(404,)),
    Route(method="DELETE", path=_ID, handler=unload_plugin, permission=ADMIN,
          summary="Unload a plugin from memory (files stay on disk)", ok=204,
          errors=(404, 409)),
    Route(method="POST", path=f"{_ID}/enable", handler=enable_plugin, permission=ADMIN,
          summary="Enable a plugin", response="Plugin", errors=(404, 409)),
    Route(method="POST", path=f"{_ID}/disable", handler=disable_plugin, permission=ADMIN,
          summary="Disable a plugin (code stays loaded)", response="Plugin",
          errors=(404, 409)),
    Route(method="POST", path=f"{_ID}/reload", handler=reload_plugin, permission=ADMIN,
          summary="Reload a plugin from disk; on failure the old version serves on",
          response="Plugin", errors=(404, 409)),
    Route(method="POST", path=f"{_ID}/run", handler=run_plugin, permission=EXECUTE,
          summary="Run a plugin", response="RunResult", body="RunRequest",
          errors=(400, 404, 409, 413, 502, 504)),
    Route(method="GET", path="/healthz", handler=healthz, permission=None,
          summary="Liveness and readiness", response="Health", errors=(503,)),
    Route(method="GET", path="/metrics", handler=metrics, permission=READ,
          summary="Prometheus metrics"),
    Route(method="GET", path="/api/v1/openapi.json", handler=openapi, permission=None,
          summary="This OpenAPI document"),
)


# ---- guards: pure decisions ----------------------------------------------------------------


def host_name(host_header: str) -> str:
    """Return the host part of a `Host` header value (brackets and port removed)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def host_allowed(host_header: str | None, allowed: Collection[str]) -> bool:
    """Return True for a loopback Host, or one named in `api.allowed_hosts` (with or w/o port)."""
    if not host_header:
        return False
    name = host_name(host_header)
    return is_loopback_host(name) or name in allowed or host_header.strip().lower() in allowed


def browser_refusal(headers: Mapping[str, str], allowed: Collection[str]) -> str | None:
    """Return why a browser-shaped request is refused, or None.

    Refused: WebSocket upgrades, `Sec-Fetch-Mode: no-cors`, `Origin: null`, and any Origin
    that is neither this request's own origin (same Host) nor a host in `api.allowed_hosts`.
    """
    if headers.get("Upgrade", "").strip().lower() == "websocket":
        return "websocket_refused"
    if headers.get("Sec-Fetch-Mode", "").strip().lower() == "no-cors":
        return "fetch_mode_no_cors"
    origin = headers.get("Origin")
    if origin is None:
        return None
    if origin.strip().lower() == "null":
        return "origin_null"
    try:
        parts = urlsplit(origin.strip())
        hostname = parts.hostname
    except ValueError:
        return "origin_not_allowed"
    if parts.scheme not in ("http", "https") or not hostname:
        return "origin_not_allowed"
    same = parts.netloc.lower() == headers.get("Host", "").strip().lower()
    return None if same or hostname in allowed else "origin_not_allowed"


def request_id(candidate: str | None) -> str:
    """Return the client's X-Request-Id when it is safe to echo, else a new uuid4 hex."""
    if candidate is not None and _REQUEST_ID_RE.fullmatch(candidate):
        return candidate
    return uuid.uuid4().hex


# ---- middlewares ---------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = _state(request)
    route = st.routes.get(request.match_info.route)
    if route is not None:
        request[_ROUTE] = route
    if not st.unix and not host_allowed(request.headers.get("Host"), st.allowed_hosts):
        raise ApiError("the Host header names no address of this API (api.allowed_hosts)",
                       code="host_not_allowed", status=421, reason="host_not_allowed")
    refusal = browser_refusal(request.headers, st.allowed_hosts)
    if refusal is not None:
        raise ApiError("browser requests from other origins are refused",
                       code="origin_not_allowed", status=403, reason=refusal)
    if (request.content_length or 0) > st.settings.api_max_body_bytes:
        raise _too_large(st.settings)
    if route is not None and route.permission is not None:
        request[_PRINCIPAL] = _authorize(request, st, route.permission)
        if route.permission in _NEED_AUDIT and _audit_down(st):
            raise ApiError(
                "the audit log cannot be written, so changes and runs are refused until it "
                f"can ({st.events.audit.failure if st.events.audit else ''})",
                code="audit_unavailable", status=503, reason="audit_unavailable")
    return await handler(request)


# Changes and runs must leave an audit record (research item 25: fail closed); reads need not.
_NEED_AUDIT = frozenset({ADMIN, EXECUTE})


def _audit_down(st: ApiState) -> bool:
    """Return True while the audit sink is failing and `audit.fail_closed` is set.

    The denial event this leads to is itself a write attempt, so the state heals as soon as
    the file can be written again.
    """
    audit = st.events.audit
    return st.settings.audit_fail_closed and audit is not None and audit.probe() is not None


def _authorize(request: web.Request, st: ApiState, permission: str) -> Principal:
    header, generation = request.headers.get("Authorization"), st.tokens.generation
    principal = st.tokens.authenticate(header)  # re-reads the file first when it changed
    if st.tokens.generation != generation:
        emit_tokens_loaded(st.events, st.tokens, trigger="file_changed")
    if principal is None:
        expired = st.tokens.expired_name(header)
        reason = "token_expired" if expired else denial_reason(header)
        text = ("missing bearer token" if reason == "token_missing"
                else f"token {expired!r} has expired" if expired else "invalid token")
        raise ApiError(f"{text}: send Authorization: Bearer <token>", code="unauthorized",
                       status=401, reason=reason,
                       headers={"WWW-Authenticate": 'Bearer realm="aisoc-plugind"'})
    if not principal.allows(permission):
        request[_PRINCIPAL] = principal  # the denial event names the token
        raise ApiError(f"token {principal.name!r} lacks the permission {permission}",
                       code="permission_denied", status=403, reason="permission_missing")
    return principal


def _too_large(settings: Settings) -> ApiError:
    return ApiError(f"the request body exceeds {settings.api_max_body_bytes} bytes",
                    code="payload_too_large", status=413, reason="body_too_large")


@web.middleware
async def _envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[_RID] = rid = request_id(request.headers.get("X-Request-Id"))
    started = time.perf_counter()
    response = await _answer(request, handler)
    response.headers.update(_SECURITY_HEADERS)
    response.headers["X-Request-Id"] = rid
    _account(request, response.status, started)
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _from_http(request, exc)
    except PluginDError as exc:
        return _from_error(request, exc)
    except Exception as exc:  # the last line of defence: never a bare 500 page or a crash
        _internal_error(request, exc)
        return _error(500, "internal_error",
                      f"internal error (request id {request[_RID]}); see the daemon log")


def _from_http(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        return _from_error(request, _too_large(_state(request).settings))
    if exc.status == 404:
        return _error(404, "not_found", "no such route")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here; "
                      f"allowed: {allow}", headers={"Allow": allow})
    code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_") or "http_error"
    return _error(exc.status, code, exc.reason)


def _from_error(request: web.Request, exc: PluginDError) -> web.Response:
    headers: Mapping[str, str] = {}
    if isinstance(exc, ApiError):
        if exc.reason is not None:
            exc = _denied(request, exc)
        headers = exc.headers
    return _error(exc.http_status, exc.code, exc.message, headers=headers)


def _method(request: web.Request) -> str:
    return request.method if request.method in _KNOWN_METHODS else "OTHER"


def _route_path(request: web.Request) -> str | None:
    route = request.get(_ROUTE)
    return route.path if route is not None else None


def _peer(request: web.Request) -> str | None:
    if not _state(request).unix:
        return request.remote
    sock: Any = request.transport.get_extra_info("socket") if request.transport else None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "unix"
    pid, uid, gid = struct.unpack("3i", creds)
    return f"unix:uid={uid},gid={gid},pid={pid}"


def _denied(request: web.Request, exc: ApiError) -> ApiError:
    """Audit a denial, or, past the peer's budget, turn it into a counted 429."""
    st = _state(request)
    peer = _peer(request) or "unknown"
    suppressed: int | None = None
    if st.limiter.take(peer):
        suppressed = st.limiter.pending(peer) or None
    else:
        st.metrics.denied("rate_limited")
        if not st.limiter.suppress(peer):
            return _rate_limited(st)
        exc = _rate_limited(st)  # the first limited request of a burst is audited
    route, principal = request.get(_ROUTE), request.get(_PRINCIPAL)
    reason = exc.reason or exc.code
    if reason != "rate_limited":
        st.metrics.denied(reason)
    st.events.emit(API_DENIED, level="warning", route=_route_path(request),
                   method=_method(request), status=exc.http_status,
                   required_permission=route.permission if route else None, reason=reason,
                   actor=principal.name if principal else None, peer=peer,
                   request_id=request[_RID], suppressed=suppressed)
    return exc


def _rate_limited(st: ApiState) -> ApiError:
    retry = max(1, math.ceil(1 / st.settings.api_denied_per_second))
    return ApiError("too many denied requests from this address; slow down",
                    code="too_many_denied_requests", status=429, reason="rate_limited",
                    headers={"Retry-After": str(retry)})


def _internal_error(request: web.Request, exc: Exception) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else None
    # The type and place only: an exception's text may quote a payload.
    _state(request).events.emit(API_ERROR, level="error", error_code="internal_error",
                                error=type(exc).__name__, where=where,
                                route=_route_path(request), method=_method(request),
                                request_id=request[_RID])


def _account(request: web.Request, status: int, started: float) -> None:
    st = _state(request)
    st.metrics.request(_method(request), _route_path(request) or "unmatched", status)
    if request.method not in MUTATING:
        return
    principal = request.get(_PRINCIPAL)
    plugin_id = request.match_info.get("id")
    st.events.emit(API_REQUEST, level="info" if status < 400 else "warning",
                   actor=principal.name if principal else None, request_id=request[_RID],
                   route=_route_path(request), method=_method(request), status=status,
                   duration_ms=round((time.perf_counter() - started) * 1000, 3),
                   plugin_id=plugin_id if plugin_id and ID_RE.fullmatch(plugin_id) else None,
                   peer=_peer(request))


def emit_tokens_loaded(events: EventLog, tokens: TokenStore, *, trigger: str) -> None:
    """Write `api.tokens.loaded`: how many tokens, their names, and any file problems."""
    events.emit(API_TOKENS_LOADED, level="warning" if tokens.problems else "info",
                path=str(tokens.path), tokens=len(tokens), names=tokens.names(),
                problems=list(tokens.problems), trigger=trigger)


# ---- the OpenAPI document ------------------------------------------------------------------

_STATUS_TEXT = {
    200: "OK", 201: "Created", 204: "No content", 400: "Invalid input",
    401: "Missing or invalid token", 403: "The token lacks the permission, or a browser "
    "request from another origin", 404: "No such plugin", 409: "Conflict with the "
    "plugin's state (failed reload: the old version serves on)",
    413: "Body over api.max_body_bytes", 429: "Too many denied requests from this address "
    "(api.denied_burst, api.denied_per_second)", 422: "The plugin was refused (signature, manifest "
    "or code)", 501: "Not available in this daemon",
    502: "The plugin raised or returned something that is not JSON, or the registry failed",
    503: "Not ready, or the audit log cannot be written (audit.fail_closed)",
    504: "The plugin did not return within plugins.run_timeout_s",
}
_NULLABLE_STR = {"type": ["string", "null"]}
_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "detail"], "properties": {
        "error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}},
        "detail": {"type": "string"}}},
    "Plugin": {"type": "object", "required": [
        "id", "name", "version", "plugin_type", "state", "enabled", "signature_status",
        "signing_key_id", "error", "path", "loaded_at", "manifest"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "string"},
        "plugin_type": {"type": "string"},
        "state": {"enum": [s.value for s in State]}, "enabled": {"type": "boolean"},
        "signature_status": {"enum": ["verified", "unsigned", "invalid", "skipped", None]},
        "signing_key_id": _NULLABLE_STR,
        "error": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}]},
        "path": {"type": "string"},
        "loaded_at": {"type": ["string", "null"], "format": "date-time"},
        "manifest": {"type": "object"}, "digest": _NULLABLE_STR,
        "path_missing": {"type": "boolean"}}},
    "PluginList": {"type": "object", "required": ["plugins"], "properties": {
        "plugins": {"type": "array", "items": {"$ref": "#/components/schemas/Plugin"}}}},
    "DiscoverResult": {"type": "object", "required": ["discovered", "failed"], "properties": {
        "discovered": {"type": "array", "items": {"type": "string"}},
        "failed": {"type": "array", "items": {"type": "object", "required": ["path", "error"],
                                              "properties": {"path": {"type": "string"},
                                                             "error": {"type": "string"}}}}}},
    "RunRequest": {"type": "object", "additionalProperties": False, "properties": {
        "payload": {"type": "object"}, "context": {"type": "object"}}},
    "RunResult": {"type": "object", "required": ["plugin_id", "result", "duration_ms"],
                  "properties": {"plugin_id": {"type": "string"}, "result": {"type": "object"},
                                 "duration_ms": {"type": "number"}}},
    "InstallRequest": {"type": "object", "required": ["oci_ref"],
                       "additionalProperties": False, "properties": {
                           "oci_ref": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,1024}$",
                                       "maxLength": 1024}}},
    "InstallResult": {"type": "object", "required": ["plugin_id", "oci_ref", "digest"],
                      "properties": {"plugin_id": {"type": "string"},
                                     "oci_ref": {"type": "string"},
                                     "digest": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"const": "ok"}}},
}
_QUERY = {
    "plugin_type": {"enum": sorted(PLUGIN_TYPES)},
    "state": {"enum": [s.value for s in State]},
}


def _media(route: Route) -> dict[str, Any]:
    if route.path == "/metrics":
        return {"text/plain": {"schema": {"type": "string"}}}
    if route.response is None:
        return {"application/json": {"schema": {"type": "object"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.response}"}}}


def _responses(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {str(route.ok): {"description": _STATUS_TEXT[route.ok]}}
    if route.ok != 204:
        out[str(route.ok)]["content"] = _media(route)
    statuses = list(route.errors) + ([401, 403, 429] if route.permission else [])
    statuses += [503] if route.permission in _NEED_AUDIT else []
    for status in sorted(set(statuses)):
        out[str(status)] = {"description": _STATUS_TEXT[status],
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}}
    out["default"] = {"description": "Any other error (421 foreign Host, 405, ...)",
                      "content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{id}" in route.path:
        params.append({"name": "id", "in": "path", "required": True,
                       "description": "The plugin's manifest id.",
                       "schema": {"type": "string", "pattern": ID_RE.pattern}})
    params += [{"name": q, "in": "query", "required": False, "schema": _QUERY[q]}
               for q in route.query]
    return params


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.handler.__name__, "summary": route.summary,
        "x-required-permission": route.permission,
        "security": [{"bearer": []}] if route.permission else [],
    }
    if params := _parameters(route):
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": route.body_required, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
    op["responses"] = _responses(route)
    return op


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 description of every route in `ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "aisoc-plugind control API", "version": __version__,
                 "description": "Plugin lifecycle control of aisoc-plugind. Each operation "
                                "names its one required permission in "
                                "`x-required-permission` (null: no token needed)."},
        "servers": [{"url": "http://127.0.0.1:8470"}],
        "paths": paths,
        "components": {"schemas": _SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "A token from `aisoc-plugind token create`."}}},
    }


def openapi_yaml() -> str:
    """Return `docs/openapi.yaml` as it must be (regenerate it from this)."""
    header = ("# Generated from aisoc_plugind.api ROUTES; do not edit. Regenerate with:\n"
              "#   .venv/bin/python -c 'from aisoc_plugind.api.app import openapi_yaml; "
              "print(openapi_yaml(), end=\"\")' > docs/openapi.yaml\n")
    return header + yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True,
                                   width=100)


# ---- the app -------------------------------------------------------------------------------


def build_app(*, manager: PluginManager, events: EventLog, tokens: TokenStore,
              settings: Settings, ready: Callable[[], bool]) -> web.Application:
    """Return the control-API application (routes, guards, metrics); nothing is started."""
    app = web.Application(middlewares=[_envelope, _guard],
                          client_max_size=settings.api_max_body_bytes)
    state = ApiState(manager=manager, events=events, tokens=tokens, settings=settings,
                     ready=ready, metrics=ApiMetrics(manager.records),
                     unix=settings.api_listen.startswith("unix:"),
                     limiter=DenialLimiter(settings.api_denied_burst,
                                           settings.api_denied_per_second),
                     allowed_hosts=frozenset(h.strip().lower() for h in settings.api_allowed_hosts),
                     spec=_dumps(openapi_document()).encode("utf-8"))
    for route in ROUTES:
        state.routes[app.router.add_route(route.method, route.path, route.handler)] = route
    events.subscribe(state.metrics.observe)
    app[STATE] = state
    return app


# ---- listening -----------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """Return (host, port) of a `HOST:PORT` listen address (IPv6 brackets removed)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def check_listen(settings: Settings) -> None:
    """Raise ConfigError for plain HTTP on a non-loopback address unless allowed explicitly."""
    if settings.api_listen.startswith("unix:"):
        return
    host, _ = split_listen(settings.api_listen)
    tls = settings.api_tls_cert is not None and settings.api_tls_key is not None
    if is_loopback_host(host) or tls or settings.api_allow_insecure_listen:
        return
    raise ConfigError(
        f"api.listen {settings.api_listen} is not a loopback address and no TLS is "
        "configured: tokens would cross the network in clear text. Listen on 127.0.0.1 or "
        "unix:/run/aisoc-plugind/api.sock, set api.tls_cert and api.tls_key, or set "
        "api.allow_insecure_listen = true to accept the risk")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Return the server TLS context (TLS >= 1.2) when cert and key are set; else None."""
    cert, key = settings.api_tls_cert, settings.api_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("api.tls_cert and api.tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load api.tls_cert {cert} / api.tls_key {key}: {exc}"
                          ) from exc
    return context


def _clear_stale_socket(path: Path) -> None:
    """Remove a leftover socket file; refuse anything else, or a socket still in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a stale socket from an earlier run
        return
    finally:
        probe.close()
    raise ConfigError(f"{path} is in use by another process (another daemon running?)")


def bind_unix(path: Path) -> socket.socket:
    """Bind a unix socket at `path`, mode 0660, before it listens (no window at umask mode)."""
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)  # nobody can connect yet: the socket is not listening
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    return sock


def _remove_socket(path: Path, ident: int) -> None:
    """Remove our socket file on exit, unless another process replaced it meanwhile."""
    try:
        if os.lstat(path).st_ino == ident:
            path.unlink()
    except FileNotFoundError:
        pass


@asynccontextmanager
async def _site(runner: web.AppRunner, settings: Settings) -> AsyncIterator[list[str]]:
    """Start listening on `api.listen`; yield the bound addresses; remove a unix socket after."""
    listen = settings.api_listen
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        sock = bind_unix(path)
        await web.SockSite(runner, sock).start()
        ident = os.stat(path).st_ino
        try:
            yield [listen]
        finally:
            _remove_socket(path, ident)
        return
    host, port = split_listen(listen)
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(settings))
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    yield [f"{a[0]}:{a[1]}" if len(a) == 2 else f"[{a[0]}]:{a[1]}" for a in runner.addresses]


@asynccontextmanager
async def api_component(service: Service, manager: PluginManager
                        ) -> AsyncIterator[HangupHook | None]:
    """Serve the control API for the daemon's lifetime; yield the SIGHUP hook (re-read tokens).

    Raises ConfigError before binding anything when the listen address is unsafe.
    """
    settings, events = service.settings, service.events
    check_listen(settings)
    tls_context(settings)  # fail on bad TLS files before anything listens
    tokens = TokenStore(settings.tokens_file)
    emit_tokens_loaded(events, tokens, trigger="startup")
    app = build_app(manager=manager, events=events, tokens=tokens, settings=settings,
                    ready=service.ready.is_set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    try:
        async with _site(runner, settings) as addresses:
            events.emit(API_LISTENING, listen=settings.api_listen, addresses=addresses,
                        tls=settings.api_tls_cert is not None and not
                        settings.api_listen.startswith("unix:"))

            async def hangup() -> None:
                tokens.reload()
                emit_tokens_loaded(events, tokens, trigger="sighup")

            yield hangup
    finally:
        await runner.cleanup()
