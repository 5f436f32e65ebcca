"""Wrap every request: request id, guards, JSON errors, denial and request events, metrics."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from aisoc_plugind.api.context import (
    CALL,
    KNOWN_METHODS,
    MUTATING,
    STATE,
    ApiState,
    Call,
    Handler,
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
from aisoc_plugind.engine.hosts.faults import cancelled_here
from aisoc_plugind.errors import PluginDError

__all__ = ["envelope"]


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Server": "aisoc-plugind",
}


def _admit(request: web.Request, call: Call) -> bool:
    """Check Host, Origin, size and the bearer token (raise a denial); return True when the
    route changes something or runs code, so the audit log must be writable first."""
    st = call.state
    call.route = route = st.routes.get(request.match_info.route)
    headers = request.headers
    if not st.unix and not host_allowed(headers.get("Host"), st.allowed_hosts):
        raise ApiError(
            "the Host header names no address of this API (api.allowed_hosts)",
            code="host_not_allowed",
            status=421,
            reason="host_not_allowed",
        )
    refusal = browser_refusal(headers, st.allowed_hosts)
    if refusal is not None:
        raise ApiError(
            "browser requests from other origins are refused",
            code="origin_not_allowed",
            status=403,
            reason=refusal,
        )
    if (request.content_length or 0) > st.settings.api_max_body_bytes:
        raise too_large(st.settings)
    if route is None or route.permission is None:
        return False
    call.principal = authorize(request, st, route.permission)
    return route.permission in NEED_AUDIT


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: request id, guards, the handler, JSON errors, accounting."""
    call = Call(request.app[STATE], request_id(request.headers.get("X-Request-Id")))
    request[CALL] = call
    started = time.perf_counter()
    gate = call.state.gate
    gate.started(request.transport)
    try:
        response = await _answer(request, call, handler)
    finally:
        gate.finished(request.transport)
    if response.status == 408:
        response.force_close()  # the rest of the body is still on its way: drop it
    headers = response.headers
    headers.update(_SECURITY_HEADERS)
    headers["X-Request-Id"] = call.request_id
    _account(request, call, response.status, started)
    return response


async def _answer(request: web.Request, call: Call, handler: Handler) -> web.StreamResponse:
    st = call.state
    try:
        if _admit(request, call) and st.events.failure is not None and await audit_down(st):
            raise ApiError(
                "the audit log cannot be written, so changes and runs are refused until it "
                f"can ({st.events.failure})",
                code="audit_unavailable",
                status=503,
                reason="audit_unavailable",
            )
        if call.principal is None or not request.body_exists:
            return await handler(request)  # refused ones never get here: bodies never read
        size = _reserve_body(request, call)
        try:
            await _read_body(request, st.settings.api_body_timeout_s)
            return await handler(request)
        finally:
            st.budget.give(size)
    except web.HTTPException as exc:
        return _from_http(request, call, exc)
    except PluginDError as exc:
        return _from_error(request, call, exc)
    except BaseException as exc:  # the last line of defence: never a bare 500 page or a crash
        if cancelled_here(exc):
            raise
        _internal_error(request, call, exc)
        return error_response(
            500,
            "internal_error",
            f"internal error (request id {call.request_id}); see the daemon log",
        )


def _reserve_body(request: web.Request, call: Call) -> int:
    """Reserve an authorised request's body size in the body budget
    (`api.max_body_bytes_total`) until its handler is done; return the size (503 else).

    Bodies of requests that are refused (no token, unknown route) are never read.
    """
    st = call.state
    limit = st.settings.api_max_body_bytes
    size = min(request.content_length or limit, limit)
    if not st.budget.take(size):
        raise ApiError(
            "the daemon holds too many request bodies at once (api.max_body_bytes_total); "
            "retry shortly",
            code="server_busy",
            status=503,
            headers={"Retry-After": "1"},
        )
    return size


async def _read_body(request: web.Request, timeout_s: float) -> None:
    """Read the whole body within `api.body_timeout_s` (aiohttp keeps it for the handler);
    raise 408 or 400."""
    try:
        if request.content.is_eof():  # all of it came with the headers: nothing to wait for
            await request.read()
            return
        async with asyncio.timeout(timeout_s):
            await request.read()
    except TimeoutError as exc:
        raise ApiError(
            f"the request body did not arrive within api.body_timeout_s ({timeout_s:g} s)",
            code="request_timeout",
            status=408,
        ) from exc
    except (web.RequestPayloadError, ConnectionError) as exc:
        raise ApiError(
            "the request body could not be read (malformed chunked encoding, or the "
            "connection broke)",
            code="invalid_body",
            status=400,
        ) from exc


def _from_http(request: web.Request, call: Call, exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        return _from_error(request, call, too_large(call.state.settings))
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


def _from_error(request: web.Request, call: Call, exc: PluginDError) -> web.Response:
    headers: Mapping[str, str] = {}
    if isinstance(exc, ApiError):
        if exc.reason is not None:
            exc = _denied(request, call, exc)
        headers = exc.headers
    # No plugin's configuration value leaves in an answer, whatever error text quoted it.
    message = call.state.manager.redactor(exc.message)
    return error_response(status_for(exc), exc.code, message, headers=headers)


def _method(request: web.Request) -> str:
    return request.method if request.method in KNOWN_METHODS else "OTHER"


def _route_path(call: Call) -> str | None:
    route = call.route
    return route.path if route is not None else None


def _peer(request: web.Request, call: Call) -> str | None:
    if not call.state.unix:
        return request.remote
    sock: Any = request.transport.get_extra_info("socket") if request.transport else None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "unix"
    pid, uid, gid = struct.unpack("3i", creds)
    return f"unix:uid={uid},gid={gid},pid={pid}"


def _denied(request: web.Request, call: Call, exc: ApiError) -> ApiError:
    """Audit a denial, or, past its budget, turn it into a counted 429.

    The budget is kept per token when the denial names one (a real token lacking a
    permission, or expired) and per address otherwise, so junk from anyone cannot spend a
    real token's budget and mute its denials.
    """
    st = call.state
    peer = _peer(request, call) or "unknown"
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
    route = call.route
    reason = exc.reason or exc.code
    if reason != "rate_limited":
        st.metrics.denied(reason)
    st.events.emit(
        names.API_DENIED,
        level="warning",
        route=_route_path(call),
        method=_method(request),
        status=exc.status,
        required_permission=route.permission if route else None,
        reason=reason,
        actor=actor,
        peer=peer,
        request_id=call.request_id,
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


def _internal_error(request: web.Request, call: Call, exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else None
    # The type and place only: an exception's text may quote a payload.
    call.state.events.emit(
        names.API_ERROR,
        level="error",
        error_code="internal_error",
        error=type(exc).__name__,
        where=where,
        route=_route_path(call),
        method=_method(request),
        request_id=call.request_id,
    )


def _account(request: web.Request, call: Call, status: int, started: float) -> None:
    st, method = call.state, request.method
    st.metrics.request(
        method if method in KNOWN_METHODS else "OTHER", _route_path(call) or "unmatched", status
    )
    principal = call.principal
    if method not in MUTATING or principal is None:
        return  # denials have their own budgeted api.denied; unauthenticated ones nothing more
    if call.run_audited:
        return  # one event per run: plugin.run.completed or plugin.run.failed says it all
    plugin_id = request.match_info.get("id")
    st.events.emit(
        names.API_REQUEST,
        level="info" if status < 400 else "warning",
        actor=principal.name,
        request_id=call.request_id,
        route=_route_path(call),
        method=_method(request),
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        plugin_id=plugin_id if plugin_id and ID_RE.fullmatch(plugin_id) else None,
        peer=_peer(request, call),
    )
