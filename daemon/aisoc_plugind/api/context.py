"""Hold what every request handler can reach: the shared state, routes, per-request keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from aisoc_plugind.api.budget import BodyBudget
from aisoc_plugind.api.connections import ConnectionGate
from aisoc_plugind.api.limiter import DenialLimiter
from aisoc_plugind.api.metrics import ApiMetrics
from aisoc_plugind.api.tokens import Principal, TokenStore
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.engine.results import Caller

__all__ = [
    "CALL",
    "KNOWN_METHODS",
    "MUTATING",
    "STATE",
    "ApiState",
    "Call",
    "Handler",
    "Route",
    "call_of",
    "caller_of",
    "state_of",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})


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
    gate: ConnectionGate
    budget: BodyBudget
    spec: bytes = b""
    routes: dict[AbstractRoute, Route] = field(default_factory=dict)


STATE = web.AppKey("aisoc_api_state", ApiState)


@dataclass(slots=True)
class Call:
    """One request as the API sees it: set up by the middleware, read by handlers."""

    state: ApiState
    request_id: str
    route: Route | None = None
    principal: Principal | None = None
    run_audited: bool = False  # the call reached a run: the run writes its own event

    def caller(self) -> Caller:
        """Return who is calling, for the audit trail: the token's name and the request id."""
        principal = self.principal
        return Caller(
            actor=principal.name if principal is not None else None, request_id=self.request_id
        )


CALL = web.RequestKey("aisoc_call", Call)


def state_of(request: web.Request) -> ApiState:
    """Return the API's shared state."""
    return request.app[STATE]


def call_of(request: web.Request) -> Call:
    """Return the request's `Call` (the middleware made it)."""
    return request[CALL]


def caller_of(request: web.Request) -> Caller:
    """Return who is calling, for the audit trail: the token's name and the request id."""
    return request[CALL].caller()
