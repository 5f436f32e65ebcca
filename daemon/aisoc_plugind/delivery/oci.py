"""Pull, safely unpack and push plugin packages stored as one-layer OCI artifacts."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import ssl
import sys
import tarfile
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, Self
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3.exceptions
from oras.client import OrasClient
from oras.container import Container

from aisoc_plugind import __version__
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.engine.bundle import read_manifest
from aisoc_plugind.errors import PluginDError

MEDIA_TYPE_LAYER = "application/vnd.aisoc.plugin.layer.v1.tar+gzip"
ARTIFACT_TYPE = "application/vnd.aisoc.plugin.v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_VERSION = "org.opencontainers.image.version"
ANNOTATION_PLUGIN_ID = "io.aisoc.plugin.id"
ANNOTATION_PLUGIN_VERSION = "io.aisoc.plugin.version"

_MIB = 1024 * 1024
PAX_HEADER_MAX = _MIB
# Tar headers, PAX records and block padding the decompressed stream may hold on top of
# `extracted_bytes` (5000 entries * ~2 KiB each fits with room to spare).
TAR_METADATA_ALLOWANCE = 16 * _MIB
PUSH_DEADLINE_S = 600.0
_CHUNK = 64 * 1024
_CONNECT_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 30.0


class OciError(PluginDError):
    """Pulling from or pushing to a registry failed (codes `oci_*`).

    oci_bad_reference, oci_insecure_registry, oci_tls_error, oci_unreachable, oci_timeout,
    oci_not_found, oci_unauthorized, oci_forbidden, oci_registry_error, oci_bad_artifact,
    oci_too_large, oci_size_mismatch, oci_digest_mismatch, oci_staging_failed.
    """

    code = "oci_error"
    http_status = 502


class ArchiveError(OciError):
    """A package archive breaks the extraction rules; nothing outside staging was touched.

    archive_corrupt, archive_link, archive_special_file, archive_path_invalid,
    archive_absolute_path, archive_path_traversal, archive_path_too_long, archive_duplicate,
    archive_too_large, archive_too_many_entries, archive_layout, archive_timeout.
    """

    code = "archive_invalid"
    http_status = 422


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps on what one pull or extraction may cost (bytes, entries, path shape, time)."""

    manifest_bytes: int = 4 * _MIB
    layer_bytes: int = 64 * _MIB
    extracted_bytes: int = 64 * _MIB
    file_bytes: int = 32 * _MIB
    entries: int = 5000
    path_length: int = 512
    depth: int = 32
    deadline_s: float = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """A parsed `host[:port]/repository(:tag|@sha256:...)` reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """Return what goes after `/manifests/`: the digest when there is one, else the tag."""
        return self.digest or self.tag or ""

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        return out + (f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pulled:
    """A verified package layer and the digest of the manifest that named it."""

    digest: str
    layer: bytes = field(repr=False)
    reference: Reference


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """An OCI content descriptor reduced to what we use."""

    media_type: str
    digest: str
    size: int


# ---- references (pure) -------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(\d{{1,5}}))?$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_REF_SHAPE = "HOST[:PORT]/REPOSITORY:TAG or HOST[:PORT]/REPOSITORY@sha256:<64 hex>"


def parse_reference(ref: str) -> Reference:
    """Parse an OCI reference that names its registry explicitly; raise `oci_bad_reference`."""
    if not ref or len(ref) > 1024 or ref != ref.strip() or any(c.isspace() for c in ref):
        raise _bad_reference(ref, "it is empty, too long or holds whitespace")
    if "://" in ref:
        raise _bad_reference(ref, "write it without a URL scheme; plain HTTP is allowed per "
                                  "registry with oci.allow_insecure_registries")
    name, at, digest = ref.partition("@")
    host, slash, rest = name.partition("/")
    if not slash:
        raise _bad_reference(ref, "it does not name a registry host and a repository")
    repository, tag = _split_tag(rest)
    _check_host(ref, host)
    _check_parts(ref, repository, tag, digest if at else None)
    return Reference(registry=host, repository=repository, tag=tag, digest=digest or None)


def _split_tag(rest: str) -> tuple[str, str | None]:
    head, slash, last = rest.rpartition("/")
    if ":" not in last:
        return rest, None
    last, _, tag = last.partition(":")
    return f"{head}{slash}{last}", tag


def _check_host(ref: str, host: str) -> None:
    match = _HOST_RE.match(host)
    if match is None:
        raise _bad_reference(ref, f"{host!r} is not a registry host[:port]")
    if match.group(1) is not None and not 0 < int(match.group(1)) <= 65535:
        raise _bad_reference(ref, f"{host!r} has a port out of range")
    # Like Docker: without a dot, a port or `localhost`, the first part would be a namespace.
    if not ("." in host or ":" in host or host.lower() == "localhost"):
        raise _bad_reference(ref, f"{host!r} is not an explicit registry host (name one with a "
                                  "dot or a port, e.g. ghcr.io/... or 127.0.0.1:5000/...)")


def _check_parts(ref: str, repository: str, tag: str | None, digest: str | None) -> None:
    if not _REPOSITORY_RE.match(repository) or len(repository) > 255:
        raise _bad_reference(ref, f"{repository!r} is not a valid repository name (lowercase "
                                  "letters, digits and . _ - separators)")
    if tag is not None and not _TAG_RE.match(tag):
        raise _bad_reference(ref, f"{tag!r} is not a valid tag")
    if digest is not None and not _DIGEST_RE.match(digest):
        raise _bad_reference(ref, f"{digest!r} is not a sha256 digest (sha256:<64 hex>)")
    if tag is None and digest is None:
        raise _bad_reference(ref, "name a tag or a digest; there is no default tag")


def _bad_reference(ref: str, why: str) -> OciError:
    error = OciError(f"bad OCI reference {ref[:200]!r}: {why} (expected {_REF_SHAPE})",
                     code="oci_bad_reference")
    error.http_status = 422  # the caller's input, not a registry failure
    return error


def _allows_http(registry: str, insecure_registries: Sequence[str]) -> bool:
    return registry.lower() in {r.strip().lower() for r in insecure_registries}


# ---- manifests (pure) --------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_descriptor(raw: bytes, content_type: str | None) -> Descriptor:
    """Return the package layer of a manifest, or raise `oci_bad_artifact` explaining why not.

    Accepted: an OCI image manifest (never an index) whose `artifactType`, when present, is
    ours, holding exactly one layer of MEDIA_TYPE_LAYER with a sha256 digest.
    """
    doc = _strict_json(raw)
    _check_manifest_type(doc, content_type)
    _descriptor(doc.get("config"), "config")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and artifact_type != ARTIFACT_TYPE:
        raise _bad_artifact(f"its artifactType is {artifact_type!r}, not {ARTIFACT_TYPE}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        count = len(layers) if isinstance(layers, list) else "no"
        raise _bad_artifact(f"it has {count} layers; a plugin package is exactly one")
    layer = _descriptor(layers[0], "layer")
    if layer.media_type != MEDIA_TYPE_LAYER:
        raise _bad_artifact(f"its layer is {layer.media_type!r}, not {MEDIA_TYPE_LAYER}")
    return layer


def _strict_json(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("a key appears twice")
        return dict(pairs)

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=lambda c: _raise(ValueError(f"{c} is not JSON")))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad_artifact(f"the manifest is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _bad_artifact("the manifest is not a JSON object")
    return doc


def _check_manifest_type(doc: Mapping[str, Any], content_type: str | None) -> None:
    declared = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if declared == OCI_INDEX or "manifests" in doc:
        raise _bad_artifact("it is an image index (several manifests); push one package")
    if declared != OCI_MANIFEST or doc.get("schemaVersion") != 2:
        raise _bad_artifact(f"it is {declared or 'an untyped document'!r}, not an OCI image "
                            "manifest (schemaVersion 2)")


def _descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _bad_artifact(f"its {what} descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise _bad_artifact(f"its {what} descriptor lacks a mediaType or a digest")
    if not _DIGEST_RE.match(digest):
        raise _bad_artifact(f"its {what} digest {digest[:100]!r} is not sha256:<64 hex>")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad_artifact(f"its {what} size {size!r} is not a non-negative integer")
    return Descriptor(media_type=media_type, digest=digest, size=size)


def _bad_artifact(why: str) -> OciError:
    return OciError(f"not an AiSOC plugin package: {why}", code="oci_bad_artifact")


def _raise(exc: Exception) -> NoReturn:
    raise exc


def build_manifest(
    layer: Descriptor, *, title: str, plugin_id: str | None, version: str | None
) -> bytes:
    """Return the canonical bytes of an OCI 1.1 artifact manifest for one package layer."""
    annotations = {ANNOTATION_TITLE: title}
    if plugin_id is not None and version is not None:
        annotations |= {ANNOTATION_PLUGIN_ID: plugin_id, ANNOTATION_PLUGIN_VERSION: version,
                        ANNOTATION_VERSION: version}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_CONFIG),
                   "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
                    "annotations": {ANNOTATION_TITLE: title}}],
        "annotations": annotations,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# ---- registry HTTP -----------------------------------------------------------------------


class _Deadline:
    """A point in monotonic time after which `left()` raises the error it was given."""

    __slots__ = ("_at", "_error")

    def __init__(self, seconds: float, error: Callable[[], PluginDError]) -> None:
        self._at = time.monotonic() + seconds
        self._error = error

    def left(self) -> float:
        remaining = self._at - time.monotonic()
        if remaining <= 0:
            raise self._error()
        return remaining


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """Give every request (auth and redirects too) a timeout; refuse HTTP unless allowed."""

    def __init__(self, *, allow_http: bool, deadline: _Deadline) -> None:
        super().__init__(max_retries=0)
        self._allow_http = allow_http
        self._deadline = deadline

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        url = request.url or ""
        if not self._allow_http and urlsplit(url).scheme != "https":
            raise OciError(f"refused plain-HTTP request to {urlsplit(url).netloc}; only "
                           "registries in oci.allow_insecure_registries may use HTTP",
                           code="oci_insecure_registry")
        left = self._deadline.left()
        timeout = (min(_CONNECT_TIMEOUT_S, left), min(_READ_TIMEOUT_S, left))
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert,
                            proxies=dict(proxies or {}))


class _Registry:
    """One repository on one registry, over oras' session and token auth, without retries."""

    def __init__(self, ref: Reference, insecure_registries: Sequence[str],
                 deadline: _Deadline) -> None:
        self.ref = ref
        self._deadline = deadline
        allow_http = _allows_http(ref.registry, insecure_registries)
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
    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                data: bytes | None = None) -> requests.Response:
        """Send one request (bodies are streamed: read them with `_read_body`), answering
        a 401/403 challenge with oras' token auth or Docker-config basic auth."""
        sent = {"Accept-Encoding": "identity", "User-Agent": f"aisoc-plugind/{__version__}",
                **(headers or {})}
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

    def _send(self, method: str, url: str, headers: dict[str, str],
              data: bytes | None) -> requests.Response:
        # stream=True everywhere: no body is read unless a bounded reader reads it.
        return self._session.request(method, url, headers=headers, data=data, stream=True,
                                     allow_redirects=method in ("GET", "HEAD"))

    def _authenticate(self, response: requests.Response, headers: dict[str, str],
                      refresh: bool) -> tuple[dict[str, str], bool]:
        challenge = response.headers.get("Www-Authenticate", "")
        basic = getattr(self._client.auth, "_basic_auth", None)  # from the Docker config
        if challenge.lower().startswith("basic"):
            if not basic or headers.get("Authorization") == f"Basic {basic}":
                return headers, False
            return {**headers, "Authorization": f"Basic {basic}"}, True
        updated, changed = self._client.auth.authenticate_request(response, dict(headers),
                                                                  refresh=refresh)
        return dict(updated), bool(changed)

    def fetch_manifest(self, cap: int) -> tuple[bytes, str | None, str | None]:
        """Return the manifest bytes as received, its Content-Type and Docker-Content-Digest."""
        url = f"{self._base}/manifests/{self.ref.target}"
        with self.request("GET", url,
                          headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}) as response:
            _expect(response, (200,), f"manifest {self.ref}")
            raw = _read_body(response, limit=cap, exact=False, deadline=self._deadline,
                             what=f"the manifest of {self.ref}")
            return (raw, response.headers.get("Content-Type"),
                    response.headers.get("Docker-Content-Digest"))

    def fetch_blob(self, layer: Descriptor, cap: int) -> bytes:
        """Stream the blob, enforcing the descriptor's exact size and digest."""
        if layer.size > cap:
            raise OciError(f"the layer of {self.ref} is {layer.size} bytes, the limit is {cap}",
                           code="oci_too_large")
        with self.request("GET", f"{self._base}/blobs/{layer.digest}") as response:
            _expect(response, (200,), f"layer {layer.digest} of {self.ref}")
            data = _read_body(response, limit=layer.size, exact=True, deadline=self._deadline,
                              what=f"layer {layer.digest}")
        if sha256_digest(data) != layer.digest:
            raise OciError(f"layer of {self.ref}: content has digest {sha256_digest(data)}, the "
                           f"manifest says {layer.digest}", code="oci_digest_mismatch")
        return data

    def upload_blob(self, data: bytes) -> str:
        """Upload `data` unless the repository has it already; return its digest."""
        digest = sha256_digest(data)
        with self.request("HEAD", f"{self._base}/blobs/{digest}") as response:
            if response.status_code == 200:
                return digest
        with self.request("POST", f"{self._base}/blobs/uploads/",
                          headers={"Content-Length": "0"}) as response:
            _expect(response, (202,), f"starting an upload to {self.ref.registry}")
            location = response.headers.get("Location")
        if not location:
            raise OciError(f"registry {self.ref.registry} gave no upload location",
                           code="oci_registry_error")
        url = _with_digest(urljoin(f"{self._base}/", location), digest)
        with self.request("PUT", url, headers={"Content-Type": "application/octet-stream"},
                          data=data) as response:
            _expect(response, (201, 204), f"uploading blob {digest}")
        return digest

    def put_manifest(self, raw: bytes, tag: str) -> None:
        """Store `raw` under `tag`; refuse a registry that reports another digest."""
        with self.request("PUT", f"{self._base}/manifests/{tag}",
                          headers={"Content-Type": OCI_MANIFEST}, data=raw) as response:
            _expect(response, (201, 204), f"pushing the manifest of {self.ref}")
            stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != sha256_digest(raw):
            raise OciError(f"registry stored the manifest as {stored}, expected "
                           f"{sha256_digest(raw)}", code="oci_digest_mismatch")


def _with_digest(url: str, digest: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit(parts._replace(query=query))


_STATUS_CODES = {401: "oci_unauthorized", 403: "oci_forbidden", 404: "oci_not_found"}


def _expect(response: requests.Response, ok: tuple[int, ...], what: str) -> None:
    if response.status_code in ok:
        return
    code = _STATUS_CODES.get(response.status_code, "oci_registry_error")
    raise OciError(f"{what}: registry answered HTTP {response.status_code}"
                   f"{_registry_reason(response)}", code=code)


def _registry_reason(response: requests.Response) -> str:
    try:
        body = response.raw.read(64 * 1024, decode_content=False)
        errors = json.loads(body)["errors"]
        return f" ({errors[0]['code']}: {errors[0]['message']})"[:300]
    except Exception:  # the reason is a courtesy; the status code says enough
        return ""


def _read_body(response: requests.Response, *, limit: int, exact: bool,
               deadline: _Deadline, what: str) -> bytes:
    """Read at most `limit` bytes (exactly `limit` when `exact`) as sent, undecoded."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise OciError(f"{what}: refused Content-Encoding {encoding!r}",
                       code="oci_registry_error")
    _check_length(response.headers.get("Content-Length"), limit, exact, what)
    chunks: list[bytes] = []
    total = 0
    while chunk := response.raw.read1(_CHUNK, decode_content=False):
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


_PLAINTEXT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                    "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"})


@contextmanager
def _registry_errors(registry: str) -> Iterator[None]:
    """Translate requests/urllib3/oras failures into OciError with a stable code."""
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise _tls_error(registry, exc) from exc
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError) as exc:
        raise OciError(f"registry {registry} timed out", code="oci_timeout") from exc
    except requests.exceptions.ConnectionError as exc:
        raise OciError(f"cannot reach registry {registry}: {_one_line(exc)}",
                       code="oci_unreachable") from exc
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError,
            ValueError, KeyError) as exc:
        raise OciError(f"registry {registry}: {_one_line(exc)}",
                       code="oci_registry_error") from exc


def _tls_error(registry: str, exc: BaseException) -> OciError:
    reason = _ssl_reason(exc)
    if reason in _PLAINTEXT_TLS_REASONS:
        return OciError(f"registry {registry} answered TLS with plain HTTP; plain HTTP is "
                        "allowed only for registries in oci.allow_insecure_registries "
                        "(aisoc plugin push: --insecure)", code="oci_insecure_registry")
    return OciError(f"TLS with registry {registry} failed: {reason or _one_line(exc)}",
                    code="oci_tls_error")


def _ssl_reason(exc: BaseException) -> str | None:
    todo: list[object] = [exc]
    for _ in range(32):  # requests wraps urllib3 wraps ssl; the chain is short
        if not todo:
            break
        current = todo.pop()
        if isinstance(current, ssl.SSLError):
            return str(current.reason)
        if isinstance(current, BaseException):
            todo += [current.__cause__, current.__context__, getattr(current, "reason", None),
                     *current.args]
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# ---- pull and push -----------------------------------------------------------------------


def pull_package(
    ref: str, *, insecure_registries: Sequence[str] = (), limits: Limits = Limits()
) -> Pulled:
    """Fetch and verify the package layer of `ref`; write nothing to disk.

    The manifest is read under a size cap, its digest computed from the bytes received (and
    matched against a digest reference), its shape checked; the one layer is streamed with
    its exact descriptor size and sha256 enforced. Raises OciError.
    """
    reference = parse_reference(ref)
    deadline = _Deadline(limits.deadline_s, lambda: OciError(
        f"pulling {reference} took longer than {limits.deadline_s:g} s", code="oci_timeout"))
    with _registry_errors(reference.registry), \
            _Registry(reference, insecure_registries, deadline) as registry:
        raw, content_type, stated = registry.fetch_manifest(limits.manifest_bytes)
        digest = _manifest_digest(reference, raw, stated)
        layer = layer_descriptor(raw, content_type)
        data = registry.fetch_blob(layer, limits.layer_bytes)
    return Pulled(digest=digest, layer=data, reference=reference)


def _manifest_digest(reference: Reference, raw: bytes, stated: str | None) -> str:
    digest = sha256_digest(raw)
    expected = reference.digest or (stated if stated and stated.startswith("sha256:") else None)
    if expected is not None and expected != digest:
        raise OciError(f"the manifest of {reference} has digest {digest}, expected {expected}",
                       code="oci_digest_mismatch")
    return digest


def push_package(file: Path, ref: str, *, insecure_registries: Sequence[str] = ()) -> str:
    """Push a package as a one-layer OCI 1.1 artifact; return the manifest digest.

    The package is first unpacked into a temporary dir under the daemon's rules and its
    manifest parsed, so nothing the daemon would refuse is published.
    """
    reference = _push_reference(ref)
    limits = Limits()
    data = _read_package(file, limits.layer_bytes)
    plugin = _inspect_package(data, limits)
    layer = Descriptor(media_type=MEDIA_TYPE_LAYER, digest=sha256_digest(data), size=len(data))
    raw = build_manifest(layer, title=file.name, plugin_id=plugin.id, version=plugin.version)
    deadline = _Deadline(PUSH_DEADLINE_S, lambda: OciError(
        f"pushing to {reference} took longer than {PUSH_DEADLINE_S:g} s", code="oci_timeout"))
    with _registry_errors(reference.registry), \
            _Registry(reference, insecure_registries, deadline) as registry:
        registry.upload_blob(EMPTY_CONFIG)
        registry.upload_blob(data)
        registry.put_manifest(raw, reference.target)
    return sha256_digest(raw)


def _push_reference(ref: str) -> Reference:
    reference = parse_reference(ref)
    if reference.tag is None or reference.digest is not None:
        raise _bad_reference(ref, "push to a tag (HOST/REPOSITORY:TAG), not a digest")
    return reference


def _read_package(file: Path, cap: int) -> bytes:
    with file.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > cap:
            raise OciError(f"{file} is {size} bytes, the limit is {cap}", code="oci_too_large")
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise OciError(f"{file} grew past {cap} bytes while read", code="oci_too_large")
    return data


def _inspect_package(data: bytes, limits: Limits) -> manifest_mod.Manifest:
    with tempfile.TemporaryDirectory(prefix="aisoc-push-") as tmp:
        staging = Path(tmp) / "package"
        staging.mkdir(mode=0o700)
        top = _extract(data, staging, limits)
        name, raw = read_manifest(staging)
    plugin = manifest_mod.parse(raw, name)
    if top != plugin.id:
        raise ArchiveError(f"the package's top directory is {top!r} but the manifest id is "
                           f"{plugin.id!r}; build it with `aisoc plugin package`",
                           code="archive_layout")
    return plugin


# ---- extraction --------------------------------------------------------------------------


def extract_package(layer: bytes, staging: Path, *, limits: Limits = Limits()) -> Path:
    """Unpack a package (tar+gzip, one top directory) into the empty dir `staging`.

    Only regular files (0644) and directories (0755) are created, with O_EXCL|O_NOFOLLOW
    relative to directory descriptors; every rule break raises ArchiveError. On error,
    `staging` may hold a partial tree: removing it is the caller's job.
    """
    _extract(layer, staging, limits)
    return staging


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _extract(layer: bytes, staging: Path, limits: Limits) -> str:
    deadline = _Deadline(limits.deadline_s, lambda: ArchiveError(
        f"extraction took longer than {limits.deadline_s:g} s", code="archive_timeout"))
    stream = _Gunzip(layer, budget=limits.extracted_bytes + TAR_METADATA_ALLOWANCE,
                     deadline=deadline)
    with _archive_errors(staging):
        root = os.open(staging, _DIR_FLAGS)
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as tar:
                extractor = _Extractor(root, limits, deadline)
                for info in tar:
                    extractor.add(info, tar)
                return extractor.finish(tar)
        finally:
            os.close(root)


@contextmanager
def _archive_errors(staging: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise ArchiveError(f"the package is not a valid tar+gzip archive: {_one_line(exc)}",
                           code="archive_corrupt") from exc
    except OSError as exc:
        hint = " (it must be empty)" if exc.errno in (errno.EEXIST, errno.ELOOP) else ""
        raise OciError(f"cannot write into staging {staging}{hint}: {exc.strerror}",
                       code="oci_staging_failed") from exc


class _Gunzip:
    """The decompressed bytes of exactly one gzip member, under a byte budget and deadline."""

    def __init__(self, data: bytes, *, budget: int, deadline: _Deadline) -> None:
        self._src = memoryview(data)
        self._pos = 0
        self._inflater = zlib.decompressobj(wbits=31)  # gzip wrapper only, CRC checked
        self._budget = budget
        self._deadline = deadline
        self.total = 0

    def read(self, size: int = -1, /) -> bytes:
        size = size if size > 0 else _CHUNK
        while not self._inflater.eof:
            self._deadline.left()
            feed = self._inflater.unconsumed_tail or self._next_input()
            out = self._inflater.decompress(feed, size)
            if out:
                return self._count(out)
            if not feed:
                raise ArchiveError("the gzip stream is truncated", code="archive_corrupt")
        if self._inflater.unused_data or self._pos < len(self._src):
            raise ArchiveError("data follows the gzip stream", code="archive_corrupt")
        return b""

    def _next_input(self) -> bytes:
        chunk = bytes(self._src[self._pos:self._pos + _CHUNK])
        self._pos += len(chunk)
        return chunk

    def _count(self, out: bytes) -> bytes:
        self.total += len(out)
        if self.total > self._budget:
            raise ArchiveError(f"the package decompresses to more than {self._budget} bytes",
                               code="archive_too_large")
        return out

    def tell(self) -> int:
        return self.total

    def write(self, data: bytes, /) -> int:
        raise OSError(errno.EBADF, "read-only stream")

    def seek(self, pos: int, /) -> int:
        raise OSError(errno.ESPIPE, "not seekable")

    def close(self) -> None:
        self._src.release()


_LINK_TYPES = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hardlink",
               tarfile.GNUTYPE_LONGLINK: "a GNU long-link header"}
_SPECIAL_TYPES = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                  tarfile.FIFOTYPE: "a FIFO", tarfile.CONTTYPE: "a contiguous file",
                  tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
                  tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
                  tarfile.XGLTYPE: "a PAX global header",
                  tarfile.SOLARIS_XHDTYPE: "a Solaris extended header"}
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose header processing admits only files, dirs and small PAX headers.

    tarfile documents `_proc_member` as the hook for subclasses; this one replaces all of
    tarfile's special-member handling (links, GNU long names, sparse maps, its PAX parser)
    with refusals and a linear PAX parser, so tarfile only splits blocks.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        buf = tar.fileobj.read(tarfile.BLOCKSIZE)
        try:
            info = cls.frombuf(buf, tar.encoding, tar.errors)
        except tarfile.HeaderError as exc:
            if len(buf) == tarfile.BLOCKSIZE and not buf.strip(b"\0"):
                raise  # a zero block: the end-of-archive marker, tarfile's EOFHeaderError
            # tarfile would end the archive quietly at a bad header; that hides truncation.
            raise ArchiveError(f"bad tar header: {exc}", code="archive_corrupt") from exc
        info.offset = tar.fileobj.tell() - tarfile.BLOCKSIZE
        return info._proc_member(tar)

    def _proc_member(self, tar: tarfile.TarFile) -> Self:
        _check_type(self)
        if self.type == tarfile.XHDTYPE:
            return self._proc_strict_pax(tar)
        return self._proc_plain(tar)

    def _proc_plain(self, tar: tarfile.TarFile) -> Self:
        self.offset_data = tar.fileobj.tell()
        _locate_next(self, tar)
        return self

    def _proc_strict_pax(self, tar: tarfile.TarFile) -> Self:
        if not 0 <= self.size <= PAX_HEADER_MAX:
            raise ArchiveError(f"a PAX header of {self.size} bytes (limit {PAX_HEADER_MAX})",
                               code="archive_too_large")
        buf = tar.fileobj.read(_blocks(self.size))
        if len(buf) != _blocks(self.size):
            raise ArchiveError("the archive ends inside a PAX header", code="archive_corrupt")
        records = _pax_records(buf[:self.size])
        try:
            member = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:  # only the end marker gets here unconverted
            raise ArchiveError("a PAX header describes no entry", code="archive_corrupt") \
                from exc
        if member.type == tarfile.XHDTYPE:
            raise ArchiveError("two PAX headers in a row", code="archive_corrupt")
        _apply_pax(member, records)
        member.offset = self.offset
        _locate_next(member, tar)
        return member


def _blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _check_type(info: tarfile.TarInfo) -> None:
    if info.type in _LINK_TYPES:
        target = f" (to {_show(info.linkname)})" if info.linkname else ""
        raise ArchiveError(f"{_show(info.name)} is {_LINK_TYPES[info.type]}{target}; links are "
                           "refused", code="archive_link")
    if info.type not in (*_FILE_TYPES, tarfile.DIRTYPE, tarfile.XHDTYPE):
        kind = _SPECIAL_TYPES.get(info.type, f"an entry of type {info.type!r}")
        raise ArchiveError(f"{_show(info.name)} is {kind}; only regular files and directories "
                           "are allowed", code="archive_special_file")


def _locate_next(info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    """Set where the next header starts; refuse sizes tar readers disagree about."""
    if info.size < 0 or (info.isdir() and info.size != 0):
        raise ArchiveError(f"{_show(info.name)} has an invalid size {info.size}",
                           code="archive_corrupt")
    tar.offset = info.offset_data + _blocks(info.size)


def _pax_records(buf: bytes) -> dict[str, bytes]:
    """Parse `"<len> <key>=<value>\\n"` records in one linear pass (CVE-2024-6232)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 21)
        length = int(buf[pos:space]) if space > pos and buf[pos:space].isdigit() else 0
        end = pos + length
        key, eq, value = buf[space + 1:end - 1].partition(b"=")
        if length <= space - pos + 1 or end > len(buf) or buf[end - 1:end] != b"\n" \
                or not eq or not key:
            raise ArchiveError("a malformed PAX record", code="archive_corrupt")
        name = key.decode("utf-8", "replace")
        if name in records:
            raise ArchiveError(f"PAX record {name!r} appears twice", code="archive_corrupt")
        records[name] = value
        pos = end
    return records


_UTF8_CHARSET = b"ISO-IR 10646 2000 UTF-8"


def _apply_pax(info: tarfile.TarInfo, records: Mapping[str, bytes]) -> None:
    for key, value in records.items():
        if key.startswith("GNU.sparse."):
            raise ArchiveError(f"{_show(info.name)} is a GNU sparse file; only regular files "
                               "and directories are allowed", code="archive_special_file")
        if key == "hdrcharset" and value != _UTF8_CHARSET:
            raise ArchiveError("PAX hdrcharset other than UTF-8", code="archive_path_invalid")
        if key == "path":
            info.name = _pax_text(value).rstrip("/")
        elif key == "size":
            if not (value.isdigit() and len(value) <= 20):
                raise ArchiveError(f"PAX size {value[:30]!r} is not a number",
                                   code="archive_corrupt")
            info.size = int(value)


def _pax_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"a PAX path {value[:100]!r} is not UTF-8",
                           code="archive_path_invalid") from exc


def _show(name: str) -> str:
    return repr(name if len(name) <= 200 else name[:200] + "...")


_NAME_RULES: tuple[tuple[Callable[[str], bool], str, str], ...] = (
    (lambda n: not n, "archive_path_invalid", "is empty"),
    (lambda n: "\x00" in n, "archive_path_invalid", "holds a NUL byte"),
    (lambda n: "\\" in n, "archive_path_invalid", "holds a backslash"),
    (lambda n: any(ord(c) < 0x20 or ord(c) == 0x7F for c in n), "archive_path_invalid",
     "holds a control character"),
    (lambda n: any(0xD800 <= ord(c) <= 0xDFFF for c in n), "archive_path_invalid",
     "is not valid UTF-8"),
    (lambda n: not unicodedata.is_normalized("NFC", n), "archive_path_invalid",
     "is not in Unicode NFC form"),
    (lambda n: n.startswith("/"), "archive_absolute_path", "is an absolute path"),
    (lambda n: ".." in n.split("/"), "archive_path_traversal", "has a '..' component"),
)


def member_path(name: str, limits: Limits) -> tuple[str, ...]:
    """Return the normalised components of an archive member name, or raise ArchiveError."""
    for broken, code, why in _NAME_RULES:
        if broken(name):
            raise ArchiveError(f"entry {_show(name)} {why}", code=code)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise ArchiveError(f"entry {_show(name)} names no file", code="archive_path_invalid")
    if len(name.encode()) > limits.path_length or len(parts) > limits.depth:
        raise ArchiveError(f"entry {_show(name)} is longer than {limits.path_length} bytes or "
                           f"deeper than {limits.depth} levels", code="archive_path_too_long")
    return parts


class _Extractor:
    """Writes accepted members under one root fd and remembers what it made."""

    def __init__(self, root: int, limits: Limits, deadline: _Deadline) -> None:
        self._root = root
        self._limits = limits
        self._deadline = deadline
        self._kinds: dict[tuple[str, ...], str] = {}  # path -> "file" | "dir" | "implicit"
        self._entries = 0
        self._declared = 0
        self.top: str | None = None

    def add(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self._deadline.left()
        self._entries += 1
        if self._entries > self._limits.entries:
            raise ArchiveError(f"the package has more than {self._limits.entries} entries",
                               code="archive_too_many_entries")
        rel = self._under_top(member_path(info.name, self._limits), info)
        if info.isdir():
            self._add_dir(rel)
        else:
            self._add_file(rel, info, tar)

    def _under_top(self, parts: tuple[str, ...], info: tarfile.TarInfo) -> tuple[str, ...]:
        top, rel = parts[0], parts[1:]
        if self.top is None:
            if not manifest_mod.ID_RE.match(top):
                raise ArchiveError(f"the top directory {_show(top)} is not a plugin id",
                                   code="archive_layout")
            self.top = top
        elif top != self.top:
            raise ArchiveError(f"entries under two top-level names, {_show(self.top)} and "
                               f"{_show(top)}; a package has one top directory",
                               code="archive_layout")
        if not rel and not info.isdir():
            raise ArchiveError(f"{_show(info.name)} is a file at the top level; a package "
                               "holds one directory", code="archive_layout")
        return rel

    def _add_dir(self, rel: tuple[str, ...]) -> None:
        if self._kinds.get(rel) in ("file", "dir"):
            raise _duplicate(rel)
        os.close(self._open_dirs(rel))
        self._kinds[rel] = "dir"

    def _add_file(self, rel: tuple[str, ...], info: tarfile.TarInfo,
                  tar: tarfile.TarFile) -> None:
        if rel in self._kinds:
            raise _duplicate(rel)
        self._take_budget(info)
        source = tar.extractfile(info)
        if source is None:  # only for links and specials, refused before here
            raise ArchiveError(f"{_show(info.name)} has no data", code="archive_corrupt")
        parent = self._open_dirs(rel[:-1])
        try:
            fd = os.open(rel[-1], _NEW_FILE_FLAGS, 0o644, dir_fd=parent)
        finally:
            os.close(parent)
        self._kinds[rel] = "file"
        try:
            os.fchmod(fd, 0o644)  # exact mode whatever the umask
            written = self._copy(source, fd, info)
        finally:
            os.close(fd)
        if written != info.size:
            raise ArchiveError(f"{_show(info.name)} is truncated", code="archive_corrupt")

    def _take_budget(self, info: tarfile.TarInfo) -> None:
        self._declared += info.size
        if info.size > self._limits.file_bytes:
            raise ArchiveError(f"{_show(info.name)} is {info.size} bytes, the per-file limit "
                               f"is {self._limits.file_bytes}", code="archive_too_large")
        if self._declared > self._limits.extracted_bytes:
            raise ArchiveError(f"the package holds more than {self._limits.extracted_bytes} "
                               "bytes of files", code="archive_too_large")

    def _copy(self, source: IO[bytes], fd: int, info: tarfile.TarInfo) -> int:
        written = 0
        while chunk := source.read(_CHUNK):
            self._deadline.left()
            written += len(chunk)
            if written > min(info.size, self._limits.file_bytes):
                raise ArchiveError(f"{_show(info.name)} is longer than its header says",
                                   code="archive_corrupt")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        return written

    def _open_dirs(self, rel: tuple[str, ...]) -> int:
        """Return an fd of the directory `rel`, creating missing levels (0755), never
        following a link."""
        fd = os.dup(self._root)
        try:
            for depth in range(1, len(rel) + 1):
                child = self._enter(fd, rel[:depth])
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, fd: int, path: tuple[str, ...]) -> int:
        kind = self._kinds.get(path)
        if kind == "file":
            raise _duplicate(path)
        if kind is None:
            os.mkdir(path[-1], 0o755, dir_fd=fd)
            self._kinds[path] = "implicit"
            child = os.open(path[-1], _DIR_FLAGS, dir_fd=fd)
            os.fchmod(child, 0o755)
            return child
        return os.open(path[-1], _DIR_FLAGS, dir_fd=fd)

    def finish(self, tar: tarfile.TarFile) -> str:
        """Check the archive's end and its layout; return the top directory name."""
        while chunk := tar.fileobj.read(_CHUNK):
            if chunk.strip(b"\0"):
                raise ArchiveError("data follows the end-of-archive marker",
                                   code="archive_corrupt")
        if self.top is None:
            raise ArchiveError("the package is empty", code="archive_layout")
        if not any(self._kinds.get((name,)) == "file" for name in manifest_mod.MANIFEST_NAMES):
            raise ArchiveError(f"{self.top}/ holds no {' or '.join(manifest_mod.MANIFEST_NAMES)}",
                               code="archive_layout")
        return self.top


def _duplicate(rel: tuple[str, ...]) -> ArchiveError:
    return ArchiveError(f"{_show('/'.join(rel))} appears twice or as both file and directory",
                        code="archive_duplicate")


# ---- `aisoc plugin push` -----------------------------------------------------------------


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that returns instead of exiting (only the CLI entry point exits)."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def _push_parser() -> _Parser:
    parser = _Parser(
        prog="aisoc plugin push",
        description="Push a plugin package (.tar.gz from `aisoc plugin package`) to an OCI "
                    "registry as a one-layer artifact; print the manifest digest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  aisoc plugin push shodan-1.2.0.tar.gz "
               "ghcr.io/myorg/aisoc-plugins/shodan:1.2.0\n"
               "  aisoc plugin push shodan-1.2.0.tar.gz 127.0.0.1:5000/aisoc/shodan:1.2.0 "
               "--insecure")
    parser.add_argument("file", metavar="FILE", type=Path, help="the package to push")
    parser.add_argument("ref", metavar="OCI_REF", help="HOST[:PORT]/REPOSITORY:TAG")
    parser.add_argument("--insecure", action="store_true",
                        help="talk plain HTTP to this registry (local test registries only)")
    return parser


def push_main(argv: list[str]) -> int:
    """Run `aisoc plugin push FILE OCI_REF [--insecure]`; return the exit code (0, 1, 2)."""
    parser = _push_parser()
    try:
        args = parser.parse_args(argv)
        reference = _push_reference(args.ref)
    except _ParserExit as exc:
        return exc.status
    except OciError as exc:
        parser.print_usage(sys.stderr)
        return _fail(exc.message, 2)
    insecure = [reference.registry] if args.insecure else []
    try:
        digest = push_package(args.file, args.ref, insecure_registries=insecure)
    except PluginDError as exc:
        return _fail(exc.message, 1)
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}", 1)
    print(digest)
    print(f"aisoc plugin push: pushed {args.file.name} to {reference}@{digest}", file=sys.stderr)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"aisoc plugin push: error: {' '.join(message.split())}", file=sys.stderr)
    return status
