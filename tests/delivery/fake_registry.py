"""A loopback HTTP server that answers canned routes: the registry that lies, for OCI tests."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aisoc_plugind.delivery import artifact as oci
from aisoc_plugind.delivery.artifact import ARTIFACT_TYPE, MEDIA_TYPE_LAYER

__all__ = ["Route", "Routes", "Seen", "liar_fixture", "serve_package", "sha", "start_liar"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Route:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    delay_s: float = 0.0
    length: bool = True  # send Content-Length (else the body ends when the connection closes)
    auth: str | None = None  # the Authorization header required, else 401 + the challenge


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Routes(dict[str, Route]):
    """Canned answers by path (query ignored), the 401 challenge to send, what was seen."""

    challenge = ""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path.split("?")[0] == path]


class _Handler(BaseHTTPRequestHandler):
    server: _LyingServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        routes = self.server.routes
        routes.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
        route = routes.get(self.path.split("?")[0], Route(b"{}", status=404))
        if route.auth is not None and self.headers.get("Authorization") != route.auth:
            route = Route(b'{"errors": []}', {"Www-Authenticate": routes.challenge}, status=401)
        time.sleep(route.delay_s)
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if route.length:
            self.send_header("Content-Length", str(len(route.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(route.body)

    do_GET = do_HEAD = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _LyingServer(ThreadingHTTPServer):
    daemon_threads = True
    routes: Routes

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) is expected


@contextmanager
def start_liar() -> Iterator[tuple[str, Routes]]:
    """Serve canned routes on a free loopback port: `(host:port, routes)`."""
    server = _LyingServer(("127.0.0.1", 0), _Handler)
    server.routes = Routes()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", server.routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(name="liar")
def liar_fixture() -> Iterator[tuple[str, Routes]]:
    """A loopback HTTP server answering canned routes: `(host:port, routes)`."""
    with start_liar() as served:
        yield served


def serve_package(
    routes: dict[str, Route],
    layer: bytes,
    *,
    ref: str = "1",
    size: int | None = None,
    digest: str | None = None,
    blob: Route | None = None,
) -> bytes:
    """Route `aisoc/x:<ref>` to a manifest naming `layer`, and its blob path to `blob`."""
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": sha(b"{}"), "size": 2},
        "layers": [
            {
                "mediaType": MEDIA_TYPE_LAYER,
                "digest": digest or sha(layer),
                "size": len(layer) if size is None else size,
            }
        ],
    }
    raw = json.dumps(doc).encode()
    routes[f"/v2/aisoc/x/manifests/{ref}"] = Route(raw, {"Content-Type": oci.OCI_MANIFEST})
    routes[f"/v2/aisoc/x/blobs/{digest or sha(layer)}"] = blob or Route(layer)
    return raw
