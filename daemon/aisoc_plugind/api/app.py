"""Build the control-API application and serve it for the daemon's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiohttp import web

from aisoc_plugind.api.budget import BodyBudget
from aisoc_plugind.api.connections import (
    MAX_HEADERS,
    MAX_LINE_BYTES,
    ConnectionGate,
    GateLimits,
)
from aisoc_plugind.api.context import (
    STATE,
    ApiState,
)
from aisoc_plugind.api.errors import (
    dumps,
)
from aisoc_plugind.api.guards import emit_tokens_loaded
from aisoc_plugind.api.limiter import DenialLimiter
from aisoc_plugind.api.listen import check_listen, listening, tls_context
from aisoc_plugind.api.metrics import ApiMetrics
from aisoc_plugind.api.middleware import envelope
from aisoc_plugind.api.openapi import openapi_document
from aisoc_plugind.api.routes import ROUTES
from aisoc_plugind.api.tokens import TokenStore
from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.errors import ConfigError

__all__ = [
    "CLOSE_WAIT_MAX_S",
    "LINGER_S",
    "HangupHook",
    "build_app",
    "close_wait_s",
    "connection_gate",
    "request_handler_args",
    "serve",
]


def build_app(
    *,
    manager: PluginManager,
    events: EventLog,
    tokens: TokenStore,
    settings: Settings,
    ready: Callable[[], bool],
) -> web.Application:
    """Return the control-API application (routes, guards, metrics); nothing is started."""
    app = web.Application(middlewares=[envelope], client_max_size=settings.api_max_body_bytes)
    state = ApiState(
        manager=manager,
        events=events,
        tokens=tokens,
        settings=settings,
        ready=ready,
        metrics=ApiMetrics(manager.records),
        unix=settings.listen.is_unix,
        limiter=DenialLimiter(settings.api_denied_burst, settings.api_denied_per_second),
        allowed_hosts=frozenset(h.strip().lower() for h in settings.api_allowed_hosts),
        gate=connection_gate(settings, events),
        budget=BodyBudget(settings.api_max_body_bytes_total),
        spec=dumps(openapi_document()).encode("utf-8"),
    )
    # aiohttp tries the routes under one path prefix in the order they were added: the run
    # route, the one called at volume, goes first.
    for route in sorted(ROUTES, key=lambda r: not r.path.endswith("/run")):
        state.routes[app.router.add_route(route.method, route.path, route.handler)] = route
    events.subscribe(state.metrics.observe, state.metrics.OBSERVED)
    app[STATE] = state
    return app


def connection_gate(settings: Settings, events: EventLog) -> ConnectionGate:
    """Return the gate that bounds the API's connections (`api.max_connections`, ...)."""

    def notify(**fields: object) -> None:
        events.emit(names.API_CONNECTIONS_LIMITED, level="warning", **fields)

    limits = GateLimits(
        max_total=settings.api_max_connections,
        max_per_peer=settings.api_max_connections_per_host,
        header_timeout_s=settings.api_header_timeout_s,
        write_timeout_s=settings.api_body_timeout_s,
        unix=settings.listen.is_unix,
    )
    return ConnectionGate(limits, notify)


# After a response, aiohttp reads and drops what is left of an unread request body for at
# most this long, so that the client sees the answer rather than a reset.
LINGER_S = 2.0


# The SIGHUP hook the service runs after re-reading keys: here, re-read the tokens file.
HangupHook = Callable[[], Awaitable[None]]


# At shutdown, once the runs in flight were answered (`drained`), requests still running get
# this long to answer (a tenth of the grace at most), then aiohttp cancels them.
CLOSE_WAIT_MAX_S = 1.0


def close_wait_s(settings: Settings) -> float:
    """Return how long requests still running when the API closes may take to answer."""
    return min(CLOSE_WAIT_MAX_S, settings.shutdown_grace_s / 10)


@asynccontextmanager
async def serve(
    *,
    settings: Settings,
    events: EventLog,
    manager: PluginManager,
    ready: Callable[[], bool],
    drained: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[HangupHook]:
    """Serve the control API until the block ends; yield the SIGHUP hook (re-read tokens).

    When the block ends the API stops accepting connections, awaits `drained` (the service
    lets the runs in flight finish, or cuts them so that each still gets its answer), then
    closes the connections (`close_wait_s`).

    Raises ConfigError before binding anything when the listen address is unsafe, or when
    the tokens file may not be trusted (`tokens_file_insecure`, after `api.tokens.refused`).
    """
    check_listen(settings)
    tls_context(settings)  # fail on bad TLS files before anything listens
    tokens = TokenStore(settings.tokens_file)
    emit_tokens_loaded(events, tokens, trigger="startup")
    if tokens.refused is not None:  # a tokens file that may not be trusted: do not start
        raise ConfigError(tokens.refused.message, code=tokens.refused.code)
    app = build_app(manager=manager, events=events, tokens=tokens, settings=settings, ready=ready)
    handler_args = request_handler_args(settings)
    runner = web.AppRunner(app, shutdown_timeout=close_wait_s(settings), **handler_args)
    await runner.setup()
    tokens.flag.attach(asyncio.get_running_loop())  # no stat() per request where inotify works
    try:
        async with listening(runner, settings, app[STATE].gate, handler_args) as addresses:
            events.emit(
                names.API_LISTENING,
                listen=settings.api_listen,
                addresses=addresses,
                tls=settings.api_tls_cert is not None and not settings.listen.is_unix,
            )

            async def hangup() -> None:
                tokens.reload()
                emit_tokens_loaded(events, tokens, trigger="sighup")

            yield hangup
    finally:
        tokens.flag.close()
        with anyio.CancelScope(shield=True):  # a start cancelled midway still closes
            await _close(runner, drained)


def request_handler_args(settings: Settings) -> dict[str, Any]:
    """Return the settings of every connection's request handler (no access log: requests
    are events; keep-alive and lingering times; request line and header limits)."""
    return {
        "access_log": None,
        "keepalive_timeout": settings.api_keepalive_timeout_s,
        "lingering_time": LINGER_S,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_LINE_BYTES,
        "max_headers": MAX_HEADERS,
    }


async def _close(runner: web.AppRunner, drained: Callable[[], Awaitable[None]] | None) -> None:
    """Stop accepting, let the service drain the runs in flight, close the connections."""
    for site in list(runner.sites):
        await site.stop()
    if drained is not None:
        await drained()
    await runner.cleanup()
