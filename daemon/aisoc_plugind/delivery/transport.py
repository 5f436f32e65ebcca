"""Bound the registry client's HTTP: TLS roots, timeouts, schemes, body reads, error codes."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from aisoc_plugind.delivery.auth import redact
from aisoc_plugind.delivery.limits import MIB, Deadline, brief
from aisoc_plugind.delivery.reference import allows_http
from aisoc_plugind.errors import OciError
from aisoc_plugind.files import FileRefused, read_regular

__all__ = [
    "CONNECT_TIMEOUT_S",
    "READ_TIMEOUT_S",
    "Origin",
    "check_scheme",
    "origin",
    "read_body",
    "registry_errors",
    "timeouts",
    "tls_context",
]

CONNECT_TIMEOUT_S = 10.0


READ_TIMEOUT_S = 30.0


_CA_FILE_CAP = 4 * MIB


_DEFAULT_PORTS = {"http": 80, "https": 443}


Origin = tuple[str, str, int]


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Return a verifying client context: the system's roots plus the PEM CAs of `ca_file`.

    Raises `oci_tls_error` naming `oci.ca_file` when the file cannot be used.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            # Resolved first: CA files are often links (/etc/ssl/certs, mounted secrets).
            pem = read_regular(ca_file.resolve(), cap=_CA_FILE_CAP).decode("ascii")
            context.load_verify_locations(cadata=pem)
        except FileNotFoundError as exc:
            raise _ca_error(ca_file, "does not exist") from exc
        except FileRefused as exc:
            raise _ca_error(ca_file, exc.detail) from exc
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise _ca_error(ca_file, f"holds no PEM certificate we can use ({brief(exc)})") from exc
        except OSError as exc:
            raise _ca_error(ca_file, f"cannot be read ({exc.strerror})") from exc
    return context


def _ca_error(ca_file: Path, why: str) -> OciError:
    return OciError(
        f"the CA file {ca_file} (oci.ca_file, aisoc plugin push: --ca-file) {why}",
        code="oci_tls_error",
    )


def timeouts(deadline: Deadline) -> httpx.Timeout:
    """Return connect/read/write/pool timeouts, none longer than what is left of `deadline`."""
    left = deadline.left()
    short, long = min(CONNECT_TIMEOUT_S, left), min(READ_TIMEOUT_S, left)
    return httpx.Timeout(connect=short, read=long, write=long, pool=short)


def origin(url: httpx.URL) -> Origin:
    """Return `(scheme, host, port)` of `url`, the default port filled in."""
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    return url.scheme, url.host.lower(), port


def _netlocs(url: httpx.URL) -> tuple[str, ...]:
    host = f"[{url.host}]" if ":" in url.host else url.host
    _, _, port = origin(url)
    return (f"{host}:{port}", host) if url.port is None else (f"{host}:{port}",)


def check_scheme(url: httpx.URL, insecure_registries: Sequence[str]) -> None:
    """Refuse any URL but https, and http to a host not in `insecure_registries`."""
    if url.scheme == "https":
        return
    netlocs = _netlocs(url)
    if url.scheme == "http" and any(allows_http(n, insecure_registries) for n in netlocs):
        return
    if url.scheme == "http":
        raise OciError(
            f"refused plain-HTTP request to {netlocs[0]}; only registries in "
            "oci.allow_insecure_registries may use HTTP (aisoc plugin push: --insecure)",
            code="oci_insecure_registry",
        )
    raise OciError(
        f"refused a {url.scheme[:20]!r} URL; registries speak https", code="oci_registry_error"
    )


def read_body(
    response: httpx.Response,
    *,
    limit: int,
    exact: bool,
    deadline: Deadline,
    what: str,
    digest: str | None = None,
) -> bytes:
    """Read at most `limit` bytes (exactly `limit` when `exact`) as sent, undecoded.

    With `digest`, the sha256 of the bytes is computed while they stream in and must match.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise OciError(
            f"{what}: refused Content-Encoding {encoding[:40]!r}", code="oci_registry_error"
        )
    _check_length(response.headers.get("Content-Length"), limit, exact, what)
    hasher = hashlib.sha256()
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_raw():
        deadline.left()
        total += len(chunk)
        if total > limit:
            raise _size_error(what, f"more than {limit} bytes", exact)
        hasher.update(chunk)
        chunks.append(chunk)
    if exact and total != limit:
        raise _size_error(what, f"{total} bytes, the descriptor says {limit}", exact)
    if digest is not None and f"sha256:{hasher.hexdigest()}" != digest:
        raise OciError(
            f"{what}: content has digest sha256:{hasher.hexdigest()}, the manifest says {digest}",
            code="oci_digest_mismatch",
        )
    return b"".join(chunks)


def _check_length(header: str | None, limit: int, exact: bool, what: str) -> None:
    if header is None:
        return
    declared = int(header) if header.strip().isdigit() else -1
    if (exact and declared != limit) or declared > limit or declared < 0:
        expected = f"the descriptor says {limit}" if exact else f"the limit is {limit}"
        raise _size_error(what, f"Content-Length {header.strip()[:20]}, {expected}", exact)


def _size_error(what: str, detail: str, exact: bool) -> OciError:
    code = "oci_size_mismatch" if exact else "oci_too_large"
    return OciError(f"{what}: {detail}", code=code)


@contextmanager
def registry_errors(registry: str, secrets: Sequence[str] = ()) -> Iterator[None]:
    """Translate httpx and socket failures into OciError with a stable code.

    Foreign text quoted in a message has every one of `secrets` redacted; they are read when
    a failure happens, so a token added to the list later is redacted too.
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        raise OciError(f"registry {registry} timed out", code="oci_timeout") from exc
    except (httpx.TransportError, ssl.SSLError) as exc:
        raise _transport_error(registry, exc, secrets) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as exc:
        detail = redact(brief(exc), secrets)
        raise OciError(f"registry {registry}: {detail}", code="oci_registry_error") from exc


_PLAINTEXT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)


def _transport_error(registry: str, exc: Exception, secrets: Sequence[str]) -> OciError:
    reason = _ssl_reason(exc)
    if reason in _PLAINTEXT_TLS_REASONS:
        return OciError(
            f"registry {registry} answered TLS with plain HTTP; plain HTTP is "
            "allowed only for registries in oci.allow_insecure_registries "
            "(aisoc plugin push: --insecure)",
            code="oci_insecure_registry",
        )
    if reason is not None:
        return OciError(
            f"TLS with registry {registry} failed: {redact(_ssl_text(exc), secrets)}; if it "
            "uses a private CA, name the CA's PEM file with oci.ca_file "
            "(aisoc plugin push: --ca-file)",
            code="oci_tls_error",
        )
    detail = redact(brief(exc), secrets)
    if isinstance(exc, httpx.NetworkError):
        return OciError(f"cannot reach registry {registry}: {detail}", code="oci_unreachable")
    return OciError(f"registry {registry}: {detail}", code="oci_registry_error")


def _ssl_errors(exc: BaseException) -> Iterator[ssl.SSLError]:
    todo: list[object] = [exc]
    for _ in range(32):  # httpx wraps httpcore wraps ssl; the chain is short
        if not todo:
            return
        current = todo.pop()
        if isinstance(current, ssl.SSLError):
            yield current
        elif isinstance(current, BaseException):
            todo += [current.__cause__, current.__context__, *current.args]


def _ssl_reason(exc: BaseException) -> str | None:
    for error in _ssl_errors(exc):
        return str(error.reason or "")
    return None


def _ssl_text(exc: BaseException) -> str:
    for error in _ssl_errors(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {error.verify_message}"[:300]
        return brief(error)
    return brief(exc)
