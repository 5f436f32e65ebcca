"""Auth decisions without a network: challenge parsing, token requests and answers, redaction."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aisoc_plugind.delivery.auth import (
    Challenge,
    basic_authorization,
    choose_challenge,
    parse_challenges,
    parse_token,
    redact,
    token_request,
)
from aisoc_plugind.delivery.docker_config import Credentials
from aisoc_plugind.errors import OciError

SOURCE = Path("/etc/aisoc-plugind/docker.json")
BASIC = Credentials(source=SOURCE, username="robot", password="pw")
IDENTITY = Credentials(source=SOURCE, identity_token="refresh-me")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="registry"', [("basic", {"realm": "registry"})]),
        (
            'Bearer realm="https://auth.example/token",service="reg.example",'
            'scope="repository:a/b:pull,push"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://auth.example/token",
                        "service": "reg.example",
                        "scope": "repository:a/b:pull,push",
                    },
                )
            ],
        ),
        (
            "BEARER Realm=https://a/t, Service=s",
            [("bearer", {"realm": "https://a/t", "service": "s"})],
        ),
        ('Bearer realm="a \\"quoted\\" realm"', [("bearer", {"realm": 'a "quoted" realm'})]),
        (
            'Basic realm="b", Bearer realm="https://a/t"',
            [("basic", {"realm": "b"}), ("bearer", {"realm": "https://a/t"})],
        ),
        (
            'Bearer error="insufficient_scope",realm=""',
            [("bearer", {"error": "insufficient_scope", "realm": ""})],
        ),
        ("Negotiate", [("negotiate", {})]),
        ("", []),
        ('realm="no scheme"', []),
    ],
)
def test_parse_challenges(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    """Schemes and parameter names are lowercased, quoted values unescaped."""
    parsed = parse_challenges([header])
    assert [(c.scheme, dict(c.params)) for c in parsed] == expected


@given(st.text(max_size=300))
def test_parse_challenges_never_raises(header: str) -> None:
    """Any header text parses to some list of challenges, without an exception."""
    assert isinstance(parse_challenges([header]), list)


@pytest.mark.parametrize(
    ("schemes", "chosen"),
    [(["basic", "bearer"], "bearer"), (["basic"], "basic"), (["negotiate"], None), ([], None)],
)
def test_choose_challenge_prefers_bearer(schemes: list[str], chosen: str | None) -> None:
    """Bearer before Basic; nothing else is answered."""
    challenge = choose_challenge([Challenge(scheme=s) for s in schemes])
    assert (challenge.scheme if challenge else None) == chosen


def test_basic_authorization() -> None:
    """Base64 of `user:password`; None without a username."""
    assert basic_authorization(BASIC) == "Basic " + base64.b64encode(b"robot:pw").decode()
    assert basic_authorization(IDENTITY) is None
    assert basic_authorization(None) is None


def _bearer(**params: str) -> Challenge:
    return Challenge(scheme="bearer", params={"realm": "https://auth.example/token?x=1", **params})


def test_token_request_anonymous() -> None:
    """No credentials: a GET with the service and our scopes, and no Authorization."""
    ask = token_request(_bearer(service="reg"), ["repository:a:pull"], None)
    assert ask.method == "GET" and ask.headers == {}
    query = parse_qs(urlsplit(ask.url).query)
    assert query == {"x": ["1"], "service": ["reg"], "scope": ["repository:a:pull"]}


def test_token_request_with_basic_credentials() -> None:
    """Username and password: the same GET with Basic credentials for the realm."""
    ask = token_request(_bearer(), ["repository:a:pull,push"], BASIC)
    assert ask.headers == {"Authorization": basic_authorization(BASIC)}
    assert parse_qs(urlsplit(ask.url).query)["scope"] == ["repository:a:pull,push"]
    assert "pw" not in repr(ask) and "Basic" not in repr(ask)


def test_token_request_with_identity_token() -> None:
    """An identity token: the OAuth2 refresh-token POST, the token in the body only."""
    ask = token_request(_bearer(service="reg"), ["repository:a:pull"], IDENTITY)
    assert ask.method == "POST" and ask.url == "https://auth.example/token?x=1"
    assert ask.body is not None
    form = parse_qs(ask.body.decode())
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["refresh-me"],
        "client_id": ["aisoc-plugind"],
        "scope": ["repository:a:pull"],
        "service": ["reg"],
    }
    assert "refresh-me" not in repr(ask)


@pytest.mark.parametrize("realm", ["", "/token", "ftp://a/t", "https://", "javascript:alert(1)"])
def test_token_request_needs_an_http_realm(realm: str) -> None:
    """A realm that is not an absolute http(s) URL is a registry error."""
    with pytest.raises(OciError) as caught:
        token_request(Challenge(scheme="bearer", params={"realm": realm}), ["s"], None)
    assert caught.value.code == "oci_registry_error"


@pytest.mark.parametrize(
    ("body", "token"),
    [
        (b'{"token": "abc.DEF-123_~+/=="}', "abc.DEF-123_~+/=="),
        (b'{"access_token": "oauth"}', "oauth"),
        (b'{"token": "", "access_token": "second"}', "second"),
        (b'{"token": "a b"}', None),
        (b'{"token": "a\\nb"}', None),
        (b'{"token": "ab\\n"}', None),
        (b'{"token": "=ab"}', None),
        (b'{"token": 1}', None),
        (b'["token"]', None),
        (b"nope", None),
        (b"{}", None),
    ],
)
def test_parse_token(body: bytes, token: str | None) -> None:
    """Only a b64token-alphabet string is a token: nothing that could break a header."""
    assert parse_token(body) == token


def test_parse_token_caps_length() -> None:
    """A token over 64 KiB is refused."""
    assert parse_token(b'{"token": "' + b"a" * (64 * 1024 + 1) + b'"}') is None


def test_redact_replaces_every_secret() -> None:
    """Each secret, however often it appears, longest first, becomes `[redacted]`."""
    text = "user pw and pw-long and pw"
    assert redact(text, ["pw", "pw-long", ""]) == "user [redacted] and [redacted] and [redacted]"
    assert redact("nothing here", []) == "nothing here"
