"""Run Debian's real docker-registry on a free loopback port for the OCI tests."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REGISTRY_BIN = Path("/usr/bin/docker-registry")
READY_TIMEOUT_S = 15.0
# No proxy, ever: these requests must stay on loopback whatever the environment says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(root: Path, port: int) -> Path:
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    return config


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited with {proc.returncode}: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with _DIRECT.open(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)  # the process is starting; nothing to wait on but the port
    raise RuntimeError(f"docker-registry did not answer {url} within {READY_TIMEOUT_S} s")


@contextmanager
def running_registry(root: Path) -> Iterator[str]:
    """Start `docker-registry serve` on 127.0.0.1; yield `host:port`; stop that PID."""
    port = free_port()
    config = _config(root, port)
    log_path = root / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}/v2/", log_path)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()  # SIGTERM to the PID we started, nothing else
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session", name="oci_registry")
def oci_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OCI registry on loopback (plain HTTP) for the whole session: `host:port`."""
    if not REGISTRY_BIN.is_file():
        pytest.skip(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")
    with running_registry(tmp_path_factory.mktemp("registry")) as host:
        yield host
