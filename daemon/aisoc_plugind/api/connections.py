"""Bound the API's connections: caps per client and in total, head and write-stall timeouts.

Nobody needs a token to open a connection, so every connection is accounted for before
aiohttp sees a byte of it. aiohttp bounds idle keep-alive time (`api.keepalive_timeout_s`)
and the size of a request head, but not how many connections are open, how long a request
head may take to arrive, or how long a response may wait on a client that does not read.
Each accepted connection is wrapped in a `GuardedProtocol` (a thin proxy in front of
aiohttp's request handler) and tracked by one `ConnectionGate`:

- At most `api.max_connections` are open, `api.max_connections_per_host` per client (TCP:
  its IP address; unix socket: the peer's uid). Over a limit, the oldest connection of that
  client (or of all) that is not inside a request (idle, or still sending its head) is
  closed to make room; when every one is inside a request, the new connection is answered
  503 `too_many_connections` and closed. A local user who opens connections by the
  thousand so only ever displaces idle ones, never a request that was received.
- A request head must be complete within `api.header_timeout_s` of the connection opening
  (or of the first byte of the next request on it): else 408 `request_header_timeout` and
  the connection is closed. The same bound applies to a TLS handshake.
- A response that cannot be written because the client stopped reading is given
  `api.body_timeout_s`; then the connection is dropped.

A request aiohttp cannot parse (a malformed request line, header or chunked body, a head
over the size limits) never reaches the application: `JsonErrorsHandler` answers it with the
API's JSON error shape and a code (`bad_request`, ...) instead of aiohttp's text page, and
logs it at debug level rather than as an error per bad request.

The middleware tells the gate when a request's head has arrived (`started`) and when the
handler is done with it (`finished`). Closing a connection is announced with
`api.connections.limited`, at most one event per reason and action every `EVENT_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from aisoc_plugind.api.errors import dumps, error_body, error_response

__all__ = [
    "EVENT_INTERVAL_S",
    "MAX_HEADERS",
    "MAX_LINE_BYTES",
    "ConnectionGate",
    "GateLimits",
    "GuardedProtocol",
    "GuardedSite",
    "JsonErrorsHandler",
    "LimitNotice",
    "canned_response",
    "handler_factory",
    "peer_key",
]

EVENT_INTERVAL_S = 10.0

# (reason, action, peer, limit, open, suppressed) -> None: the API writes the event.
LimitNotice = Callable[..., None]


@dataclass(frozen=True, slots=True, kw_only=True)
class GateLimits:
    """What the gate enforces (from `[api]`)."""

    max_total: int
    max_per_peer: int
    header_timeout_s: float
    write_timeout_s: float
    unix: bool = False


def peer_key(transport: asyncio.BaseTransport, unix: bool) -> str:
    """Return who a connection counts against: `ip` on TCP, `unix:uid=N` on a unix socket."""
    if unix:
        sock: Any = transport.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (AttributeError, OSError):
            return "unix"
        return f"unix:uid={struct.unpack('3i', creds)[1]}"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return "unknown"


def canned_response(status: int, reason: str, code: str, message: str) -> bytes:
    """Return a complete HTTP/1.1 error response that closes the connection (written by the
    gate itself, where no aiohttp request exists)."""
    body = dumps(error_body(code, message)).encode("ascii")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Server: aisoc-plugind\r\n" + ("Retry-After: 1\r\n" if status == 503 else "") + "\r\n"
    )
    return head.encode("ascii") + body


_TOO_MANY = canned_response(
    503,
    "Service Unavailable",
    "too_many_connections",
    "too many open connections (api.max_connections, api.max_connections_per_host); retry shortly",
)
_HEAD_TIMEOUT = canned_response(
    408,
    "Request Timeout",
    "request_header_timeout",
    "the request line and headers did not arrive within api.header_timeout_s",
)


@dataclass(eq=False, slots=True)
class _Conn:
    """One open connection as the gate sees it."""

    transport: asyncio.BaseTransport
    key: str
    busy: bool = False  # a request's head arrived and its handler has not finished
    paused: bool = False  # the transport's write buffer is full: the client does not read
    head_timer: asyncio.TimerHandle | None = None
    stall_timer: asyncio.TimerHandle | None = None

    def cancel_timers(self) -> None:
        for timer in (self.head_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.stall_timer = None


@dataclass(slots=True)
class _Notices:
    """Rate-limited `api.connections.limited` events: one per reason and action per
    interval; the next one says how many were left out (`suppressed`)."""

    notify: LimitNotice | None
    interval_s: float = EVENT_INTERVAL_S
    last: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)

    def note(self, reason: str, action: str, peer: str, **fields: int) -> None:
        now, key = time.monotonic(), f"{reason}:{action}"
        last = self.last.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        self.last[key] = now
        suppressed = self.suppressed.pop(key, 0)
        if self.notify is not None:
            self.notify(
                reason=reason, action=action, peer=peer, suppressed=suppressed or None, **fields
            )


class ConnectionGate:
    """Account for every open connection; see the module docstring for the rules."""

    def __init__(self, limits: GateLimits, notify: LimitNotice | None = None) -> None:
        self.limits = limits
        # Both kept in age order (oldest first); a connection moves to the end when a
        # request ends on it, so the front holds the longest-idle ones.
        self._all: dict[asyncio.BaseTransport, _Conn] = {}
        self._by_peer: dict[str, dict[asyncio.BaseTransport, _Conn]] = {}
        self._notices = _Notices(notify)
        self.closed: dict[str, int] = {}  # reason -> connections the gate closed

    @property
    def open(self) -> int:
        """Return how many connections are open (and accounted for)."""
        return len(self._all)

    def peer_count(self, key: str) -> int:
        """Return how many connections `key` has open."""
        return len(self._by_peer.get(key, ()))

    # Called by GuardedProtocol.

    def admit(self, transport: asyncio.BaseTransport) -> _Conn | None:
        """Account for a new connection, making room when a limit is reached; return None
        (after answering 503 and closing it) when no room can be made."""
        limits = self.limits
        key = peer_key(transport, limits.unix)
        mine = self._by_peer.get(key, {})
        for table, reason, limit in (
            (mine, "per_host_limit", limits.max_per_peer),
            (self._all, "total_limit", limits.max_total),
        ):
            if len(table) >= limit and not self._make_room(table, key, reason, limit):
                self._refuse(transport, key, reason, limit)
                return None
        conn = _Conn(transport=transport, key=key)
        self._all[transport] = conn
        self._by_peer.setdefault(key, {})[transport] = conn
        self._arm_head(conn)
        return conn

    def received(self, conn: _Conn) -> None:
        """Bytes arrived: outside a request they start the next head's clock."""
        if not conn.busy and conn.head_timer is None and conn.transport in self._all:
            self._arm_head(conn)

    def forget(self, conn: _Conn) -> None:
        """The connection is gone."""
        conn.cancel_timers()
        if self._all.pop(conn.transport, None) is not None:
            mine = self._by_peer.get(conn.key)
            if mine is not None:
                mine.pop(conn.transport, None)
                if not mine:
                    del self._by_peer[conn.key]

    def write_paused(self, conn: _Conn) -> None:
        """The client stopped reading: give it `write_timeout_s` to start again."""
        conn.paused = True
        if conn.stall_timer is None:
            loop = asyncio.get_running_loop()
            conn.stall_timer = loop.call_later(self.limits.write_timeout_s, self._stalled, conn)

    def write_resumed(self, conn: _Conn) -> None:
        """The client reads again."""
        conn.paused = False
        if conn.stall_timer is not None:
            conn.stall_timer.cancel()
            conn.stall_timer = None

    # Called by the middleware.

    def started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's head has arrived on `transport`: it is inside a request now."""
        conn = self._all.get(transport) if transport is not None else None
        if conn is not None:
            conn.busy = True
            if conn.head_timer is not None:
                conn.head_timer.cancel()
                conn.head_timer = None

    def finished(self, transport: asyncio.BaseTransport | None) -> None:
        """The request's handler is done: the connection is idle (and youngest) again."""
        conn = self._all.get(transport) if transport is not None else None
        if conn is not None:
            conn.busy = False
            for table in (self._all, self._by_peer.get(conn.key, {})):
                table[conn.transport] = table.pop(conn.transport)

    def close(self) -> None:
        """Cancel every timer (the server is stopping; aiohttp closes the connections)."""
        for conn in self._all.values():
            conn.cancel_timers()

    # Decisions.

    def _make_room(
        self, table: dict[asyncio.BaseTransport, _Conn], key: str, reason: str, limit: int
    ) -> bool:
        victim = next((c for c in table.values() if not c.busy and not c.paused), None)
        if victim is None:
            return False
        self._drop(victim, reason)
        self._notices.note(reason, "evicted", key, limit=limit, open=self.open)
        return True

    def _refuse(self, transport: asyncio.BaseTransport, key: str, reason: str, limit: int) -> None:
        _answer_and_close(transport, _TOO_MANY)
        self._count(reason)
        self._notices.note(reason, "refused", key, limit=limit, open=self.open)

    def _arm_head(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.head_timer = loop.call_later(self.limits.header_timeout_s, self._head_late, conn)

    def _head_late(self, conn: _Conn) -> None:
        conn.head_timer = None
        if conn.busy or conn.paused or conn.transport not in self._all:
            return
        _answer_and_close(conn.transport, _HEAD_TIMEOUT)
        self._drop(conn, "header_timeout", close=False)
        self._notices.note("header_timeout", "closed", conn.key, open=self.open)

    def _stalled(self, conn: _Conn) -> None:
        conn.stall_timer = None
        if not conn.paused or conn.transport not in self._all:
            return
        transport = conn.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()  # nothing more can be written to it: drop what is buffered
        self._drop(conn, "write_timeout", close=False)
        self._notices.note("write_timeout", "closed", conn.key, open=self.open)

    def _drop(self, conn: _Conn, reason: str, *, close: bool = True) -> None:
        self.forget(conn)
        self._count(reason)
        if close:
            conn.transport.close()

    def _count(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1


def _answer_and_close(transport: asyncio.BaseTransport, response: bytes) -> None:
    if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
        transport.write(response)
    transport.close()


class GuardedProtocol(asyncio.Protocol):
    """Admit a connection through the gate, then hand everything to aiohttp's handler."""

    __slots__ = ("_conn", "_factory", "_gate", "_inner")

    def __init__(self, gate: ConnectionGate, factory: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (or refuse it); start aiohttp's handler on it."""
        conn = self._gate.admit(transport)
        if conn is None:
            return
        self._conn = conn
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Pass the bytes on; outside a request they start the head's clock."""
        if self._inner is None or self._conn is None:
            return  # refused: nothing is read
        self._gate.received(self._conn)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the end of input on."""
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; tell aiohttp's handler."""
        if self._conn is not None:
            self._gate.forget(self._conn)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """The client does not read: start the write-stall clock."""
        if self._conn is not None:
            self._gate.write_paused(self._conn)
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """The client reads again."""
        if self._conn is not None:
            self._gate.write_resumed(self._conn)
        if self._inner is not None:
            self._inner.resume_writing()


# Statuses aiohttp's parser answers with, and the code each is given.
_PARSE_CODES = {
    400: "bad_request",
    413: "payload_too_large",
    431: "request_header_fields_too_large",
    501: "not_implemented",
    505: "http_version_not_supported",
}


class JsonErrorsHandler(RequestHandler):
    """aiohttp's request handler, answering what it cannot parse in the API's error shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse (4xx) as JSON with a code; leave
        anything else (a 5xx, an answer already under way) to aiohttp."""
        if (status >= 500 and status not in _PARSE_CODES) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self.logger.debug("malformed request from %s", request.remote, exc_info=exc)
        response = error_response(
            status,
            _PARSE_CODES.get(status, "bad_request"),
            "the request is not valid HTTP or is over the size limits (request line and each "
            f"header {MAX_LINE_BYTES} bytes, {MAX_HEADERS} headers); see RFC 9112",
        )
        response.force_close()
        return response


# Request line, each header, and how many headers (aiohttp answers 400 past them).
MAX_LINE_BYTES = 8190
MAX_HEADERS = 64


def handler_factory(
    server: web.Server, handler_args: Mapping[str, Any]
) -> Callable[[], asyncio.Protocol]:
    """Return a factory of request handlers for `server` that answer parse errors as JSON.

    `handler_args` are the request handler's settings (timeouts, line and header limits):
    the same ones the runner was made with, passed here explicitly rather than read back
    from aiohttp's private attributes, so an aiohttp upgrade cannot silently drop a limit.
    """
    return functools.partial(
        JsonErrorsHandler, server, loop=asyncio.get_running_loop(), **handler_args
    )


class GuardedSite(web.BaseSite):
    """A listening socket whose connections pass through a `ConnectionGate`.

    Give `sock` (a bound socket, e.g. the unix socket made by `bind_unix`) or `host` and
    `port`.
    """

    __slots__ = ("_gate", "_handler_args", "_host", "_port", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        gate: ConnectionGate,
        *,
        handler_args: Mapping[str, Any],
        sock: socket.socket | None = None,
        host: str | None = None,
        port: int | None = None,
        ssl_context: Any = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._gate = gate
        self._handler_args = dict(handler_args)
        self._sock = sock
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        """Return where it listens."""
        scheme = "https" if self._ssl_context else "http"
        if self._sock is not None:
            return f"{scheme}://{self._sock.getsockname()}"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Start accepting connections."""
        await super().start()
        server = self._runner.server
        assert server is not None
        factory = functools.partial(
            GuardedProtocol, self._gate, handler_factory(server, self._handler_args)
        )
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {
                "ssl": self._ssl_context,
                "ssl_handshake_timeout": self._gate.limits.header_timeout_s,
            }
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(
                factory, sock=self._sock, backlog=self._backlog, **tls
            )
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, backlog=self._backlog, **tls
            )

    async def stop(self) -> None:
        """Stop accepting; cancel the gate's timers."""
        self._gate.close()
        await super().stop()
