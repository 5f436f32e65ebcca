"""Talk to one repository of an OCI registry: bounded, timed requests with token or basic auth."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Self
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3.exceptions
from oras.client import OrasClient
from oras.container import Container

from aisoc_plugind import __version__
from aisoc_plugind.delivery.artifact import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    sha256_digest,
)
from aisoc_plugind.delivery.limits import CHUNK, Deadline, brief
from aisoc_plugind.delivery.reference import Reference, allows_http
from aisoc_plugind.errors import OciError

__all__ = ["Registry", "registry_errors"]

_CONNECT_TIMEOUT_S = 10.0


_READ_TIMEOUT_S = 30.0


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """Give every request (auth and redirects too) a timeout; refuse HTTP unless allowed."""

    def __init__(self, *, allow_http: bool, deadline: Deadline) -> None:
        super().__init__(max_retries=0)
        self._allow_http = allow_http
        self._deadline = deadline

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        url = request.url or ""
        if not self._allow_http and urlsplit(url).scheme != "https":
            raise OciError(
                f"refused plain-HTTP request to {urlsplit(url).netloc}; only "
                "registries in oci.allow_insecure_registries may use HTTP",
                code="oci_insecure_registry",
            )
        left = self._deadline.left()
        timeout = (min(_CONNECT_TIMEOUT_S, left), min(_READ_TIMEOUT_S, left))
        return super().send(
            request,
            stream=stream,
            timeout=timeout,
            verify=verify,
            cert=cert,
            proxies=dict(proxies or {}),
        )


class Registry:
    """One repository on one registry, over oras' session and token auth, without retries."""

    def __init__(
        self, ref: Reference, insecure_registries: Sequence[str], deadline: Deadline
    ) -> None:
        self.ref = ref
        self._deadline = deadline
        allow_http = allows_http(ref.registry, insecure_registries)
        self._client = OrasClient(hostname=ref.registry, insecure=allow_http)
        self._session: requests.Session = self._client.session
        adapter = _GuardedAdapter(allow_http=allow_http, deadline=deadline)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        # Credentials from the service user's Docker config (docker/oras login), if any.
        self._client.auth.load_configs(Container("_", registry=ref.registry))
        self._base = f"{'http' if allow_http else 'https'}://{ref.registry}/v2/{ref.repository}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.close()

    # oras' own do_request() retries every failure with sleeps of 3 s up to 83 s and has no
    # timeout; the daemon wants one bounded attempt, so this is its auth flow without that.
    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> requests.Response:
        """Send one request (bodies are streamed: read them with `_read_body`), answering
        a 401/403 challenge with oras' token auth or Docker-config basic auth."""
        sent = {
            "Accept-Encoding": "identity",
            "User-Agent": f"aisoc-plugind/{__version__}",
            **(headers or {}),
        }
        token = getattr(self._client.auth, "token", None)
        if token and urlsplit(url).netloc == self.ref.registry:
            sent["Authorization"] = f"Bearer {token}"
        response = self._send(method, url, sent, data)
        for refresh in (False, True):
            if response.status_code not in (401, 403):
                break
            response.close()
            sent, changed = self._authenticate(response, sent, refresh)
            if not changed:
                break
            response = self._send(method, url, sent, data)
        return response

    def _send(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None
    ) -> requests.Response:
        # stream=True everywhere: no body is read unless a bounded reader reads it.
        return self._session.request(
            method,
            url,
            headers=headers,
            data=data,
            stream=True,
            allow_redirects=method in ("GET", "HEAD"),
        )

    def _authenticate(
        self, response: requests.Response, headers: dict[str, str], refresh: bool
    ) -> tuple[dict[str, str], bool]:
        challenge = response.headers.get("Www-Authenticate", "")
        basic = getattr(self._client.auth, "_basic_auth", None)  # from the Docker config
        if challenge.lower().startswith("basic"):
            if not basic or headers.get("Authorization") == f"Basic {basic}":
                return headers, False
            return {**headers, "Authorization": f"Basic {basic}"}, True
        updated, changed = self._client.auth.authenticate_request(
            response, dict(headers), refresh=refresh
        )
        return dict(updated), bool(changed)

    def fetch_manifest(self, cap: int) -> tuple[bytes, str | None, str | None]:
        """Return the manifest bytes as received, its Content-Type and Docker-Content-Digest."""
        url = f"{self._base}/manifests/{self.ref.target}"
        with self.request(
            "GET", url, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        ) as response:
            _expect(response, (200,), f"manifest {self.ref}")
            raw = _read_body(
                response,
                limit=cap,
                exact=False,
                deadline=self._deadline,
                what=f"the manifest of {self.ref}",
            )
            return (
                raw,
                response.headers.get("Content-Type"),
                response.headers.get("Docker-Content-Digest"),
            )

    def fetch_blob(self, layer: Descriptor, cap: int) -> bytes:
        """Stream the blob, enforcing the descriptor's exact size and digest."""
        if layer.size > cap:
            raise OciError(
                f"the layer of {self.ref} is {layer.size} bytes, the limit is {cap}",
                code="oci_too_large",
            )
        with self.request("GET", f"{self._base}/blobs/{layer.digest}") as response:
            _expect(response, (200,), f"layer {layer.digest} of {self.ref}")
            data = _read_body(
                response,
                limit=layer.size,
                exact=True,
                deadline=self._deadline,
                what=f"layer {layer.digest}",
            )
        if sha256_digest(data) != layer.digest:
            raise OciError(
                f"layer of {self.ref}: content has digest {sha256_digest(data)}, the "
                f"manifest says {layer.digest}",
                code="oci_digest_mismatch",
            )
        return data

    def upload_blob(self, data: bytes) -> str:
        """Upload `data` unless the repository has it already; return its digest."""
        digest = sha256_digest(data)
        with self.request("HEAD", f"{self._base}/blobs/{digest}") as response:
            if response.status_code == 200:
                return digest
        with self.request(
            "POST", f"{self._base}/blobs/uploads/", headers={"Content-Length": "0"}
        ) as response:
            _expect(response, (202,), f"starting an upload to {self.ref.registry}")
            location = response.headers.get("Location")
        if not location:
            raise OciError(
                f"registry {self.ref.registry} gave no upload location", code="oci_registry_error"
            )
        url = _with_digest(urljoin(f"{self._base}/", location), digest)
        with self.request(
            "PUT", url, headers={"Content-Type": "application/octet-stream"}, data=data
        ) as response:
            _expect(response, (201, 204), f"uploading blob {digest}")
        return digest

    def put_manifest(self, raw: bytes, tag: str) -> None:
        """Store `raw` under `tag`; refuse a registry that reports another digest."""
        with self.request(
            "PUT", f"{self._base}/manifests/{tag}", headers={"Content-Type": OCI_MANIFEST}, data=raw
        ) as response:
            _expect(response, (201, 204), f"pushing the manifest of {self.ref}")
            stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != sha256_digest(raw):
            raise OciError(
                f"registry stored the manifest as {stored}, expected {sha256_digest(raw)}",
                code="oci_digest_mismatch",
            )


def _with_digest(url: str, digest: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit(parts._replace(query=query))


_STATUS_CODES = {401: "oci_unauthorized", 403: "oci_forbidden", 404: "oci_not_found"}


def _expect(response: requests.Response, ok: tuple[int, ...], what: str) -> None:
    if response.status_code in ok:
        return
    code = _STATUS_CODES.get(response.status_code, "oci_registry_error")
    raise OciError(
        f"{what}: registry answered HTTP {response.status_code}{_registry_reason(response)}",
        code=code,
    )


def _registry_reason(response: requests.Response) -> str:
    try:
        body = response.raw.read(64 * 1024, decode_content=False)
        errors = json.loads(body)["errors"]
        return f" ({errors[0]['code']}: {errors[0]['message']})"[:300]
    except Exception:  # the reason is a courtesy; the status code says enough
        return ""


def _read_body(
    response: requests.Response, *, limit: int, exact: bool, deadline: Deadline, what: str
) -> bytes:
    """Read at most `limit` bytes (exactly `limit` when `exact`) as sent, undecoded."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise OciError(f"{what}: refused Content-Encoding {encoding!r}", code="oci_registry_error")
    _check_length(response.headers.get("Content-Length"), limit, exact, what)
    chunks: list[bytes] = []
    total = 0
    while chunk := response.raw.read1(CHUNK, decode_content=False):
        deadline.left()
        total += len(chunk)
        if total > limit:
            raise _size_error(what, f"more than {limit} bytes", exact)
        chunks.append(chunk)
    if exact and total != limit:
        raise _size_error(what, f"{total} bytes, the descriptor says {limit}", exact)
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


_PLAINTEXT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)


@contextmanager
def registry_errors(registry: str) -> Iterator[None]:
    """Translate requests/urllib3/oras failures into OciError with a stable code."""
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise _tls_error(registry, exc) from exc
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError) as exc:
        raise OciError(f"registry {registry} timed out", code="oci_timeout") from exc
    except requests.exceptions.ConnectionError as exc:
        raise OciError(
            f"cannot reach registry {registry}: {brief(exc)}", code="oci_unreachable"
        ) from exc
    except (
        requests.exceptions.RequestException,
        urllib3.exceptions.HTTPError,
        OSError,
        ValueError,
        KeyError,
    ) as exc:
        raise OciError(f"registry {registry}: {brief(exc)}", code="oci_registry_error") from exc


def _tls_error(registry: str, exc: BaseException) -> OciError:
    reason = _ssl_reason(exc)
    if reason in _PLAINTEXT_TLS_REASONS:
        return OciError(
            f"registry {registry} answered TLS with plain HTTP; plain HTTP is "
            "allowed only for registries in oci.allow_insecure_registries "
            "(aisoc plugin push: --insecure)",
            code="oci_insecure_registry",
        )
    return OciError(
        f"TLS with registry {registry} failed: {reason or brief(exc)}", code="oci_tls_error"
    )


def _ssl_reason(exc: BaseException) -> str | None:
    todo: list[object] = [exc]
    for _ in range(32):  # requests wraps urllib3 wraps ssl; the chain is short
        if not todo:
            break
        current = todo.pop()
        if isinstance(current, ssl.SSLError):
            return str(current.reason)
        if isinstance(current, BaseException):
            todo += [
                current.__cause__,
                current.__context__,
                getattr(current, "reason", None),
                *current.args,
            ]
    return None
