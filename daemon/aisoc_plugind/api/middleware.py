"""Wrap every request: request id, guards, JSON errors, denial and request events, metrics."""

from __future__ import annotations

import math
import re
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from aisoc_plugind.api.context import (
    KNOWN_METHODS,
    MUTATING,
    PRINCIPAL,
    RID,
    ROUTE,
    ApiState,
    Handler,
    state_of,
)
from aisoc_plugind.api.errors import (
    ApiError,
    error_response,
    status_for,
)
from aisoc_plugind.api.guards import (
    NEED_AUDIT,
    audit_down,
    authorize,
    browser_refusal,
    host_allowed,
    request_id,
    too_large,
)
from aisoc_plugind.audit import names
from aisoc_plugind.core.manifest import ID_RE
from aisoc_plugind.errors import PluginDError

__all__ = ["envelope", "guard"]


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Server": "aisoc-plugind",
}


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = state_of(request)
    route = st.routes.get(request.match_info.route)
    if route is not None:
        request[ROUTE] = route
    if not st.unix and not host_allowed(request.headers.get("Host"), st.allowed_hosts):
        raise ApiError(
            "the Host header names no address of this API (api.allowed_hosts)",
            code="host_not_allowed",
            status=421,
            reason="host_not_allowed",
        )
    refusal = browser_refusal(request.headers, st.allowed_hosts)
    if refusal is not None:
        raise ApiError(
            "browser requests from other origins are refused",
            code="origin_not_allowed",
            status=403,
            reason=refusal,
        )
    if (request.content_length or 0) > st.settings.api_max_body_bytes:
        raise too_large(st.settings)
    if route is not None and route.permission is not None:
        request[PRINCIPAL] = authorize(request, st, route.permission)
        if route.permission in NEED_AUDIT and await audit_down(st):
            raise ApiError(
                "the audit log cannot be written, so changes and runs are refused until it "
                f"can ({st.events.failure})",
                code="audit_unavailable",
                status=503,
                reason="audit_unavailable",
            )
    return await handler(request)


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[RID] = rid = request_id(request.headers.get("X-Request-Id"))
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
        return error_response(
            500, "internal_error", f"internal error (request id {request[RID]}); see the daemon log"
        )


def _from_http(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        return _from_error(request, too_large(state_of(request).settings))
    if exc.status == 404:
        return error_response(404, "not_found", "no such route")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here; allowed: {allow}",
            headers={"Allow": allow},
        )
    code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_") or "http_error"
    return error_response(exc.status, code, exc.reason)


def _from_error(request: web.Request, exc: PluginDError) -> web.Response:
    headers: Mapping[str, str] = {}
    if isinstance(exc, ApiError):
        if exc.reason is not None:
            exc = _denied(request, exc)
        headers = exc.headers
    return error_response(status_for(exc), exc.code, exc.message, headers=headers)


def _method(request: web.Request) -> str:
    return request.method if request.method in KNOWN_METHODS else "OTHER"


def _route_path(request: web.Request) -> str | None:
    route = request.get(ROUTE)
    return route.path if route is not None else None


def _peer(request: web.Request) -> str | None:
    if not state_of(request).unix:
        return request.remote
    sock: Any = request.transport.get_extra_info("socket") if request.transport else None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "unix"
    pid, uid, gid = struct.unpack("3i", creds)
    return f"unix:uid={uid},gid={gid},pid={pid}"


def _denied(request: web.Request, exc: ApiError) -> ApiError:
    """Audit a denial, or, past its budget, turn it into a counted 429.

    The budget is kept per token when the denial names one (a real token lacking a
    permission, or expired) and per address otherwise, so junk from anyone cannot spend a
    real token's budget and mute its denials.
    """
    st = state_of(request)
    peer = _peer(request) or "unknown"
    actor = exc.actor
    budget = f"token:{actor}" if actor else f"peer:{peer}"
    suppressed: int | None = None
    if st.limiter.take(budget):
        suppressed = st.limiter.pending(budget) or None
    else:
        st.metrics.denied("rate_limited")
        if not st.limiter.suppress(budget):
            return _rate_limited(st, actor)
        exc = _rate_limited(st, actor)  # the first limited request of a burst is audited
    route = request.get(ROUTE)
    reason = exc.reason or exc.code
    if reason != "rate_limited":
        st.metrics.denied(reason)
    st.events.emit(
        names.API_DENIED,
        level="warning",
        route=_route_path(request),
        method=_method(request),
        status=exc.status,
        required_permission=route.permission if route else None,
        reason=reason,
        actor=actor,
        peer=peer,
        request_id=request[RID],
        suppressed=suppressed,
    )
    return exc


def _rate_limited(st: ApiState, actor: str | None) -> ApiError:
    retry = max(1, math.ceil(1 / st.settings.api_denied_per_second))
    who = f"for token {actor!r}" if actor else "from this address"
    return ApiError(
        f"too many denied requests {who}; slow down",
        code="too_many_denied_requests",
        status=429,
        reason="rate_limited",
        headers={"Retry-After": str(retry)},
        actor=actor,
    )


def _internal_error(request: web.Request, exc: Exception) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else None
    # The type and place only: an exception's text may quote a payload.
    state_of(request).events.emit(
        names.API_ERROR,
        level="error",
        error_code="internal_error",
        error=type(exc).__name__,
        where=where,
        route=_route_path(request),
        method=_method(request),
        request_id=request[RID],
    )


def _account(request: web.Request, status: int, started: float) -> None:
    st = state_of(request)
    st.metrics.request(_method(request), _route_path(request) or "unmatched", status)
    principal = request.get(PRINCIPAL)
    if request.method not in MUTATING or principal is None:
        return  # denials have their own budgeted api.denied; unauthenticated ones nothing more
    plugin_id = request.match_info.get("id")
    st.events.emit(
        names.API_REQUEST,
        level="info" if status < 400 else "warning",
        actor=principal.name,
        request_id=request[RID],
        route=_route_path(request),
        method=_method(request),
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        plugin_id=plugin_id if plugin_id and ID_RE.fullmatch(plugin_id) else None,
        peer=_peer(request),
    )
