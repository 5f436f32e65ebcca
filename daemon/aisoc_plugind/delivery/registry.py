"""Talk to one repository of an OCI registry: bounded requests, our own auth, no retries."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from aisoc_plugind import __version__
from aisoc_plugind.delivery.artifact import OCI_INDEX, OCI_MANIFEST, Descriptor, sha256_digest
from aisoc_plugind.delivery.auth import (
    Challenge,
    basic_authorization,
    choose_challenge,
    parse_challenges,
    parse_token,
    redact,
    token_request,
)
from aisoc_plugind.delivery.docker_config import docker_config_path, find_credentials
from aisoc_plugind.delivery.limits import Deadline
from aisoc_plugind.delivery.reference import Reference, allows_http
from aisoc_plugind.delivery.transport import (
    check_scheme,
    origin,
    read_body,
    registry_errors,
    timeouts,
    tls_context,
)
from aisoc_plugind.errors import OciError

__all__ = ["Registry", "RegistryAccess"]

_HEADERS = {"Accept-Encoding": "identity", "User-Agent": f"aisoc-plugind/{__version__}"}


_MAX_REDIRECTS = 5


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# As oras-go does (registry/remote/auth/client.go): a token answer is small.
_TOKEN_CAP = 128 * 1024


_REASON_CAP = 64 * 1024


_STATUS_CODES = {401: "oci_unauthorized", 403: "oci_forbidden", 404: "oci_not_found"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryAccess:
    """How registries are reached: which may speak plain HTTP, extra CAs, whose credentials.

    `docker_config` None means `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`
    (missing: anonymous); a file named explicitly must exist.
    """

    insecure_registries: tuple[str, ...] = ()
    ca_file: Path | None = None
    docker_config: Path | None = None


class Registry:
    """One repository of one registry, for one pull or one push; use it as a context manager.

    Every request is a single bounded attempt under the deadline. Credentials (Basic, or the
    token they buy) go to the registry's own origin only, never to a redirect target, and a
    401 is answered only when the registry itself sent it.
    """

    def __init__(
        self, ref: Reference, access: RegistryAccess, deadline: Deadline, *, push: bool = False
    ) -> None:
        self.ref = ref
        self._access = access
        self._deadline = deadline
        scheme = "http" if allows_http(ref.registry, access.insecure_registries) else "https"
        self._base = f"{scheme}://{ref.registry}/v2/{ref.repository}"
        self._origin = origin(httpx.URL(self._base))
        self._scopes = (f"repository:{ref.repository}:{'pull,push' if push else 'pull'}",)
        self._config = docker_config_path(access.docker_config, os.environ)
        self._credentials = find_credentials(
            ref.registry, self._config, required=access.docker_config is not None
        )
        self._secrets = list(self._credentials.secrets() if self._credentials else ())
        self._authorization: str | None = None
        # trust_env=False: no proxy, netrc or CA bundle from the environment; all is explicit.
        self._client = httpx.Client(
            verify=tls_context(access.ca_file), trust_env=False, headers=_HEADERS
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    @contextmanager
    def open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> Iterator[httpx.Response]:
        """Send one request; yield the response with its body unread (see `read_body`).

        GET and HEAD follow up to 5 redirects. A 401 challenge from the registry is answered
        once (Basic, or a token from its realm) and the request sent again. httpx failures,
        here and while the body is read, become OciError with a stable code.
        """
        with registry_errors(self.ref.registry, self._secrets):
            response = self._exchange(method, httpx.URL(url), dict(headers or {}), content)
            try:
                yield response
            finally:
                response.close()

    def _exchange(
        self, method: str, url: httpx.URL, headers: dict[str, str], content: bytes | None
    ) -> httpx.Response:
        response = self._follow(method, url, headers, content)
        challenge = self._challenge(response)
        if challenge is None:
            return response
        response.close()
        self._authorization = self._answer(challenge)
        return self._follow(method, url, headers, content)

    def _follow(
        self, method: str, url: httpx.URL, headers: dict[str, str], content: bytes | None
    ) -> httpx.Response:
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._send(method, url, headers, content)
            if method not in ("GET", "HEAD") or response.status_code not in _REDIRECTS:
                return response
            response.close()
            location = response.headers.get("Location")
            if not location:
                raise OciError(
                    f"registry {self.ref.registry} redirected without a Location",
                    code="oci_registry_error",
                )
            url = response.request.url.join(location)
        raise OciError(
            f"registry {self.ref.registry} redirected more than {_MAX_REDIRECTS} times",
            code="oci_registry_error",
        )

    def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        content: bytes | None,
        *,
        authorize: bool = True,
    ) -> httpx.Response:
        check_scheme(url, self._access.insecure_registries)
        sent = dict(headers)
        if authorize and self._authorization and origin(url) == self._origin:
            sent["Authorization"] = self._authorization
        request = self._client.build_request(
            method, url, headers=sent, content=content, timeout=timeouts(self._deadline)
        )
        return self._client.send(request, stream=True)

    def _challenge(self, response: httpx.Response) -> Challenge | None:
        """Return the registry's own 401 challenge when there is an answer not yet tried."""
        if response.status_code != 401 or origin(response.request.url) != self._origin:
            return None
        offered = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        challenge = choose_challenge(offered)
        if challenge is not None and challenge.scheme == "basic":
            basic = basic_authorization(self._credentials)
            return None if basic is None or basic == self._authorization else challenge
        return challenge

    def _answer(self, challenge: Challenge) -> str:
        basic = basic_authorization(self._credentials)
        if challenge.scheme == "basic" and basic is not None:
            return basic
        return f"Bearer {self._fetch_token(challenge)}"

    def _fetch_token(self, challenge: Challenge) -> str:
        """Ask the challenge's realm for a token (with our credentials, if any); no redirects."""
        ask = token_request(challenge, self._scopes, self._credentials)
        url = httpx.URL(ask.url)
        server = f"the token server {url.host} of {self.ref.registry}"
        response = self._send(ask.method, url, ask.headers, ask.body, authorize=False)
        try:
            token = parse_token(self._token_answer(response, server))
        finally:
            response.close()
        if token is None:
            raise OciError(f"{server} answered without a usable token", code="oci_registry_error")
        self._secrets.append(token)
        return token

    def _token_answer(self, response: httpx.Response, server: str) -> bytes:
        status = response.status_code
        if status in (401, 403):
            hint = f"; {self._credentials_hint(401)}" if self._credentials is None else ""
            raise OciError(
                f"{server} refused {self._who()} (HTTP {status}){hint}", code="oci_unauthorized"
            )
        if status != 200:
            raise OciError(f"{server} answered HTTP {status}", code="oci_registry_error")
        return read_body(
            response, limit=_TOKEN_CAP, exact=False, deadline=self._deadline, what=server
        )

    def _who(self) -> str:
        if self._credentials is None:
            return "anonymous access"
        return f"the credentials for {self.ref.registry} from {self._credentials.source}"

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return f"; {self._credentials_hint(status)}"
        if status == 400 and self._origin[0] == "http":
            # What a TLS server answers to plain HTTP (Go: "Client sent an HTTP request...").
            return (
                "; if the registry speaks TLS, remove it from oci.allow_insecure_registries "
                "(aisoc plugin push: drop --insecure)"
            )
        return ""

    def _credentials_hint(self, status: int) -> str:
        if self._credentials is None:
            where = self._config or "a Docker config"
            return (
                f"no credentials for {self.ref.registry} in {where} (docker login, or name a "
                "Docker config with oci.docker_config; aisoc plugin push: --docker-config)"
            )
        verdict = "were refused" if status == 401 else "do not allow this"
        return f"the credentials for {self.ref.registry} from {self._credentials.source} {verdict}"

    def _expect(self, response: httpx.Response, ok: tuple[int, ...], what: str) -> None:
        status = response.status_code
        if status in ok:
            return
        reason = redact(_registry_reason(response), self._secrets)
        raise OciError(
            f"{what}: registry answered HTTP {status}{reason}{self._hint(status)}",
            code=_STATUS_CODES.get(status, "oci_registry_error"),
        )

    def fetch_manifest(self, cap: int) -> tuple[bytes, str | None, str | None]:
        """Return the manifest bytes as received, its Content-Type and Docker-Content-Digest."""
        url = f"{self._base}/manifests/{self.ref.target}"
        accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        with self.open("GET", url, headers=accept) as response:
            self._expect(response, (200,), f"manifest {self.ref}")
            raw = read_body(
                response,
                limit=cap,
                exact=False,
                deadline=self._deadline,
                what=f"the manifest of {self.ref}",
            )
            headers = response.headers
            return raw, headers.get("Content-Type"), headers.get("Docker-Content-Digest")

    def fetch_blob(self, layer: Descriptor, cap: int) -> bytes:
        """Stream the blob, enforcing the descriptor's exact size and digest as it arrives."""
        if layer.size > cap:
            raise OciError(
                f"the layer of {self.ref} is {layer.size} bytes, the limit is {cap}",
                code="oci_too_large",
            )
        with self.open("GET", f"{self._base}/blobs/{layer.digest}") as response:
            self._expect(response, (200,), f"layer {layer.digest} of {self.ref}")
            return read_body(
                response,
                limit=layer.size,
                exact=True,
                deadline=self._deadline,
                what=f"the layer of {self.ref}",
                digest=layer.digest,
            )

    def upload_blob(self, data: bytes) -> str:
        """Upload `data` unless the repository has it already; return its digest."""
        digest = sha256_digest(data)
        with self.open("HEAD", f"{self._base}/blobs/{digest}") as response:
            if response.status_code == 200:
                return digest
        with self.open("POST", f"{self._base}/blobs/uploads/", content=b"") as response:
            self._expect(response, (202,), f"starting an upload to {self.ref.registry}")
            location = response.headers.get("Location")
            if not location:
                raise OciError(
                    f"registry {self.ref.registry} gave no upload location",
                    code="oci_registry_error",
                )
            url = _with_digest(str(response.request.url.join(location)), digest)
        octets = {"Content-Type": "application/octet-stream"}
        with self.open("PUT", url, headers=octets, content=data) as response:
            self._expect(response, (201, 204), f"uploading blob {digest}")
        return digest

    def put_manifest(self, raw: bytes, tag: str) -> None:
        """Store `raw` under `tag`; refuse a registry that reports another digest."""
        typed = {"Content-Type": OCI_MANIFEST}
        url = f"{self._base}/manifests/{tag}"
        with self.open("PUT", url, headers=typed, content=raw) as response:
            self._expect(response, (201, 204), f"pushing the manifest of {self.ref}")
            stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != sha256_digest(raw):
            raise OciError(
                f"registry stored the manifest as {stored[:80]}, expected {sha256_digest(raw)}",
                code="oci_digest_mismatch",
            )


def _with_digest(url: str, digest: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit(parts._replace(query=query))


def _registry_reason(response: httpx.Response) -> str:
    """Return ` (CODE: message)` from a distribution-spec error body, or "" (a courtesy)."""
    try:
        body = b""
        for chunk in response.iter_raw():
            body += chunk
            if len(body) >= _REASON_CAP:
                return ""
        error = json.loads(body)["errors"][0]
        text = " ".join(f"({error['code']}: {error['message']})".split())
        return f" {text[:300]}"
    except Exception:  # the status code says enough
        return ""
