"""Run Debian's real docker-registry on free loopback ports: plain, TLS, and TLS + htpasswd.

Fixtures (session-scoped; import each one a test module uses, `# noqa: F401`):

- `oci_registry` (`oci_registry_fixture`): `host:port` of a plain-HTTP registry.
- `oci_tls_registry` (`oci_tls_registry_fixture`): a `RunningRegistry` serving TLS with a
  certificate for 127.0.0.1/localhost signed by its own fresh CA (`ca_file`).
- `oci_auth_registry` (`oci_auth_registry_fixture`): the same over TLS, with htpasswd
  (bcrypt) auth for `username`/`password`; `docker_config(path)` writes a Docker config
  holding those credentials.

Each registry is a process this module started; it is stopped by its PID, nothing else.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REGISTRY_BIN = Path("/usr/bin/docker-registry")
READY_TIMEOUT_S = 15.0


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy (loopback only), no DOCKER_CONFIG and a HOME without a developer's
    ~/.docker/config.json. Autouse in every module that imports it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """A fresh CA and a server certificate it signed for 127.0.0.1 and localhost (PEM)."""

    ca_file: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA and a server certificate (P-256, valid 2 days) with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        *("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"),
        *("-subj", "/CN=aisoc-plugind test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    _openssl(
        *("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr"),
        *("-subj", "/CN=127.0.0.1"),
        cwd=directory,
    )
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS)
    _openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-set_serial", str(secrets.randbits(63)), "-days", "2", "-sha256"),
        *("-extfile", "server.ext", "-out", "server.pem"),
        cwd=directory,
    )
    return TlsFiles(
        ca_file=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    """Write an htpasswd file with one bcrypt entry (the only kind the registry accepts)."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{username}:{hashed}\n")
    return path


def write_docker_config(path: Path, auths: dict[str, dict[str, str]], **extra: object) -> Path:
    """Write a Docker config.json with these `auths` entries (and top-level `extra` keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
    path.chmod(0o600)
    return path


def auth_entry(username: str, password: str) -> dict[str, str]:
    """Return an `auths` entry as `docker login` writes it: base64 of `user:password`."""
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


@dataclass(frozen=True)
class RunningRegistry:
    """A docker-registry process on 127.0.0.1 started by a fixture."""

    host: str
    root: Path
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def blob_file(self, digest: str) -> Path:
        """Return where the filesystem driver keeps the blob `digest` (to corrupt it)."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def docker_config(self, path: Path, *, password: str | None = None) -> Path:
        """Write a Docker config holding this registry's credentials (or another password)."""
        assert self.username is not None and self.password is not None
        entry = auth_entry(self.username, password or self.password)
        return write_docker_config(path, {self.host: entry})


def _config(
    root: Path, port: int, tls: TlsFiles | None = None, htpasswd: Path | None = None
) -> Path:
    text = (
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    if tls is not None:
        text += f"  tls:\n    certificate: {tls.cert}\n    key: {tls.key}\n"
    if htpasswd is not None:
        text += f"auth:\n  htpasswd:\n    realm: aisoc-test\n    path: {htpasswd}\n"
    config = root / "config.yml"
    config.write_text(text)
    return config


def _answers(url: str, ca_file: Path | None) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # htpasswd: up, and asking for credentials
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, ca_file: Path | None = None
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited with {proc.returncode}: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        if _answers(url, ca_file):
            return
        time.sleep(0.05)  # the process is starting; nothing to wait on but the port
    raise RuntimeError(f"docker-registry did not answer {url} within {READY_TIMEOUT_S} s")


@contextmanager
def running_registry(
    root: Path, *, tls: TlsFiles | None = None, htpasswd: Path | None = None
) -> Iterator[str]:
    """Start `docker-registry serve` on 127.0.0.1; yield `host:port`; stop that PID."""
    port = free_port()
    config = _config(root, port, tls, htpasswd)
    log_path = root / "registry.log"
    scheme = "https" if tls else "http"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(
                proc, f"{scheme}://127.0.0.1:{port}/v2/", log_path, tls.ca_file if tls else None
            )
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()  # SIGTERM to the PID we started, nothing else
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _need_registry() -> None:
    if not REGISTRY_BIN.is_file():
        pytest.skip(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")


@pytest.fixture(scope="session", name="oci_registry")
def oci_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OCI registry on loopback (plain HTTP) for the whole session: `host:port`."""
    _need_registry()
    with running_registry(tmp_path_factory.mktemp("registry")) as host:
        yield host


@pytest.fixture(scope="session", name="oci_tls_registry")
def oci_tls_registry_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningRegistry]:
    """A real OCI registry on loopback over TLS (its own CA in `ca_file`), no auth."""
    _need_registry()
    root = tmp_path_factory.mktemp("tls-registry")
    tls = make_tls_files(root / "tls")
    with running_registry(root, tls=tls) as host:
        yield RunningRegistry(host=host, root=root, ca_file=tls.ca_file)


@pytest.fixture(scope="session", name="oci_auth_registry")
def oci_auth_registry_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningRegistry]:
    """A real OCI registry over TLS with htpasswd auth: `username`/`password` get in."""
    _need_registry()
    root = tmp_path_factory.mktemp("auth-registry")
    tls = make_tls_files(root / "tls")
    username, password = "robot", f"pw-{secrets.token_hex(12)}"
    htpasswd = write_htpasswd(root / "htpasswd", username, password)
    with running_registry(root, tls=tls, htpasswd=htpasswd) as host:
        yield RunningRegistry(
            host=host, root=root, ca_file=tls.ca_file, username=username, password=password
        )
