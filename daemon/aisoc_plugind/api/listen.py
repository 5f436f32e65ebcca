"""Listen where `api.listen` says: loopback TCP, TLS, or a unix socket made safely.

Every listener accepts through the API's `ConnectionGate` (`api.connections`), which bounds
how many connections are open and how long each may stall.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from aisoc_plugind.api.connections import ConnectionGate, GuardedSite
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.errors import ConfigError
from aisoc_plugind.files import FileRefused, private_file_status

__all__ = ["bind_unix", "check_listen", "listening", "tls_context"]


def check_listen(settings: Settings) -> None:
    """Raise ConfigError for plain HTTP on a non-loopback address unless allowed explicitly."""
    tls = settings.api_tls_cert is not None and settings.api_tls_key is not None
    if settings.listen.is_loopback or tls or settings.api_allow_insecure_listen:
        return
    raise ConfigError(
        f"api.listen {settings.api_listen} is not a loopback address and no TLS is "
        "configured: tokens would cross the network in clear text. Listen on 127.0.0.1 or "
        "unix:/run/aisoc-plugind/api.sock, set api.tls_cert and api.tls_key, or set "
        "api.allow_insecure_listen = true to accept the risk"
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Return the server TLS context (TLS >= 1.2) when cert and key are set; else None."""
    cert, key = settings.api_tls_cert, settings.api_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("api.tls_cert and api.tls_key must be set together")
    try:
        # A key others could replace lets them be this API for every client.
        private_file_status(key)
    except FileRefused as exc:
        raise ConfigError(
            f"api.tls_key {key} {exc.detail}: it may not be trusted (keep it 0600 or 0640, "
            "owned by root or the daemon's user)",
            code="tls_key_insecure" if exc.reason != "not_regular" else "config_invalid",
        ) from exc
    except OSError:
        pass  # missing or unreadable: load_cert_chain below says so
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load api.tls_cert {cert} / api.tls_key {key}: {exc}") from exc
    return context


def _clear_stale_socket(path: Path) -> None:
    """Remove a leftover socket file; refuse anything else, or a socket still in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket; refusing to replace it", code="listen_failed"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a stale socket from an earlier run
        return
    finally:
        probe.close()
    raise ConfigError(
        f"{path} is in use by another process (another daemon running?)", code="listen_failed"
    )


def bind_unix(path: Path) -> socket.socket:
    """Bind a unix socket at `path`, mode 0660, before it listens (no window at umask mode)."""
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)  # nobody can connect yet: the socket is not listening
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on unix:{path}: {exc.strerror}", code="listen_failed"
        ) from exc
    return sock


def _remove_socket(path: Path, ident: int) -> None:
    """Remove our socket file on exit, unless another process replaced it meanwhile."""
    try:
        if os.lstat(path).st_ino == ident:
            path.unlink()
    except FileNotFoundError:
        pass


@asynccontextmanager
async def listening(
    runner: web.AppRunner,
    settings: Settings,
    gate: ConnectionGate,
    handler_args: Mapping[str, Any],
) -> AsyncIterator[list[str]]:
    """Start listening on `api.listen`; yield the bound addresses; remove a unix socket after.

    `handler_args`: the request handler settings `runner` was made with."""
    address = settings.listen
    listen = address.text
    if address.unix_path is not None:
        path = Path(address.unix_path)
        sock = bind_unix(path)
        await GuardedSite(runner, gate, handler_args=handler_args, sock=sock).start()
        ident = os.stat(path).st_ino
        try:
            yield [listen]
        finally:
            _remove_socket(path, ident)
        return
    site = GuardedSite(
        runner,
        gate,
        handler_args=handler_args,
        host=address.host,
        port=address.port,
        ssl_context=tls_context(settings),
    )
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen}: {exc.strerror or exc}", code="listen_failed"
        ) from exc
    yield [f"{a[0]}:{a[1]}" if len(a) == 2 else f"[{a[0]}]:{a[1]}" for a in runner.addresses]
