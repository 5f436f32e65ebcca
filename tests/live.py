"""A real daemon process for tests: config, tokens, HTTP on loopback, signals, its events.

The daemon runs as `python -m aisoc_plugind run --config FILE` with stdout in a file (one
event per line), so readiness and events are read from stdout: that works even while the
audit file cannot be written. Only the process this helper started is ever signalled, by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aisoc_plugind.api.tokens import PERMISSIONS
from tests.api_fixtures import write_tokens

WAIT_S = 20.0
T = TypeVar("T")
ALL = ("root", tuple(PERMISSIONS))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveDaemon:
    """A running daemon: its process, address, token, files and stdout events."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    root: Path
    audit: Path
    stdout: Path
    stderr: Path
    config: Path
    extra_tokens: dict[str, str] = field(default_factory=dict)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Return the events printed on stdout so far (all of them, or those named)."""
        found = []
        for line in self.stdout.read_bytes().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def audit_events(self) -> list[dict[str, Any]]:
        """Return the events in the audit file, skipping a torn line a fault left (verify
        checks those); an empty list when there is no file."""
        if not self.audit.is_file():
            return []
        events = []
        for line in self.audit.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def wait_for(
        self, name: str, count: int = 1, timeout: float = WAIT_S, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until `count` stdout events called `name` (with these fields) were printed."""
        return wait_until(
            lambda: self._named(name, fields, count),
            timeout,
            f"{count} x {name} {fields} on stdout",
        )

    def _named(self, name: str, fields: dict[str, Any], count: int) -> list[dict[str, Any]] | None:
        found = [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]
        return found if len(found) >= count else None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """Send one request; return (status, decoded JSON body or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        return response.status, json.loads(raw) if raw else None

    def signal(self, signum: int) -> None:
        """Send a signal to this daemon (the process this helper started)."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the daemon and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr_text(self) -> str:
        """Return what the daemon wrote on stderr."""
        return self.stderr.read_text(errors="replace")


def wait_until(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` until it returns something other than None; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_config(
    root: Path,
    *,
    plugins: Path,
    keys: Path,
    audit: Path,
    port: int,
    extra: str = "",
    watch: bool = False,
    trust_extra: str = "",
    isolation_extra: str = "",
) -> Path:
    """Write a development config for a daemon on 127.0.0.1:`port` (`trust_extra`: more
    lines of the `[trust]` table; `trust.revoked_file` is `root/revoked.toml` unless set;
    `isolation_extra`: more lines of the `[isolation]` table, e.g. `mode = "none"`)."""
    config = root / "config.toml"
    default = "" if "revoked_file" in trust_extra else f'revoked_file = "{root}/revoked.toml"\n'
    trust = default + trust_extra
    config.write_text(
        'environment = "development"\n'
        f'[plugins]\ndir = "{plugins}"\nwatch = {str(watch).lower()}\nrun_timeout_s = 5\n'
        f'[trust]\nkeys_dir = "{keys}"\n{trust}'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{root}/tokens.toml"\n'
        f'[audit]\npath = "{audit}"\n'
        f'[isolation]\nstate_dir = "{root}/state"\n{isolation_extra}'
        f"[daemon]\nshutdown_grace_s = 5\n" + extra
    )
    return config


@contextmanager
def live_daemon(
    root: Path,
    *,
    plugins: Path,
    keys: Path,
    audit: Path | None = None,
    extra: str = "",
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    watch: bool = False,
    trust_extra: str = "",
    isolation_extra: str = "",
) -> Iterator[LiveDaemon]:
    """Start a daemon over `plugins`; on exit stop it (SIGTERM, then SIGKILL) by its PID."""
    root.mkdir(parents=True, exist_ok=True)
    audit = audit or root / "log" / "audit.jsonl"
    port = free_port()
    tokens = write_tokens(root / "tokens.toml", {"root": PERMISSIONS})
    config = write_config(
        root,
        plugins=plugins,
        keys=keys,
        audit=audit,
        port=port,
        extra=extra,
        watch=watch,
        trust_extra=trust_extra,
        isolation_extra=isolation_extra,
    )
    with run_daemon(
        root, config, port=port, token=tokens["root"], audit=audit, env=env, wait_ready=wait_ready
    ) as daemon:
        yield daemon


@contextmanager
def run_daemon(
    root: Path,
    config: Path,
    *,
    port: int,
    token: str,
    audit: Path,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Iterator[LiveDaemon]:
    """Run `aisoc-plugind run --config config` (stdout, stderr in files under `root`); on
    exit stop it (SIGTERM, then SIGKILL) by its PID."""
    stdout, stderr = root / "stdout.jsonl", root / "stderr.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
            stdout=out,
            stderr=err,
            cwd=root,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        )
    daemon = LiveDaemon(
        proc=proc,
        port=port,
        token=token,
        root=root,
        audit=audit,
        stdout=stdout,
        stderr=stderr,
        config=config,
    )
    try:
        if wait_ready:
            daemon.wait_for("daemon.ready")
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
