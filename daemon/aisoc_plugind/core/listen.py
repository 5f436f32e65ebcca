"""Parse the control API's listen address (`HOST:PORT` or `unix:/path.sock`) once, purely."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["ListenAddress", "is_loopback_host", "parse_listen"]

UNIX_PREFIX = "unix:"


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """A validated listen address: a unix socket path, or a host and a port."""

    text: str
    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        """Return True for a unix socket address."""
        return self.unix_path is not None

    @property
    def is_loopback(self) -> bool:
        """Return True for a unix socket or a loopback host (only local callers reach it)."""
        return self.is_unix or is_loopback_host(self.host)

    def __str__(self) -> str:
        return self.text


def parse_listen(text: str) -> ListenAddress:
    """Parse `HOST:PORT` (IPv6 in brackets) or `unix:/absolute/path`; raise ValueError."""
    text = text.strip()
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX) :]
        if not path.startswith("/"):
            raise ValueError("unix socket path must be absolute (unix:/run/x.sock)")
        return ListenAddress(text=text, unix_path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT or unix:/path.sock")
    return ListenAddress(text=text, host=host.strip("[]"), port=int(port))


def is_loopback_host(host: str) -> bool:
    """Return True for `localhost` and loopback IP literals."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
