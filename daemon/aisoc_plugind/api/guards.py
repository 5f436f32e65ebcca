"""Decide who may call what: Host and Origin checks, bearer tokens, the denial budget."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import re
import secrets
from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from aiohttp import web

from aisoc_plugind.api.context import (
    ApiState,
)
from aisoc_plugind.api.errors import (
    ApiError,
)
from aisoc_plugind.api.tokens import ADMIN, EXECUTE, Principal, TokenStore, denial_reason
from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.listen import is_loopback_host

__all__ = [
    "NEED_AUDIT",
    "audit_down",
    "authorize",
    "browser_refusal",
    "emit_tokens_loaded",
    "host_allowed",
    "host_name",
    "in_networks",
    "request_id",
    "too_large",
]


_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9-]{8,64}")


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
    if len(host_header) > _MAX_HOST:
        return False
    return _host_allowed(host_header, frozenset(allowed))


_MAX_HOST = 300


@functools.lru_cache(maxsize=256)  # a client sends the same Host on every request
def _host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    name = host_name(host_header)
    return (
        is_loopback_host(name)
        or name in allowed
        or host_header.strip().lower() in allowed
        or in_networks(name, allowed)
    )


def in_networks(name: str, allowed: frozenset[str]) -> bool:
    """Return True when `name` is an IP address inside a CIDR entry of `allowed`."""
    networks = _networks(allowed)
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a DNS name never matches a network: only literal addresses do
    return any(address in network for network in networks)


@functools.lru_cache(maxsize=8)
def _networks(allowed: frozenset[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for entry in allowed:
        if "/" in entry:
            with contextlib.suppress(ValueError):  # settings refused invalid entries already
                nets.append(ipaddress.ip_network(entry, strict=False))
    return tuple(nets)


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
    if same or hostname in allowed or in_networks(hostname, frozenset(allowed)):
        return None
    return "origin_not_allowed"


# A new request id: 16 random hex characters drawn once per process, then a counter (32 hex
# characters like a uuid4 hex). Unique per daemon run and across runs; not a secret.
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


def request_id(candidate: str | None) -> str:
    """Return the client's X-Request-Id when it is safe to echo, else a new unique id."""
    if candidate is not None and _REQUEST_ID_RE.fullmatch(candidate):
        return candidate
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


# Changes and runs must leave an audit record (research item 25: fail closed); reads need not.
NEED_AUDIT = frozenset({ADMIN, EXECUTE})


async def audit_down(st: ApiState) -> bool:
    """Return True while the audit file is failing and `audit.fail_closed` is set.

    The writer thread knows (it retries with backoff and heals by itself); a request that
    finds it failing asks for a retry now and waits a moment for it. Nothing here touches
    the file.
    """
    return st.settings.audit_fail_closed and not await st.events.writable()


def authorize(request: web.Request, st: ApiState, permission: str) -> Principal:
    """Return the caller's principal when its token holds `permission`; raise a denial."""
    header, generation = request.headers.get("Authorization"), st.tokens.generation
    principal = st.tokens.authenticate(header)  # re-reads the file first when it changed
    if st.tokens.generation != generation:
        emit_tokens_loaded(st.events, st.tokens, trigger="file_changed")
    if principal is None:
        expired = st.tokens.expired_name(header)
        reason = "token_expired" if expired else denial_reason(header)
        text = (
            "missing bearer token"
            if reason == "token_missing"
            else f"token {expired!r} has expired"
            if expired
            else "invalid token"
        )
        raise ApiError(
            f"{text}: send Authorization: Bearer <token>",
            code="unauthorized",
            status=401,
            reason=reason,
            headers={"WWW-Authenticate": 'Bearer realm="aisoc-plugind"'},
            actor=expired,
        )
    if not principal.allows(permission):
        raise ApiError(
            f"token {principal.name!r} lacks the permission {permission}",
            code="permission_denied",
            status=403,
            reason="permission_missing",
            actor=principal.name,  # the denial event and its budget name the token
        )
    return principal


def too_large(settings: Settings) -> ApiError:
    """Return the denial of a body over `api.max_body_bytes`."""
    return ApiError(
        f"the request body exceeds {settings.api_max_body_bytes} bytes",
        code="payload_too_large",
        status=413,
        reason="body_too_large",
    )


def emit_tokens_loaded(events: EventLog, tokens: TokenStore, *, trigger: str) -> None:
    """Write `api.tokens.loaded`: how many tokens, their names, and any file problems; or
    `api.tokens.refused` when the file may not be trusted (the tokens before stay)."""
    if tokens.refused is not None:
        events.emit(
            names.API_TOKENS_REFUSED,
            level="error",
            path=str(tokens.path),
            error_code=tokens.refused.code,
            error=tokens.refused.message,
            tokens=len(tokens),
            trigger=trigger,
        )
        return
    events.emit(
        names.API_TOKENS_LOADED,
        level="warning" if tokens.problems else "info",
        path=str(tokens.path),
        tokens=len(tokens),
        names=tokens.names(),
        problems=list(tokens.problems),
        trigger=trigger,
    )
