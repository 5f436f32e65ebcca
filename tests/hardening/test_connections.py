"""Connections and bodies against a real daemon: idle floods, slowloris, slow bodies, budgets.

Nobody needs a token to open a connection. The daemon caps connections per client and in
total (making room by closing idle ones, answering 503 `too_many_connections` when every one
is busy), closes heads that do not arrive within `api.header_timeout_s` (408
`request_header_timeout`) and bodies within `api.body_timeout_s` (408 `request_timeout`),
refuses bodies past the shared budget (503 `server_busy`), payloads no host would accept (413
`payload_too_large`) and results past `plugins.max_result_bytes` (502
`plugin_result_too_large`, also from a host that lies about its result) - and all the while
answers an authorised client. Real sockets on loopback, real limits; timings are only ever
upper bounds several times the configured ones.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTOR_PUB, PluginFactory
from tests.live import LiveDaemon, live_daemon, wait_until

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
PER_HOST = 6
TOTAL = 12
BUDGET = 200_000
MAX_RESULT = 100_000
LATE_S = 10.0  # an upper bound, several times any timeout configured here
BACKLOG = 128  # asyncio accepts up to this many at once before the gate sees any
FLOOD = 1000

# Marks its start in its state directory (the test waits for the marks), then sleeps.
SLEEPY = """
import asyncio, os, uuid
class Plugin:
    async def run(self, payload, context):
        mark = os.path.join(os.environ["PLUGIN_STATE_ROOT"], "conn.sleepy", uuid.uuid4().hex)
        open(mark, "w").close()
        await asyncio.sleep(4)
        return {"slept": True}
"""
BIG = f"""
class Plugin:
    def run(self, payload, context):
        return {{"x": "a" * {MAX_RESULT * 2}}}
"""
# A plugin that takes over its host's encoder: the host then sends whatever it likes.
FORGER = f"""
import sys
class Plugin:
    def run(self, payload, context):
        host = sys.modules["aisoc_plugind.engine.hosts.runtime"]._Host
        host.result_bytes = lambda self, value: b'{{"x":"' + b"a" * {MAX_RESULT * 3} + b'"}}'
        return {{}}
"""


def _keys(root: Path) -> Path:
    keys = root / "keys"
    keys.mkdir()
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    return keys


def _limits(**more: Any) -> dict[str, str]:
    base = {
        "AISOC_PLUGIND__API__MAX_CONNECTIONS": str(TOTAL),
        "AISOC_PLUGIND__API__MAX_CONNECTIONS_PER_HOST": str(PER_HOST),
        "AISOC_PLUGIND__API__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "AISOC_PLUGIND__API__KEEPALIVE_TIMEOUT_S": "3",
        "AISOC_PLUGIND__API__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "AISOC_PLUGIND__API__MAX_BODY_BYTES_TOTAL": str(BUDGET),
        "AISOC_PLUGIND__PLUGINS__MAX_RESULT_BYTES": str(MAX_RESULT),
        "AISOC_PLUGIND__ISOLATION__DEDICATED": "conn.forger",
    }
    return {**base, **{k: str(v) for k, v in more.items()}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    """A daemon with small connection limits and short timeouts, over a few plugins."""
    root = tmp_path_factory.mktemp("connections")
    plugins = root / "plugins"
    factory = PluginFactory(plugins)
    factory.write("echo", plugin_id="conn.echo")
    factory.write("sleepy", plugin_id="conn.sleepy", code=SLEEPY)
    factory.write("big", plugin_id="conn.big", code=BIG)
    factory.write("forger", plugin_id="conn.forger", code=FORGER)
    with live_daemon(root / "daemon", plugins=plugins, keys=_keys(root), env=_limits()) as live:
        yield live
        assert live.proc.poll() is None, live.stderr_text()
        assert live.request("GET", "/healthz")[0] == 200


# ---- raw HTTP ---------------------------------------------------------------------------------


def _connect(daemon: LiveDaemon) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=LATE_S)
    return sock


def _head(
    daemon: LiveDaemon, method: str, path: str, *, length: int | str | None = None, **h: str
) -> bytes:
    """Return a request head (`Header_Name="value"` becomes `Header-Name: value`)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{daemon.port}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in h.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _auth(daemon: LiveDaemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {daemon.token}", "Content_Type": "application/json"}


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Read one response (Content-Length framed); return (status, headers, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Return True when the peer closes `sock` within `seconds` (what it sent is dropped)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (TimeoutError, ConnectionError):
        return False
    return False


def _fds(daemon: LiveDaemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def _limited(daemon: LiveDaemon, reason: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events("api.connections.limited") if e["reason"] == reason]


# ---- connection counts ------------------------------------------------------------------------


def test_an_idle_flood_is_capped_and_an_authorised_client_is_served(daemon: LiveDaemon) -> None:
    """1000 connections that send nothing: the daemon's descriptors stay bounded (the cap,
    plus the accept batches of the listen backlog on their way to the gate), it answers an
    authorised client at once, and closes the rest with 408 once the head timeout passes."""
    baseline = _fds(daemon)
    peak = 0
    with ExitStack() as stack:
        idle = []
        for _ in range(FLOOD):
            idle.append(stack.enter_context(closing(_connect(daemon))))
            peak = max(peak, _fds(daemon))
        wait_until(
            lambda: True if _fds(daemon) <= baseline + PER_HOST + 2 else None,
            LATE_S,
            "the daemon to hold no more than the per-host cap",
        )
        # Never one descriptor per connection: asyncio accepts a batch of up to BACKLOG per
        # wake-up, and a batch reaches the gate within a few loop iterations.
        assert peak < baseline + PER_HOST + 3 * BACKLOG < FLOOD
        status, body = daemon.request("GET", "/api/v1/plugins")
        assert status == 200, body
        assert daemon.request("POST", "/api/v1/plugins/conn.echo/run", {"payload": {}})[0] == 200
        closed = sum(_closed_within(sock, LATE_S) for sock in idle)
        assert closed == len(idle)
    limited = _limited(daemon, "per_host_limit")[0]
    assert (limited["action"], limited["peer"], limited["limit"]) == ("evicted", "127.0.0.1", 6)
    wait_until(lambda: _limited(daemon, "header_timeout") or None, LATE_S, "a header timeout")


def test_slowloris_headers_get_408_within_the_header_timeout(daemon: LiveDaemon) -> None:
    """A head sent one byte at a time is answered 408 request_header_timeout and closed
    within a few times `api.header_timeout_s`; an authorised client is served meanwhile."""
    with closing(_connect(daemon)) as slow:
        started = time.monotonic()
        slow.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n".encode())
        slow.settimeout(0.3)
        answer = b""
        while time.monotonic() - started < LATE_S:
            try:
                slow.sendall(b"X")
                chunk = slow.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
        assert daemon.request("GET", "/healthz")[0] == 200
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"request_header_timeout" in answer
    assert HEADER_TIMEOUT_S * 0.5 < elapsed < LATE_S


def test_a_slow_second_request_on_a_kept_alive_connection_gets_408(daemon: LiveDaemon) -> None:
    """After one complete request, a next head that trickles in is timed from its first
    byte: 408, closed."""
    with closing(_connect(daemon)) as sock:
        sock.sendall(_head(daemon, "GET", "/healthz"))
        assert _read_response(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        status, _, body = _read_response(sock)
        assert (status, body["error"]["code"]) == (408, "request_header_timeout")
        assert _closed_within(sock, LATE_S)


def test_busy_connections_are_never_evicted_and_a_new_one_gets_503(daemon: LiveDaemon) -> None:
    """With every connection of a client inside a request, a new one is answered 503
    too_many_connections; the requests in flight all finish 200."""
    marks = daemon.root / "state" / "conn.sleepy"
    before = len(list(marks.iterdir())) if marks.is_dir() else 0
    results: list[int] = []

    def run() -> None:
        results.append(daemon.request("POST", "/api/v1/plugins/conn.sleepy/run", {})[0])

    threads = [threading.Thread(target=run) for _ in range(PER_HOST)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: (
            True if marks.is_dir() and len(list(marks.iterdir())) >= before + PER_HOST else None
        ),
        LATE_S,
        "every sleepy run to have started",
    )
    with closing(_connect(daemon)) as extra:
        extra.sendall(_head(daemon, "GET", "/healthz"))
        status, headers, body = _read_response(extra)
    for thread in threads:
        thread.join(LATE_S)
    assert (status, body["error"]["code"], headers["retry-after"]) == (
        503,
        "too_many_connections",
        "1",
    )
    assert results == [200] * PER_HOST
    wait_until(
        lambda: [e for e in _limited(daemon, "per_host_limit") if e["action"] == "refused"] or None,
        LATE_S,
        "the refusal's event",
    )


# ---- bodies ----------------------------------------------------------------------------------


def test_a_slow_body_gets_408_and_the_connection_is_closed(daemon: LiveDaemon) -> None:
    """An authorised body that trickles in is answered 408 request_timeout within a few
    times `api.body_timeout_s`, and the connection is closed."""
    with closing(_connect(daemon)) as sock:
        sock.sendall(
            _head(daemon, "POST", "/api/v1/plugins/conn.echo/run", length=1000, **_auth(daemon))
        )
        started = time.monotonic()
        sock.sendall(b'{"payload": {"x": "')
        sock.settimeout(0.5)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - started < LATE_S:
            try:
                sock.sendall(b"a" * 10)
                answer += sock.recv(65536)
            except TimeoutError:
                continue
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request_timeout" in answer
        assert time.monotonic() - started < LATE_S
        assert _closed_within(sock, LATE_S)


def test_an_unauthenticated_slow_body_is_refused_at_once(daemon: LiveDaemon) -> None:
    """Without a token the body is never read: 401 comes back without waiting for it."""
    with closing(_connect(daemon)) as sock:
        sock.sendall(_head(daemon, "POST", "/api/v1/plugins/conn.echo/run", length=100_000))
        sock.sendall(b"{")
        started = time.monotonic()
        status, _, body = _read_response(sock)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert time.monotonic() - started < BODY_TIMEOUT_S


def test_bodies_past_the_shared_budget_get_503_server_busy(daemon: LiveDaemon) -> None:
    """While one large body is being read, another that would pass `max_body_bytes_total`
    is answered 503 server_busy (Retry-After); once the first is gone it is served."""
    body = json.dumps({"payload": {"x": "a" * 60_000}}).encode()  # 150 kB + 60 kB > 200 kB
    with closing(_connect(daemon)) as holder:
        holder.sendall(
            _head(daemon, "POST", "/api/v1/plugins/conn.echo/run", length=150_000, **_auth(daemon))
        )
        holder.sendall(b'{"payload": {"x": "')
        time.sleep(0.3)  # the head is read and the reservation made well within this
        with closing(_connect(daemon)) as second:
            second.sendall(
                _head(
                    daemon,
                    "POST",
                    "/api/v1/plugins/conn.echo/run",
                    length=len(body),
                    **_auth(daemon),
                )
                + body
            )
            status, headers, answer = _read_response(second)
        assert (status, answer["error"]["code"], headers["retry-after"]) == (
            503,
            "server_busy",
            "1",
        )
    wait_until(
        lambda: (
            True
            if daemon.request("POST", "/api/v1/plugins/conn.echo/run", json.loads(body))[0] == 200
            else None
        ),
        LATE_S,
        "the budget to be released",
    )


def test_a_chunked_body_over_max_body_bytes_is_413(daemon: LiveDaemon) -> None:
    """A body without a length is cut at `api.max_body_bytes`: 413 payload_too_large."""
    with closing(_connect(daemon)) as sock:
        head = _head(
            daemon,
            "POST",
            "/api/v1/plugins/conn.echo/run",
            Transfer_Encoding="chunked",
            **_auth(daemon),
        )
        sock.sendall(head)
        chunk = b"a" * 65536
        try:
            for _ in range(20):  # 1.25 MiB, over the default 1 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except ConnectionError:
            pass  # answered and closed before the whole body went out
        status, _, body = _read_response(sock)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")


def test_a_payload_no_host_would_accept_is_413_and_the_host_lives(daemon: LiveDaemon) -> None:
    """Non-ASCII text grows sixfold when encoded for the host: past what a host accepts it
    is refused with 413 payload_too_large, without crashing the host."""
    exited = len(daemon.events("plugin.host.exited"))
    payload = {"payload": {"text": "\u00e9" * 200_000}}  # 400 kB of UTF-8, 1.2 MB encoded
    status, body = daemon.request("POST", "/api/v1/plugins/conn.echo/run", payload)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert daemon.request("POST", "/api/v1/plugins/conn.echo/run", {"payload": {"a": 1}})[0] == 200
    assert len(daemon.events("plugin.host.exited")) == exited


# ---- results ---------------------------------------------------------------------------------


def test_results_over_max_result_bytes_are_refused(daemon: LiveDaemon) -> None:
    """A result over `plugins.max_result_bytes` is 502 plugin_result_too_large, whether the
    host refuses it or a plugin that took over its host sends it anyway (the supervisor
    checks the size before decoding anything)."""
    status, body = daemon.request("POST", "/api/v1/plugins/conn.big/run", {})
    assert (status, body["error"]["code"]) == (502, "plugin_result_too_large")
    exited = len(daemon.events("plugin.host.exited"))
    for _ in range(3):
        status, body = daemon.request("POST", "/api/v1/plugins/conn.forger/run", {})
        assert (status, body["error"]["code"]) == (502, "plugin_result_too_large")
        assert str(MAX_RESULT) in body["error"]["message"]
    assert len(daemon.events("plugin.host.exited")) == exited  # refused, not a crash
    assert daemon.request("POST", "/api/v1/plugins/conn.echo/run", {})[0] == 200


# ---- unix socket -----------------------------------------------------------------------------


def test_a_unix_socket_listener_caps_connections_per_uid(tmp_path: Path) -> None:
    """On a unix socket the per-client cap counts the peer's uid; a flood of idle
    connections leaves room for a request from the same user."""
    plugins = tmp_path / "plugins"
    PluginFactory(plugins).write("echo", plugin_id="conn.echo")
    path = tmp_path / "api.sock"
    env = _limits(AISOC_PLUGIND_LISTEN=f"unix:{path}")
    with live_daemon(tmp_path / "d", plugins=plugins, keys=_keys(tmp_path), env=env) as live:
        with ExitStack() as stack:
            for _ in range(30):
                sock = stack.enter_context(closing(socket.socket(socket.AF_UNIX)))
                sock.connect(str(path))
            wait_until(lambda: True if _limited(live, "per_host_limit") else None, LATE_S, "cap")
            with closing(socket.socket(socket.AF_UNIX)) as client:
                client.settimeout(LATE_S)
                client.connect(str(path))
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert _read_response(client)[0] == 200
        limited = _limited(live, "per_host_limit")[0]
        assert limited["peer"] == f"unix:uid={os.getuid()}"


# ---- a load under descriptor pressure ---------------------------------------------------------


def _fd_numbers(daemon: LiveDaemon) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")}


def test_a_hot_load_that_meets_emfile_is_retried_once_the_pressure_ends(tmp_path: Path) -> None:
    """With every descriptor the daemon may have (its RLIMIT_NOFILE lowered) taken by idle
    connections, a plugin written into a watched directory fails to load for want of one:
    the failure is recorded, `plugin.load.retrying` announces another try, and once the
    connections are closed the plugin loads, without anyone touching it."""
    plugins = tmp_path / "plugins"
    PluginFactory(plugins).write("echo", plugin_id="conn.echo")
    env = _limits(
        AISOC_PLUGIND__API__MAX_CONNECTIONS=5000,
        AISOC_PLUGIND__API__MAX_CONNECTIONS_PER_HOST=5000,
        AISOC_PLUGIND__API__HEADER_TIMEOUT_S=300,
        AISOC_PLUGIND__API__KEEPALIVE_TIMEOUT_S=300,
    )
    keys = _keys(tmp_path)
    with live_daemon(tmp_path / "d", plugins=plugins, keys=keys, env=env, watch=True) as live:
        live.wait_for("watcher.started")
        watches = _watched(live)
        late = plugins / "late"
        late.mkdir()  # watched before the pressure: the files below only change its content
        wait_until(lambda: _watched(live) == watches + 1 or None, LATE_S, "late to be watched")
        wait_until(lambda: _steady(live), LATE_S, "the replaced watch to release its descriptors")
        soft, hard = resource.prlimit(live.proc.pid, resource.RLIMIT_NOFILE)
        limit = max(_fd_numbers(live)) + 17
        resource.prlimit(live.proc.pid, resource.RLIMIT_NOFILE, (limit, hard))
        with ExitStack() as stack:
            for _ in range(64):
                stack.enter_context(closing(_connect(live)))
            wait_until(
                lambda: True if set(range(limit)) <= _fd_numbers(live) else None,
                LATE_S,
                "every descriptor to be taken",
            )
            built = PluginFactory(tmp_path / "stage").write("late", plugin_id="conn.late")
            for name in ("plugin.py", "plugin.sig", "plugin.yaml"):  # the manifest last
                shutil.copy(built / name, late / f".{name}.part")
                (late / f".{name}.part").rename(late / name)
            retrying = live.wait_for("plugin.load.retrying", timeout=30, path=str(late))[0]
            failed = [e for e in live.events("plugin.load.failed") if e["path"] == str(late)]
        # The idle connections are closed: the pressure is over.
        assert failed[0]["error_code"] == retrying["error_code"] == "bundle_unreadable"
        assert (retrying["attempt"], retrying["delay_s"]) == (1, 0.5)
        live.wait_for("plugin.enabled", plugin_id="conn.late", timeout=60)
        resource.prlimit(live.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        status, body = live.request("POST", "/api/v1/plugins/conn.late/run", {})
        assert status == 200, body
        assert live.request("GET", "/api/v1/plugins/conn.late")[1]["error"] is None


def _steady(daemon: LiveDaemon) -> bool | None:
    """Return True when the daemon's descriptors stayed the same for half a second."""
    before = _fd_numbers(daemon)
    time.sleep(0.5)
    return True if _fd_numbers(daemon) == before else None


def _watched(daemon: LiveDaemon) -> int:
    """Return how many inotify watches the daemon holds."""
    total = 0
    for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd"):
        try:
            if os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/{daemon.proc.pid}/fdinfo/{fd}") as info:
                    total += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total
