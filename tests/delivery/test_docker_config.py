"""Docker config lookup: where the file is, which entry matches, what is refused."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.delivery.docker_config import (
    Credentials,
    credentials_for,
    docker_config_path,
    find_credentials,
)
from aisoc_plugind.errors import OciError

SOURCE = Path("/cfg/config.json")
HOST = "reg.example:5000"


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("explicit", "environ", "expected"),
    [
        (Path("/x.json"), {"DOCKER_CONFIG": "/d", "HOME": "/h"}, "/x.json"),
        (None, {"DOCKER_CONFIG": "/d", "HOME": "/h"}, "/d/config.json"),
        (None, {"DOCKER_CONFIG": "", "HOME": "/h"}, "/h/.docker/config.json"),
        (None, {"HOME": "/h"}, "/h/.docker/config.json"),
    ],
)
def test_docker_config_path(explicit: Path | None, environ: dict[str, str], expected: str) -> None:
    """The setting, then `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`."""
    assert docker_config_path(explicit, environ) == Path(expected)


@pytest.mark.parametrize(
    ("key", "entry", "expected"),
    [
        (HOST, {"auth": auth("u", "p:w")}, ("u", "p:w", "")),
        (f"https://{HOST}", {"auth": auth("u", "p")}, ("u", "p", "")),
        (f"http://{HOST}/v2/", {"username": "u", "password": "p"}, ("u", "p", "")),
        (HOST.upper(), {"auth": auth("u", "p")}, ("u", "p", "")),
        (HOST, {"identitytoken": "tok"}, ("", "", "tok")),
        (HOST, {"auth": auth("u", "p"), "identitytoken": "tok"}, ("u", "p", "tok")),
        (HOST, {}, None),
        ("other.example:5000", {"auth": auth("u", "p")}, None),
        (f"{HOST}0", {"auth": auth("u", "p")}, None),
    ],
)
def test_credentials_for_matches_entries(
    key: str, entry: dict[str, Any], expected: tuple[str, str, str] | None
) -> None:
    """Keys match with or without scheme and path; `auth` is base64 of `user:password`."""
    found = credentials_for({"auths": {key: entry}}, HOST, SOURCE)
    got = (found.username, found.password, found.identity_token) if found else None
    assert got == expected


def test_exact_key_wins_over_a_normalised_one() -> None:
    """`host:port` as written beats `https://host:port`, whatever the file order."""
    doc = {"auths": {f"https://{HOST}": {"auth": auth("a", "1")}, HOST: {"auth": auth("b", "2")}}}
    found = credentials_for(doc, HOST, SOURCE)
    assert found is not None and found.username == "b"


@pytest.mark.parametrize(
    "doc",
    [
        {"credsStore": "desktop", "auths": {HOST: {}}},
        {"credHelpers": {HOST: "ecr-login"}},
        {
            "credHelpers": {f"https://{HOST}": "ecr-login"},
            "auths": {HOST: {"auth": auth("u", "p")}},
        },
    ],
)
def test_helpers_are_refused(doc: dict[str, Any]) -> None:
    """A helper holding the registry's secret is `oci_credentials_unsupported`."""
    with pytest.raises(OciError) as caught:
        credentials_for(doc, HOST, SOURCE)
    assert caught.value.code == "oci_credentials_unsupported"
    assert "oci.docker_config" in caught.value.message and str(SOURCE) in caught.value.message


def test_creds_store_without_an_entry_is_anonymous() -> None:
    """With a credsStore but no entry for the registry, nothing was stored for it."""
    assert credentials_for({"credsStore": "desktop", "auths": {}}, HOST, SOURCE) is None


def test_inline_credentials_beat_a_creds_store() -> None:
    """An entry that holds its credentials is used; the store is never asked."""
    doc = {"credsStore": "desktop", "auths": {HOST: {"auth": auth("u", "p")}}}
    assert credentials_for(doc, HOST, SOURCE) is not None


@pytest.mark.parametrize(
    "entry",
    [
        {"auth": "%%%not base64"},
        {"auth": base64.b64encode(b"no-colon").decode()},
        {"auth": base64.b64encode(b"\xff\xfe:x").decode()},
        {"username": 5},
        "a string",
    ],
)
def test_malformed_entries_are_invalid_and_not_quoted(entry: Any) -> None:
    """A broken entry is `oci_credentials_invalid`, its value never in the message."""
    with pytest.raises(OciError) as caught:
        credentials_for({"auths": {HOST: entry}}, HOST, SOURCE)
    assert caught.value.code == "oci_credentials_invalid"
    if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
        assert entry["auth"] not in caught.value.message


def test_credentials_repr_and_secrets() -> None:
    """The repr names only the source; `secrets()` lists every form to redact."""
    creds = Credentials(source=SOURCE, username="u", password="p4ss", identity_token="tok")
    assert repr(creds) == f"Credentials(source={SOURCE!r})"
    assert set(creds.secrets()) == {"p4ss", "tok", auth("u", "p4ss")}


def test_find_credentials_reads_the_file(tmp_path: Path) -> None:
    """A missing default file is anonymous; a named one must exist; links are followed."""
    config = tmp_path / "real.json"
    assert find_credentials(HOST, config) is None
    with pytest.raises(OciError) as caught:
        find_credentials(HOST, config, required=True)
    assert caught.value.code == "oci_credentials_invalid"
    config.write_text(json.dumps({"auths": {HOST: {"auth": auth("u", "p")}}}))
    link = tmp_path / "config.json"
    link.symlink_to(config)
    found = find_credentials(HOST, link, required=True)
    assert found is not None and (found.username, found.source) == ("u", link)


@pytest.mark.parametrize("text", ["[]", "{", "\xff"])
def test_find_credentials_refuses_a_broken_file(tmp_path: Path, text: str) -> None:
    """Not a JSON object: `oci_credentials_invalid`."""
    config = tmp_path / "config.json"
    config.write_bytes(text.encode("latin-1"))
    with pytest.raises(OciError) as caught:
        find_credentials(HOST, config)
    assert caught.value.code == "oci_credentials_invalid"


def test_find_credentials_refuses_a_directory(tmp_path: Path) -> None:
    """A directory where the file should be is named in the error."""
    with pytest.raises(OciError) as caught:
        find_credentials(HOST, tmp_path)
    assert caught.value.code == "oci_credentials_invalid"
    assert str(tmp_path) in caught.value.message
