"""Decide how to answer a registry's auth challenge: Basic, or a token from its realm (pure)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from aisoc_plugind.delivery.docker_config import Credentials
from aisoc_plugind.errors import OciError

__all__ = [
    "CLIENT_ID",
    "Challenge",
    "TokenRequest",
    "basic_authorization",
    "choose_challenge",
    "parse_challenges",
    "parse_token",
    "redact",
    "token_request",
]

CLIENT_ID = "aisoc-plugind"

# RFC 9110 §11: auth-scheme and auth-param names are tokens, values tokens or quoted strings.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_ITEM = re.compile(
    rf'[\s,]*(?:(?P<key>{_TCHARS})\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,]*)|(?P<scheme>{_TCHARS}))'
)
_ESCAPE = re.compile(r"\\(.)")
# A bearer token goes into a header: the RFC 6750 b64token alphabet, nothing that could break it.
_BEARER_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_MAX_TCHARS = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """One challenge of a WWW-Authenticate header: scheme and parameters, names lowercased."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRequest:
    """The request that asks a registry's token server (its realm) for a bearer token."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: bytes | None = field(default=None, repr=False)


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse WWW-Authenticate header values into challenges; stop at anything malformed."""
    found: list[tuple[str, dict[str, str]]] = []
    for value in values:
        pos = 0
        while (match := _ITEM.match(value, pos)) and match.end() > pos:
            pos = match.end()
            if match["scheme"]:
                found.append((match["scheme"].lower(), {}))
            elif found:
                found[-1][1][match["key"].lower()] = _unquote(match["value"])
            else:
                break
    return [Challenge(scheme=scheme, params=params) for scheme, params in found]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _ESCAPE.sub(r"\1", value[1:-1])
    return value


def choose_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """Return the challenge to answer: Bearer before Basic; None when neither is offered."""
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return None


def basic_authorization(credentials: Credentials | None) -> str | None:
    """Return the `Authorization: Basic` value of `credentials`, None without a username."""
    if credentials is None or not credentials.username:
        return None
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def token_request(
    challenge: Challenge, scopes: Sequence[str], credentials: Credentials | None
) -> TokenRequest:
    """Return how to ask the challenge's realm for a token covering `scopes`.

    With an identity token (a refresh token from `docker login`): the OAuth2 POST of the
    distribution token spec. Else a GET, with Basic credentials when there are any and
    anonymous otherwise. Raises `oci_registry_error` for a realm that is not an http(s) URL.
    """
    realm = challenge.params.get("realm", "")
    if urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).netloc:
        raise OciError(
            f"the registry's Bearer challenge names no usable token realm ({realm[:100]!r})",
            code="oci_registry_error",
        )
    service = [("service", challenge.params["service"])] if "service" in challenge.params else []
    if credentials is not None and credentials.identity_token:
        form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", credentials.identity_token),
            ("client_id", CLIENT_ID),
            ("scope", " ".join(scopes)),
            *service,
        ]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return TokenRequest(
            method="POST", url=realm, headers=headers, body=urlencode(form).encode()
        )
    basic = basic_authorization(credentials)
    query = [*service, *(("scope", scope) for scope in scopes)]
    return TokenRequest(
        method="GET",
        url=_with_query(realm, query),
        headers={"Authorization": basic} if basic else {},
    )


def _with_query(url: str, pairs: Sequence[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(pairs)) if q)
    return urlunsplit(parts._replace(query=query))


def parse_token(body: bytes) -> str | None:
    """Return the bearer token of a token server's JSON answer, None when it holds none usable.

    `token` is the distribution spec's name, `access_token` the OAuth2 one; either is accepted
    only in the b64token alphabet, so it can never break or smuggle a header.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or len(token) > _MAX_TCHARS or not _BEARER_RE.fullmatch(token):
        return None
    return token


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return `text` with every occurrence of each secret replaced by `[redacted]`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
