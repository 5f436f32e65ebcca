"""The registry client against real TLS and htpasswd registries, and against lying servers."""

from __future__ import annotations

import base64
import json
import os
import stat
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from aisoc_plugind.authoring.packaging import build_package
from aisoc_plugind.cli.main import run_aisoc
from aisoc_plugind.delivery.limits import MIB, Limits
from aisoc_plugind.delivery.oci import pull_package, push_package
from aisoc_plugind.errors import OciError
from tests.conftest import PluginFactory
from tests.delivery.fake_registry import (  # noqa: F401 - the fixture
    Route,
    Routes,
    liar_fixture,
    serve_package,
    sha,
    start_liar,
)
from tests.oci_registry import (  # noqa: F401 - the fixtures
    RunningRegistry,
    auth_entry,
    hermetic,  # autouse: no proxy, no Docker config
    oci_auth_registry_fixture,
    oci_tls_registry_fixture,
    write_docker_config,
)

SECRET = "s3cret-Pa55word"


_COUNTER = iter(range(1_000_000))


def package(tmp_path: Path, plugin_id: str = "acme.registry") -> Path:
    """Write a signed package whose bytes no other test pushes (a fresh version each time)."""
    version = f"1.0.{next(_COUNTER)}"
    src = PluginFactory(tmp_path / f"src-{version}").write(
        "pkg", plugin_id=plugin_id, version=version
    )
    out = tmp_path / f"{plugin_id}-{version}.tar.gz"
    out.write_bytes(build_package(src).data)
    return out


def failure(call: Callable[[], Any], code: str) -> OciError:
    """Run `call`, which must raise OciError `code`; return the error."""
    with pytest.raises(OciError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def assert_hidden(error: BaseException, *secrets: str) -> None:
    """No secret in the message, the repr, the dict, or the whole traceback with causes."""
    shown = [
        str(error),
        repr(error),
        json.dumps(getattr(error, "as_dict", dict)()),
        "".join(traceback.format_exception(error)),
    ]
    for secret in secrets:
        for text in shown:
            assert secret not in text


def pull(host: str, ref: str, **kwargs: Any) -> Any:
    return pull_package(f"{host}/{ref}", insecure_registries=[host], **kwargs)


def basic_secret(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


# ---- TLS: a real registry with its own CA ---------------------------------------------------


@pytest.mark.oci
def test_push_and_pull_over_tls_with_the_ca_file(
    oci_tls_registry: RunningRegistry, tmp_path: Path
) -> None:
    """With `ca_file` the registry's certificate verifies; the digests agree both ways."""
    file, ref = package(tmp_path), f"{oci_tls_registry.host}/aisoc/tls:1"
    digest = push_package(file, ref, ca_file=oci_tls_registry.ca_file)
    pulled = pull_package(
        f"{oci_tls_registry.host}/aisoc/tls@{digest}", ca_file=oci_tls_registry.ca_file
    )
    assert (pulled.digest, pulled.layer) == (digest, file.read_bytes())


@pytest.mark.oci
def test_tls_registry_without_its_ca_is_a_tls_error(oci_tls_registry: RunningRegistry) -> None:
    """System roots alone do not trust a private CA: `oci_tls_error` naming `oci.ca_file`."""
    error = failure(lambda: pull_package(f"{oci_tls_registry.host}/aisoc/tls:1"), "oci_tls_error")
    assert "certificate verify failed" in error.message
    assert "oci.ca_file" in error.message and "--ca-file" in error.message


@pytest.mark.oci
def test_another_ca_does_not_verify_the_registry(
    oci_tls_registry: RunningRegistry, oci_auth_registry: RunningRegistry
) -> None:
    """A CA file adds trust in its own CA only."""
    failure(
        lambda: pull_package(
            f"{oci_tls_registry.host}/aisoc/tls:1", ca_file=oci_auth_registry.ca_file
        ),
        "oci_tls_error",
    )


@pytest.mark.oci
def test_tls_registry_listed_as_insecure_gets_a_hint(oci_tls_registry: RunningRegistry) -> None:
    """Plain HTTP to a TLS registry is answered 400; the error says what to change."""
    host = oci_tls_registry.host
    error = failure(
        lambda: pull_package(f"{host}/aisoc/tls:1", insecure_registries=[host]),
        "oci_registry_error",
    )
    assert "HTTP 400" in error.message and "speaks TLS" in error.message


@pytest.mark.parametrize(("content", "why"), [(None, "does not exist"), (b"junk", "no PEM")])
def test_unusable_ca_file_is_named(tmp_path: Path, content: bytes | None, why: str) -> None:
    """A missing or non-PEM `ca_file` is `oci_tls_error` naming the file and the setting."""
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    error = failure(lambda: pull_package("127.0.0.1:1/aisoc/x:1", ca_file=ca_file), "oci_tls_error")
    assert str(ca_file) in error.message and "oci.ca_file" in error.message
    assert why in error.message


@pytest.mark.oci
def test_blob_corrupted_in_storage_is_a_digest_mismatch(
    oci_tls_registry: RunningRegistry, tmp_path: Path
) -> None:
    """The registry serves what its disk holds; same size, other bytes: `oci_digest_mismatch`."""
    file = package(tmp_path)
    ca = oci_tls_registry.ca_file
    digest = push_package(file, f"{oci_tls_registry.host}/aisoc/rot:1", ca_file=ca)
    blob = oci_tls_registry.blob_file(sha(file.read_bytes()))
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))
    error = failure(
        lambda: pull_package(f"{oci_tls_registry.host}/aisoc/rot@{digest}", ca_file=ca),
        "oci_digest_mismatch",
    )
    assert sha(file.read_bytes()) in error.message


# ---- htpasswd over TLS: credentials from a Docker config -------------------------------------


@pytest.mark.oci
def test_htpasswd_push_and_pull_with_docker_config(
    oci_auth_registry: RunningRegistry, tmp_path: Path
) -> None:
    """Good credentials from the named Docker config: push, then pull the same digest."""
    reg = oci_auth_registry
    config = reg.docker_config(tmp_path / "docker.json")
    file, ref = package(tmp_path), f"{reg.host}/aisoc/auth:1"
    digest = push_package(file, ref, ca_file=reg.ca_file, docker_config=config)
    pulled = pull_package(ref, ca_file=reg.ca_file, docker_config=config)
    assert (pulled.digest, pulled.layer) == (digest, file.read_bytes())


@pytest.mark.oci
@pytest.mark.parametrize("where", ["DOCKER_CONFIG", "HOME"])
def test_default_docker_config_locations(
    oci_auth_registry: RunningRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """Without a setting: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    reg = oci_auth_registry
    if where == "DOCKER_CONFIG":
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
        reg.docker_config(tmp_path / "dc" / "config.json")
    else:
        reg.docker_config(tmp_path / "home" / ".docker" / "config.json")
    file = package(tmp_path)
    push_package(file, f"{reg.host}/aisoc/default:1", ca_file=reg.ca_file)
    assert (
        pull_package(f"{reg.host}/aisoc/default:1", ca_file=reg.ca_file).layer == file.read_bytes()
    )


@pytest.mark.oci
def test_username_and_password_fields_are_read(
    oci_auth_registry: RunningRegistry, tmp_path: Path
) -> None:
    """An auths entry may spell the credentials out instead of `auth`."""
    reg = oci_auth_registry
    assert reg.username is not None and reg.password is not None
    entry = {"username": reg.username, "password": reg.password}
    config = write_docker_config(tmp_path / "c.json", {f"https://{reg.host}/v2/": entry})
    file = package(tmp_path)
    push_package(file, f"{reg.host}/aisoc/fields:1", ca_file=reg.ca_file, docker_config=config)


@pytest.mark.oci
def test_no_credentials_is_unauthorized_with_a_hint(oci_auth_registry: RunningRegistry) -> None:
    """Nothing in the Docker config: `oci_unauthorized` saying where we looked."""
    reg = oci_auth_registry
    error = failure(
        lambda: pull_package(f"{reg.host}/aisoc/auth:1", ca_file=reg.ca_file), "oci_unauthorized"
    )
    assert "no credentials for" in error.message and "oci.docker_config" in error.message
    assert ".docker/config.json" in error.message


@pytest.mark.oci
@pytest.mark.parametrize("push", [False, True])
def test_wrong_password_is_unauthorized_and_never_shown(
    oci_auth_registry: RunningRegistry, tmp_path: Path, push: bool
) -> None:
    """A refused password: `oci_unauthorized`, the password in no message, repr or cause."""
    reg = oci_auth_registry
    config = reg.docker_config(tmp_path / "c.json", password=SECRET)
    ref = f"{reg.host}/aisoc/auth:1"
    if push:
        file = package(tmp_path)
        call = lambda: push_package(file, ref, ca_file=reg.ca_file, docker_config=config)  # noqa: E731
    else:
        call = lambda: pull_package(ref, ca_file=reg.ca_file, docker_config=config)  # noqa: E731
    error = failure(call, "oci_unauthorized")
    assert "were refused" in error.message and str(config) in error.message
    assert_hidden(error, SECRET, basic_secret("robot", SECRET))


@pytest.mark.oci
def test_tls_failure_with_credentials_shows_no_secret(
    oci_auth_registry: RunningRegistry, tmp_path: Path
) -> None:
    """Credentials loaded, TLS refused: the error carries no secret."""
    reg = oci_auth_registry
    assert reg.password is not None
    config = reg.docker_config(tmp_path / "c.json")
    error = failure(
        lambda: pull_package(f"{reg.host}/aisoc/auth:1", docker_config=config), "oci_tls_error"
    )
    assert_hidden(error, reg.password, basic_secret("robot", reg.password))


def _fake_helper(bin_dir: Path, marker: Path) -> None:
    """A `docker-credential-evil` on PATH that would leave a marker if anything ran it."""
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-evil"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)


@pytest.mark.oci
@pytest.mark.parametrize(
    "extra",
    [
        {"credsStore": "evil"},
        {"credHelpers": {"HOST": "evil"}},
    ],
)
def test_credential_helpers_are_refused_never_run(
    oci_auth_registry: RunningRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, Any],
) -> None:
    """A registry whose secret lives in a helper: a coded refusal naming the setting."""
    reg = oci_auth_registry
    marker = tmp_path / "helper-ran"
    _fake_helper(tmp_path / "bin", marker)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    extra = json.loads(json.dumps(extra).replace("HOST", reg.host))
    config = write_docker_config(tmp_path / "c.json", {reg.host: {}}, **extra)
    error = failure(
        lambda: pull_package(f"{reg.host}/aisoc/auth:1", ca_file=reg.ca_file, docker_config=config),
        "oci_credentials_unsupported",
    )
    assert "oci.docker_config" in error.message and "--docker-config" in error.message
    assert not marker.exists()


def test_named_docker_config_must_exist(tmp_path: Path) -> None:
    """An explicitly configured Docker config that is missing is an error, not anonymity."""
    missing = tmp_path / "nope.json"
    error = failure(
        lambda: pull_package("127.0.0.1:1/aisoc/x:1", docker_config=missing),
        "oci_credentials_invalid",
    )
    assert str(missing) in error.message


def test_malformed_docker_config_shows_none_of_it(tmp_path: Path) -> None:
    """A config that is not JSON is refused without quoting it (it may hold secrets)."""
    config = tmp_path / "c.json"
    config.write_text('{"auths": {"h:1": {"auth": "' + SECRET + '"}')
    error = failure(
        lambda: pull_package("127.0.0.1:1/aisoc/x:1", docker_config=config),
        "oci_credentials_invalid",
    )
    assert_hidden(error, SECRET)


@pytest.mark.oci
def test_push_cli_with_ca_file_and_docker_config(
    oci_auth_registry: RunningRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aisoc plugin push --ca-file --docker-config` reaches a TLS + htpasswd registry."""
    reg = oci_auth_registry
    assert reg.ca_file is not None
    config = reg.docker_config(tmp_path / "c.json")
    ref = f"{reg.host}/aisoc/cli:1"
    argv = ["plugin", "push", str(package(tmp_path)), ref, "--ca-file", str(reg.ca_file)]
    assert run_aisoc([*argv, "--docker-config", str(config)]) == 0, capsys.readouterr().err
    out, _ = capsys.readouterr()
    assert out.strip() == pull_package(ref, ca_file=reg.ca_file, docker_config=config).digest
    assert run_aisoc(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("aisoc plugin push: error: ") and "no credentials for" in err


# ---- redirects --------------------------------------------------------------------------------


def _basic_registry(routes: Routes, username: str = "robot", password: str = SECRET) -> str:
    header = f"Basic {basic_secret(username, password)}"
    for route in routes.values():
        route.auth = header
    routes.challenge = 'Basic realm="liar"'
    return header


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_blob_redirect_is_followed_without_credentials(
    liar: tuple[str, Routes], tmp_path: Path, status: int
) -> None:
    """Blob storage elsewhere: followed for GET, and the registry's credentials stay home."""
    host, routes = liar
    blob_path = f"/v2/aisoc/x/blobs/{sha(b'layer-bytes')}"
    serve_package(routes, b"layer-bytes")
    config = write_docker_config(tmp_path / "c.json", {host: auth_entry("robot", SECRET)})
    with start_liar() as (storage, stored):
        stored["/blob"] = Route(b"layer-bytes")
        routes[blob_path] = Route(b"", {"Location": f"http://{storage}/blob?sig=1"}, status=status)
        header = _basic_registry(routes)
        pulled = pull_package(
            f"{host}/aisoc/x:1", insecure_registries=[host, storage], docker_config=config
        )
        assert pulled.layer == b"layer-bytes"
        [seen] = stored.seen
        assert "Authorization" not in seen.headers
    assert routes.requests_to(blob_path)[-1].headers["Authorization"] == header


def test_redirect_to_plain_http_not_listed_is_refused(liar: tuple[str, Routes]) -> None:
    """A redirect to plain HTTP is followed only to a host in the insecure list."""
    host, routes = liar
    serve_package(routes, b"layer")
    with start_liar() as (storage, stored):
        routes[f"/v2/aisoc/x/blobs/{sha(b'layer')}"] = Route(
            b"", {"Location": f"http://{storage}/blob"}, status=302
        )
        error = failure(
            lambda: pull_package(f"{host}/aisoc/x:1", insecure_registries=[host]),
            "oci_insecure_registry",
        )
        assert storage in error.message and stored.seen == []


def test_redirect_loop_is_cut(liar: tuple[str, Routes]) -> None:
    """At most 5 redirects, then `oci_registry_error`."""
    host, routes = liar
    serve_package(routes, b"layer")
    routes["/v2/aisoc/x/manifests/1"] = Route(
        b"", {"Location": "/v2/aisoc/x/manifests/1"}, status=307
    )
    error = failure(lambda: pull(host, "aisoc/x:1"), "oci_registry_error")
    assert "redirected more than 5 times" in error.message
    assert len(routes.requests_to("/v2/aisoc/x/manifests/1")) == 6


def test_challenge_from_a_redirect_target_is_not_answered(
    liar: tuple[str, Routes], tmp_path: Path
) -> None:
    """Only the registry's own 401 is answered: storage elsewhere never sees our credentials."""
    host, routes = liar
    serve_package(routes, b"layer")
    config = write_docker_config(tmp_path / "c.json", {host: auth_entry("robot", SECRET)})
    with start_liar() as (storage, stored):
        stored["/blob"] = Route(b"layer", auth="never")
        stored.challenge = f'Bearer realm="http://{storage}/token",service="x"'
        stored["/token"] = Route(json.dumps({"token": "t"}).encode())
        routes[f"/v2/aisoc/x/blobs/{sha(b'layer')}"] = Route(
            b"", {"Location": f"http://{storage}/blob"}, status=307
        )
        failure(
            lambda: pull_package(
                f"{host}/aisoc/x:1", insecure_registries=[host, storage], docker_config=config
            ),
            "oci_unauthorized",
        )
        assert stored.requests_to("/token") == []
        assert all("Authorization" not in s.headers for s in stored.seen)


def test_put_is_never_redirected(liar: tuple[str, Routes], tmp_path: Path) -> None:
    """A redirect answering a PUT is an error; the body is not sent anywhere else."""
    host, routes = liar
    file = package(tmp_path)
    with start_liar() as (elsewhere, other):
        routes["/v2/aisoc/x/blobs/uploads/"] = Route(
            b"", {"Location": "/v2/aisoc/x/blobs/uploads/u"}, status=202
        )
        routes["/v2/aisoc/x/blobs/uploads/u"] = Route(
            b"", {"Location": f"http://{elsewhere}/upload"}, status=307
        )
        error = failure(
            lambda: push_package(file, f"{host}/aisoc/x:1", insecure_registries=[host, elsewhere]),
            "oci_registry_error",
        )
        assert "uploading blob" in error.message and "HTTP 307" in error.message
        assert other.seen == []


# ---- token auth ----------------------------------------------------------------------------


def _bearer_registry(routes: Routes, host: str, token: str = "tok-123") -> None:
    for route in routes.values():
        route.auth = f"Bearer {token}"
    routes.challenge = (
        f'Bearer realm="http://{host}/token",service="liar",scope="repository:aisoc/x:pull"'
    )


def test_token_is_bought_with_basic_credentials(liar: tuple[str, Routes], tmp_path: Path) -> None:
    """The realm gets our Basic credentials, the service and a pull scope; the token works."""
    host, routes = liar
    serve_package(routes, b"layer")
    _bearer_registry(routes, host)
    routes["/token"] = Route(
        json.dumps({"token": "tok-123", "expires_in": 300}).encode(),
        auth=f"Basic {basic_secret('robot', SECRET)}",
    )
    config = write_docker_config(tmp_path / "c.json", {host: auth_entry("robot", SECRET)})
    assert pull(host, "aisoc/x:1", docker_config=config).layer == b"layer"
    [asked] = routes.requests_to("/token")
    query = parse_qs(urlsplit(asked.path).query)
    assert query == {"service": ["liar"], "scope": ["repository:aisoc/x:pull"]}


def test_identity_token_is_exchanged_with_an_oauth_post(
    liar: tuple[str, Routes], tmp_path: Path
) -> None:
    """`identitytoken` (a refresh token): POST grant_type=refresh_token to the realm."""
    host, routes = liar
    serve_package(routes, b"layer")
    _bearer_registry(routes, host)
    routes["/token"] = Route(json.dumps({"access_token": "tok-123"}).encode())
    config = write_docker_config(tmp_path / "c.json", {host: {"identitytoken": SECRET}})
    assert pull(host, "aisoc/x:1", docker_config=config).layer == b"layer"
    [asked] = routes.requests_to("/token")
    assert asked.method == "POST"
    form = parse_qs(asked.body.decode())
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == [SECRET]
    assert form["scope"] == ["repository:aisoc/x:pull"] and form["service"] == ["liar"]


def test_push_asks_for_pull_and_push(liar: tuple[str, Routes], tmp_path: Path) -> None:
    """A push buys a `pull,push` token and sends it with every request to the registry."""
    host, routes = liar
    routes["/v2/aisoc/x/blobs/uploads/"] = Route(
        b"", {"Location": "/v2/aisoc/x/blobs/uploads/u?_state=a%2Bb"}, status=202
    )
    routes["/v2/aisoc/x/blobs/uploads/u"] = Route(b"", status=201)
    routes["/v2/aisoc/x/manifests/1"] = Route(b"", status=201)
    _bearer_registry(routes, host)
    routes["/token"] = Route(json.dumps({"token": "tok-123"}).encode())
    push_package(package(tmp_path), f"{host}/aisoc/x:1", insecure_registries=[host])
    [asked] = routes.requests_to("/token")
    assert parse_qs(urlsplit(asked.path).query)["scope"] == ["repository:aisoc/x:pull,push"]
    puts = [s for s in routes.seen if s.method == "PUT"]
    assert len(puts) == 3 and all(s.headers["Authorization"] == "Bearer tok-123" for s in puts)
    assert "_state=a%2Bb&digest=sha256" in puts[0].path


def test_wrong_password_at_the_token_server_is_never_shown(
    liar: tuple[str, Routes], tmp_path: Path
) -> None:
    """The realm refuses us: `oci_unauthorized` naming the config, without the password."""
    host, routes = liar
    serve_package(routes, b"layer")
    _bearer_registry(routes, host)
    routes["/token"] = Route(b'{"details": "bad"}', auth="Basic something-else")
    config = write_docker_config(tmp_path / "c.json", {host: auth_entry("robot", SECRET)})
    error = failure(lambda: pull(host, "aisoc/x:1", docker_config=config), "oci_unauthorized")
    assert "token server" in error.message and str(config) in error.message
    assert_hidden(error, SECRET, basic_secret("robot", SECRET))


@pytest.mark.parametrize("status", [401, 500])
def test_registry_echoing_a_secret_is_redacted(
    liar: tuple[str, Routes], tmp_path: Path, status: int
) -> None:
    """An error body quoting our credentials or token is shown with them redacted."""
    host, routes = liar
    echo = f"got Basic {basic_secret('robot', SECRET)} and Bearer tok-echoed, pw {SECRET}"
    body = json.dumps({"errors": [{"code": "DENIED", "message": echo}]}).encode()
    routes["/v2/aisoc/x/manifests/1"] = Route(body, status=status)
    _bearer_registry(routes, host, token="tok-echoed")
    routes["/token"] = Route(json.dumps({"token": "tok-echoed"}).encode())
    config = write_docker_config(tmp_path / "c.json", {host: auth_entry("robot", SECRET)})
    code = "oci_unauthorized" if status == 401 else "oci_registry_error"
    error = failure(lambda: pull(host, "aisoc/x:1", docker_config=config), code)
    assert "[redacted]" in error.message and "DENIED" in error.message
    assert_hidden(error, SECRET, basic_secret("robot", SECRET), "tok-echoed")


@pytest.mark.parametrize(
    "answer",
    [
        b"{}",
        b"not json",
        json.dumps({"token": "two words"}).encode(),
        json.dumps({"token": "a\r\nX-Injected: 1"}).encode(),
        json.dumps({"token": 5}).encode(),
    ],
)
def test_unusable_token_answer_is_a_registry_error(liar: tuple[str, Routes], answer: bytes) -> None:
    """A token answer without a header-safe token is refused before it is used."""
    host, routes = liar
    serve_package(routes, b"layer")
    _bearer_registry(routes, host)
    routes["/token"] = Route(answer)
    error = failure(lambda: pull(host, "aisoc/x:1"), "oci_registry_error")
    assert "usable token" in error.message


def test_token_realm_on_plain_http_not_listed_is_refused(liar: tuple[str, Routes]) -> None:
    """The realm obeys the insecure list like every other URL."""
    host, routes = liar
    serve_package(routes, b"layer")
    with start_liar() as (realm_host, realm):
        _bearer_registry(routes, realm_host)
        realm["/token"] = Route(json.dumps({"token": "tok-123"}).encode())
        failure(lambda: pull(host, "aisoc/x:1"), "oci_insecure_registry")
        assert realm.seen == []


def test_token_answer_is_capped(liar: tuple[str, Routes]) -> None:
    """A token server that sends megabytes is cut off."""
    host, routes = liar
    serve_package(routes, b"layer")
    _bearer_registry(routes, host)
    routes["/token"] = Route(b" " * (1 * MIB), length=False)
    failure(lambda: pull(host, "aisoc/x:1"), "oci_too_large")


def test_manifest_over_the_default_cap_is_refused_unread(liar: tuple[str, Routes]) -> None:
    """A manifest declaring more than 4 MiB is refused on its Content-Length."""
    host, routes = liar
    routes["/v2/aisoc/x/manifests/1"] = Route(b"{" + b" " * (4 * MIB) + b"}")
    error = failure(lambda: pull(host, "aisoc/x:1", limits=Limits()), "oci_too_large")
    assert f"the limit is {4 * MIB}" in error.message
