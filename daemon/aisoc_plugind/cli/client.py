"""Talk to the control API from the command line: one blocking request per command.

Blocking `http.client` on purpose: one request per command, no event loop, and unix-socket
addresses (`unix:/run/aisoc-plugind/api.sock`) work with a three-line connection class.
The API address comes from `--api`, else `AISOC_API`, else `http://127.0.0.1:8470`; the
token from `--token`, else `AISOC_TOKEN` (prefer the variable: arguments show in `ps`).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aisoc_plugind.cli.tree import CommandFailed, UsageError

__all__ = ["DEFAULT_API", "ClientError", "Endpoint", "call", "request"]

DEFAULT_API = "http://127.0.0.1:8470"


class ClientError(CommandFailed):
    """The request failed; the message is what the operator sees."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where the API is and how to authenticate."""

    api: str
    token: str | None
    timeout: float
    cacert: str | None = None

    def connect(self) -> http.client.HTTPConnection:
        """Return a connection to the API (not yet connected)."""
        if self.api.startswith("unix:"):
            return _UnixConnection(self.api[5:], self.timeout)
        parts = urlsplit(self.api)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"invalid API address {self.api!r}: use http://HOST:PORT, "
                "https://HOST:PORT or unix:/path.sock"
            )
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.cacert)
            return http.client.HTTPSConnection(parts.netloc, timeout=self.timeout, context=context)
        return http.client.HTTPConnection(parts.netloc, timeout=self.timeout)

    def base_path(self) -> str:
        """Return the path prefix of an `http(s)://host/prefix` address."""
        return "" if self.api.startswith("unix:") else urlsplit(self.api).path.rstrip("/")


def request(endpoint: Endpoint, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Send one request; return (status, decoded JSON body or None); raise ClientError."""
    headers = {"Accept": "application/json"}
    if endpoint.token:
        headers["Authorization"] = f"Bearer {endpoint.token}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn = endpoint.connect()
    try:
        conn.request(method, endpoint.base_path() + path, body=data, headers=headers)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(f"cannot reach the API at {endpoint.api}: {exc}") from exc
    finally:
        conn.close()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError as exc:
        raise ClientError(f"the API answered {status} with a body that is not JSON") from exc


def _check(endpoint: Endpoint, status: int, doc: Any) -> Any:
    if status < 400:
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = str(message) if message else f"the API answered HTTP {status}"
    if status == 401 and not endpoint.token:
        text += " (set AISOC_TOKEN or pass --token)"
    raise ClientError(text)


def call(endpoint: Endpoint, method: str, path: str, body: Any = None) -> Any:
    """Send one request and return its JSON body; raise ClientError on any failure."""
    status, doc = request(endpoint, method, path, body)
    return _check(endpoint, status, doc)
