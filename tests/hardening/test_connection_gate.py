"""The connection gate and the body budget, in the test's own process (real loopback sockets
against the API component, and fake transports where a timer or a stall is the point)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from aisoc_plugind.api.budget import BodyBudget
from aisoc_plugind.api.connections import (
    ConnectionGate,
    GateLimits,
    GuardedProtocol,
    canned_response,
    peer_key,
)
from aisoc_plugind.audit.names import API_CONNECTIONS_LIMITED
from tests.api_fixtures import ECHO_ID, Daemon, running_component
from tests.conftest import Env, PluginFactory

WAIT_S = 10.0
RUN = f"/api/v1/plugins/{ECHO_ID}/run"


# ---- fakes at the transport seam -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """A transport that records what is written and whether it was closed or aborted."""

    def __init__(self, peer: Any = ("10.0.0.1", 5555), sock: Any = None) -> None:
        super().__init__()
        self.peer, self.sock = peer, sock
        self.written = b""
        self.closed = self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "socket": self.sock}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class Inner(asyncio.Protocol):
    """aiohttp's handler as the proxy sees it: records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.calls.append(f"data:{data.decode()}")

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


def gate(
    per_peer: int = 2, total: int = 3, head_s: float = 30.0, write_s: float = 30.0
) -> tuple[ConnectionGate, list[dict[str, Any]]]:
    notes: list[dict[str, Any]] = []
    limits = GateLimits(
        max_total=total, max_per_peer=per_peer, header_timeout_s=head_s, write_timeout_s=write_s
    )
    return ConnectionGate(limits, lambda **fields: notes.append(fields)), notes


# ---- pure parts -------------------------------------------------------------------------------


def test_canned_response_is_a_complete_closing_json_answer() -> None:
    """The gate's own answers are HTTP/1.1 with a JSON error body and Connection: close."""
    raw = canned_response(503, "Service Unavailable", "too_many_connections", "go away")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head and b"Retry-After: 1" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"] == {"code": "too_many_connections", "message": "go away"}
    assert b"Retry-After" not in canned_response(408, "Request Timeout", "x", "y")


def test_peer_key_is_the_ip_on_tcp_and_the_uid_on_a_unix_socket() -> None:
    """TCP connections count against their IP address, unix ones against the peer's uid."""
    assert peer_key(FakeTransport(("127.0.0.1", 4000)), unix=False) == "127.0.0.1"
    assert peer_key(FakeTransport(("::1", 4000, 0, 0)), unix=False) == "::1"
    assert peer_key(FakeTransport(None), unix=False) == "unknown"
    assert peer_key(FakeTransport(sock=None), unix=True) == "unix"
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        assert peer_key(FakeTransport(sock=ours), unix=True) == f"unix:uid={os.getuid()}"


def test_the_body_budget_refuses_past_the_total_but_always_fits_one() -> None:
    """Reservations add up to the total; one alone always fits; giving back frees room."""
    budget = BodyBudget(100)
    assert budget.take(500)  # one body alone, however large
    assert not budget.take(1)
    budget.give(500)
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1)
    budget.give(40)
    assert budget.take(40)
    assert (budget.held, budget.holders) == (100, 2)


# ---- the gate with fake transports ---------------------------------------------------------


async def test_a_client_over_its_cap_displaces_its_oldest_idle_connection() -> None:
    """Past the per-client cap the oldest connection not inside a request is closed."""
    g, notes = gate(per_peer=2, total=10)
    first, second, third = FakeTransport(), FakeTransport(), FakeTransport()
    conn_first = g.admit(first)
    assert conn_first is not None and g.admit(second) is not None
    g.started(first)  # inside a request: never displaced
    assert g.admit(third) is not None
    assert (first.closed, second.closed, third.closed) == (False, True, False)
    assert g.peer_count("10.0.0.1") == 2
    assert notes[0]["reason"] == "per_host_limit" and notes[0]["action"] == "evicted"
    assert g.closed == {"per_host_limit": 1}


async def test_a_connection_finishing_a_request_becomes_the_youngest() -> None:
    """After a request, a connection moves to the back of the line for eviction."""
    g, _ = gate(per_peer=2, total=10)
    a, b, c = FakeTransport(), FakeTransport(), FakeTransport()
    g.admit(a)
    g.admit(b)
    g.started(a)
    g.finished(a)  # a was used just now: b is the oldest idle one
    g.admit(c)
    assert (a.closed, b.closed) == (False, True)


async def test_when_every_connection_is_busy_the_new_one_gets_503() -> None:
    """No idle connection to displace: the new one is answered 503 and closed."""
    g, notes = gate(per_peer=1, total=10)
    busy, late = FakeTransport(), FakeTransport()
    g.admit(busy)
    g.started(busy)
    assert g.admit(late) is None
    assert late.written.startswith(b"HTTP/1.1 503 ") and late.closed
    assert b"too_many_connections" in late.written
    assert notes[-1]["action"] == "refused"


async def test_the_total_cap_spans_all_clients() -> None:
    """Different addresses share `max_connections`: the oldest idle of all gives way."""
    g, notes = gate(per_peer=5, total=2)
    a, b, c = (
        FakeTransport(("10.0.0.1", 1)),
        FakeTransport(("10.0.0.2", 1)),
        FakeTransport(("10.0.0.3", 1)),
    )
    g.admit(a)
    g.admit(b)
    g.admit(c)
    assert (a.closed, b.closed, c.closed) == (True, False, False)
    assert g.open == 2
    assert notes[0]["reason"] == "total_limit"


async def test_limit_events_are_rate_limited_and_count_what_they_left_out() -> None:
    """One event per reason and action per interval; the next says how many were skipped."""
    g, notes = gate(per_peer=1, total=10)
    for _ in range(5):
        g.admit(FakeTransport())
    assert len(notes) == 1
    g._notices.interval_s = 0.0  # the interval has passed
    g.admit(FakeTransport())
    assert notes[1]["suppressed"] == 3


async def test_a_head_that_does_not_arrive_in_time_gets_408() -> None:
    """No complete head within `header_timeout_s`: 408 request_header_timeout, closed."""
    g, notes = gate(head_s=0.05)
    slow = FakeTransport()
    g.admit(slow)
    await asyncio.sleep(0.3)
    assert slow.written.startswith(b"HTTP/1.1 408 ") and slow.closed
    assert b"request_header_timeout" in slow.written
    assert g.open == 0 and notes[-1]["reason"] == "header_timeout"


async def test_a_head_that_arrives_stops_the_clock_and_the_next_one_restarts_it() -> None:
    """Inside a request no head timeout applies; bytes after it start a new clock."""
    g, _ = gate(head_s=0.05)
    t = FakeTransport()
    conn = g.admit(t)
    assert conn is not None
    g.started(t)
    g.received(conn)  # the body of this request: no clock
    await asyncio.sleep(0.2)
    assert not t.closed
    g.finished(t)
    g.received(conn)  # the first byte of the next head
    await asyncio.sleep(0.3)
    assert t.closed


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """A stalled write (pause_writing without resume) aborts the connection in time; a
    resumed one is left alone."""
    g, notes = gate(write_s=0.05)
    stalled, resumed = FakeTransport(), FakeTransport()
    conn_s, conn_r = g.admit(stalled), g.admit(resumed)
    assert conn_s is not None and conn_r is not None
    g.started(stalled)
    g.write_paused(conn_s)
    g.write_paused(conn_r)
    g.write_resumed(conn_r)
    await asyncio.sleep(0.3)
    assert stalled.aborted and not resumed.aborted
    assert notes[-1]["reason"] == "write_timeout"


async def test_close_cancels_every_timer() -> None:
    """Stopping the site cancels the gate's timers: nothing fires after shutdown."""
    g, _ = gate(head_s=0.05)
    t = FakeTransport()
    g.admit(t)
    g.close()
    await asyncio.sleep(0.2)
    assert not t.closed


async def test_the_proxy_hands_everything_to_the_handler_it_admitted() -> None:
    """An admitted connection's bytes, end, flow control and loss reach aiohttp's handler."""
    g, _ = gate(per_peer=1, total=10)
    inner = Inner()
    proxy = GuardedProtocol(g, lambda: inner)
    proxy.connection_made(FakeTransport())
    proxy.data_received(b"GET")
    assert proxy.eof_received() is True
    proxy.pause_writing()
    proxy.resume_writing()
    proxy.connection_lost(None)
    assert inner.calls == ["made", "data:GET", "eof", "pause", "resume", "lost"]
    assert g.open == 0


async def test_a_refused_connection_reaches_no_handler() -> None:
    """A connection the gate refuses is answered 503 by the gate and never handed on."""
    g, _ = gate(per_peer=1, total=10)
    busy = FakeTransport()
    GuardedProtocol(g, Inner).connection_made(busy)
    g.started(busy)
    g.started(None)  # a request that did not come through the gate (a test server)
    g.finished(FakeTransport())
    inner = Inner()
    refused = GuardedProtocol(g, lambda: inner)
    late = FakeTransport()
    refused.connection_made(late)
    refused.data_received(b"x")
    assert refused.eof_received() is None
    refused.pause_writing()
    refused.resume_writing()
    refused.connection_lost(None)
    assert inner.calls == []
    assert late.written.startswith(b"HTTP/1.1 503 ")


# ---- the real API component -----------------------------------------------------------------


@asynccontextmanager
async def component(env: Env, plugins: PluginFactory, **overrides: Any) -> AsyncIterator[Daemon]:
    settings: dict[str, Any] = {"isolation_mode": "none", **overrides}
    async with running_component(env, plugins, "127.0.0.1:0", **settings) as daemon:
        daemon.service.ready.set()
        yield daemon


async def _open(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = daemon.address().rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


def _request(daemon: Daemon, method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {daemon.address()}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _auth(daemon: Daemon, name: str = "root") -> dict[str, str]:
    return {"Authorization": f"Bearer {daemon.tokens[name]}"}


async def _answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), json.loads(body) if body else None


def _events(env: Env, name: str) -> list[dict[str, Any]]:
    return [e for e in env.audit_events() if e["event"] == name]


async def test_the_component_displaces_idle_connections_and_serves(
    env: Env, plugins: PluginFactory
) -> None:
    """Over the per-client cap, idle connections are closed and a request is served; the
    idle ones left get 408 once the head timeout passes."""
    async with component(
        env, plugins, api_max_connections_per_host=2, api_header_timeout_s=0.5
    ) as daemon:
        idle = [await _open(daemon) for _ in range(4)]
        reader, writer = await _open(daemon)
        writer.write(_request(daemon, "GET", "/healthz"))
        assert (await _answer(reader))[0] == 200
        ends = [await asyncio.wait_for(r.read(), WAIT_S) for r, _ in idle]
        assert ends.count(b"") >= 3  # displaced: closed without a word
        assert all(end == b"" or end.startswith(b"HTTP/1.1 408 ") for end in ends)
        for _, w in [*idle, (reader, writer)]:
            w.close()
    limited = _events(env, API_CONNECTIONS_LIMITED)
    assert limited and limited[0]["peer"] == "127.0.0.1"


async def test_the_component_answers_a_late_head_with_408(env: Env, plugins: PluginFactory) -> None:
    """A head that does not arrive within header_timeout_s is answered 408 and closed."""
    async with component(env, plugins, api_header_timeout_s=0.2) as daemon:
        reader, writer = await _open(daemon)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        status, body = await _answer(reader)
        assert (status, body["error"]["code"]) == (408, "request_header_timeout")
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()


async def test_a_slow_authorised_body_is_answered_408_and_closed(
    env: Env, plugins: PluginFactory
) -> None:
    """A body that does not arrive within body_timeout_s: 408 request_timeout, closed."""
    async with component(env, plugins, api_body_timeout_s=0.2) as daemon:
        reader, writer = await _open(daemon)
        writer.write(_request(daemon, "POST", RUN, b"{", Content_Length="100", **_auth(daemon)))
        status, body = await _answer(reader)
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()


async def test_bodies_past_the_budget_are_answered_503_server_busy(
    env: Env, plugins: PluginFactory
) -> None:
    """While one body is held, another that would pass the total is 503 server_busy; the
    first one's reservation is returned when its client goes away."""
    async with component(env, plugins, api_max_body_bytes_total=1000) as daemon:
        _held, w1 = await _open(daemon)
        w1.write(_request(daemon, "POST", RUN, b"{", Content_Length="900", **_auth(daemon)))
        await w1.drain()
        body = json.dumps({"payload": {"x": "y" * 200}}).encode()
        for _ in range(100):  # until the first request's head has been read
            r2, w2 = await _open(daemon)
            w2.write(
                _request(daemon, "POST", RUN, body, Content_Length=str(len(body)), **_auth(daemon))
            )
            status, answer = await _answer(r2)
            w2.close()
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert (status, answer["error"]["code"]) == (503, "server_busy")
        w1.close()
        for _ in range(100):
            r3, w3 = await _open(daemon)
            w3.write(
                _request(daemon, "POST", RUN, body, Content_Length=str(len(body)), **_auth(daemon))
            )
            status, _ = await _answer(r3)
            w3.close()
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(80))
            + b"\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "bad_request",
        ),
    ],
    ids=["bad-header", "long-line", "many-headers", "bad-chunk"],
)
async def test_a_request_aiohttp_cannot_parse_gets_a_json_error(
    env: Env, plugins: PluginFactory, raw: bytes, status: int, code: str
) -> None:
    """Malformed heads and chunked bodies are answered in the API's JSON shape with a code,
    and the connection is closed."""
    async with component(env, plugins) as daemon:
        reader, writer = await _open(daemon)
        writer.write(raw)
        assert await _answer(reader) == (
            status,
            {"error": {"code": code, "message": ANY}, "detail": ANY},
        )
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()


async def test_a_body_cut_off_by_its_client_is_400_invalid_body(
    env: Env, plugins: PluginFactory
) -> None:
    """A client that goes away in the middle of its body gets a 400 invalid_body on the
    record (nobody is left to read it), never a 500; its budget is returned."""
    async with component(env, plugins, api_max_body_bytes_total=100) as daemon:
        _, writer = await _open(daemon)
        head = _request(daemon, "POST", RUN, b"{", Content_Length="1000", **_auth(daemon))
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is read and the handler waits for the body
        writer.close()
        for _ in range(100):
            found = [e for e in _events(env, "api.request") if e.get("status") == 400]
            if found:
                break
            await asyncio.sleep(0.05)
        assert found[0]["route"] == "/api/v1/plugins/{id}/run"
        reader, writer = await _open(daemon)
        body = b'{"payload": {"x": 1}}'
        writer.write(
            _request(daemon, "POST", RUN, body, Content_Length=str(len(body)), **_auth(daemon))
        )
        assert (await _answer(reader))[0] == 200
        writer.close()


async def test_a_unix_socket_counts_connections_per_uid(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """On a unix socket the per-client cap is per peer uid: idle ones give way."""
    path = tmp_path / "api.sock"
    async with running_component(
        env, plugins, f"unix:{path}", isolation_mode="none", api_max_connections_per_host=2
    ) as daemon:
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await _answer(reader))[0] == 200
        for _, w in [*idle, (reader, writer)]:
            w.close()
        assert daemon.hangup is not None
    limited = _events(env, API_CONNECTIONS_LIMITED)
    assert limited[0]["peer"] == f"unix:uid={os.getuid()}"


def test_every_request_handler_setting_is_one_aiohttp_knows() -> None:
    """The handler settings are passed to aiohttp's RequestHandler by name (never read back
    from its private attributes): a renamed parameter in an aiohttp upgrade fails here
    instead of silently dropping a limit."""
    import inspect

    from aiohttp.web_protocol import RequestHandler

    from aisoc_plugind.api.app import request_handler_args
    from aisoc_plugind.config.settings import Settings

    accepted = inspect.signature(RequestHandler.__init__).parameters
    args = request_handler_args(Settings())
    assert set(args) <= set(accepted), sorted(set(args) - set(accepted))
    assert {"max_line_size", "max_field_size", "max_headers", "keepalive_timeout"} <= set(args)
