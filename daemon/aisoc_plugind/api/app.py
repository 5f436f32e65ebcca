"""Build the control-API application and serve it for the daemon's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

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

__all__ = ["HangupHook", "build_app", "serve"]


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
        spec=dumps(openapi_document()).encode("utf-8"),
    )
    # aiohttp tries the routes under one path prefix in the order they were added: the run
    # route, the one called at volume, goes first.
    for route in sorted(ROUTES, key=lambda r: not r.path.endswith("/run")):
        state.routes[app.router.add_route(route.method, route.path, route.handler)] = route
    events.subscribe(state.metrics.observe, state.metrics.OBSERVED)
    app[STATE] = state
    return app


# The SIGHUP hook the service runs after re-reading keys: here, re-read the tokens file.
HangupHook = Callable[[], Awaitable[None]]


@asynccontextmanager
async def serve(
    *, settings: Settings, events: EventLog, manager: PluginManager, ready: Callable[[], bool]
) -> AsyncIterator[HangupHook]:
    """Serve the control API until the block ends; yield the SIGHUP hook (re-read tokens).

    Raises ConfigError before binding anything when the listen address is unsafe.
    """
    check_listen(settings)
    tls_context(settings)  # fail on bad TLS files before anything listens
    tokens = TokenStore(settings.tokens_file)
    emit_tokens_loaded(events, tokens, trigger="startup")
    app = build_app(manager=manager, events=events, tokens=tokens, settings=settings, ready=ready)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    tokens.flag.attach(asyncio.get_running_loop())  # no stat() per request where inotify works
    try:
        async with listening(runner, settings) as addresses:
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
        await runner.cleanup()
