"""Container HEALTHCHECK: exit 0 when the daemon's GET /healthz answers 200, else 1.

`AISOC_HEALTH_URL` says where (default `https://127.0.0.1:8470/healthz`): an `http://` or
`https://` URL, or `unix:/path/to/api.sock` for a unix-socket API. Standard library only.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import urllib.parse

__all__ = ["main"]

DEFAULT_URL = "https://127.0.0.1:8470/healthz"
TIMEOUT_S = 4.0


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the daemon's `api.listen = "unix:/path"`)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        sock.connect(self._socket_path)
        self.sock = sock


def _loopback_tls() -> ssl.SSLContext:
    # Encrypted but not verified: this talks to 127.0.0.1 inside the container, and the
    # certificate names the service, not the loopback address.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    """Return a connection for `url` and the request path."""
    if url.startswith("unix:"):
        return _UnixConnection(url.removeprefix("unix:")), "/healthz"
    parts = urllib.parse.urlsplit(url)
    host, path = parts.hostname or "127.0.0.1", parts.path or "/healthz"
    if parts.scheme == "https":
        tls = _loopback_tls()
        return http.client.HTTPSConnection(host, parts.port, timeout=TIMEOUT_S, context=tls), path
    return http.client.HTTPConnection(host, parts.port, timeout=TIMEOUT_S), path


def main() -> int:
    """Probe once; print why on failure."""
    url = os.environ.get("AISOC_HEALTH_URL", DEFAULT_URL)
    conn, path = connection(url)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
