"""Find a registry's credentials in a Docker config file: inline `auths` only, no helpers."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aisoc_plugind.errors import OciError
from aisoc_plugind.files import FileRefused, read_regular

__all__ = ["Credentials", "credentials_for", "docker_config_path", "find_credentials"]

_CONFIG_CAP = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What a Docker config holds for one registry; no secret ever shows in the repr."""

    source: Path
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def secrets(self) -> tuple[str, ...]:
        """Return every form a secret of these credentials could take in text."""
        basic = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        found = (self.password, self.identity_token, basic if self.password else "")
        return tuple(s for s in found if s)


def docker_config_path(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """Return the Docker config file to read, resolved as the Docker CLI does.

    `explicit` (a setting or an option), else `$DOCKER_CONFIG/config.json`, else
    `~/.docker/config.json`; None when there is no home directory to look in.
    """
    if explicit is not None:
        return explicit
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".docker" / "config.json" if home.startswith("/") else None


def find_credentials(
    registry: str, path: Path | None, *, required: bool = False
) -> Credentials | None:
    """Return the credentials `path` holds for `registry`, None when it holds none.

    A missing file means anonymous access unless `required` (an explicitly configured file).
    Raises OciError `oci_credentials_invalid` for a file that cannot be used and
    `oci_credentials_unsupported` when a credential helper holds the registry's secret.
    """
    if path is None:
        return None
    doc = _read_config(path, required=required)
    return None if doc is None else credentials_for(doc, registry, path)


def _read_config(path: Path, *, required: bool) -> dict[str, Any] | None:
    try:
        # Resolved first: mounted secrets (Kubernetes, systemd credentials) are symlinks.
        raw = read_regular(path.resolve(), cap=_CONFIG_CAP)
    except FileNotFoundError as exc:
        if required:
            raise _invalid(path, "does not exist") from exc
        return None
    except FileRefused as exc:
        raise _invalid(path, exc.detail) from exc
    except OSError as exc:
        raise _invalid(path, f"cannot be read ({exc.strerror})") from exc
    try:
        doc = json.loads(raw)
    except ValueError:
        # No `from exc`: a decoding error quotes the text around the fault, which is a secret.
        raise _invalid(path, "is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _invalid(path, "is not a JSON object")
    return doc


def credentials_for(doc: Mapping[str, Any], registry: str, source: Path) -> Credentials | None:
    """Return the inline credentials a parsed Docker config holds for `registry` (pure).

    Keys of `auths` and `credHelpers` match with or without a scheme or a path, as Docker
    reads them. A credential helper is never run: when one holds the registry's secret
    (`credHelpers`, or `credsStore` with an empty `auths` entry as `docker login` leaves it),
    this raises `oci_credentials_unsupported`.
    """
    helper = _entry(doc.get("credHelpers"), registry)
    if helper is not None:
        raise _unsupported(source, registry, f"credHelpers names helper {str(helper)[:40]!r}")
    entry = _entry(doc.get("auths"), registry)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise _invalid(source, f"has an auths entry for {registry} that is not an object")
    credentials = _inline(entry, registry, source)
    store = doc.get("credsStore")
    if credentials is None and store:
        raise _unsupported(source, registry, f"credsStore {str(store)[:40]!r} holds them")
    return credentials


def _entry(table: Any, registry: str) -> Any:
    if not isinstance(table, dict):
        return None
    if registry in table:
        return table[registry]
    for key, value in table.items():
        if isinstance(key, str) and _hostname(key) == registry.lower():
            return value
    return None


def _hostname(key: str) -> str:
    """Reduce a Docker config key to `host[:port]`, as Docker's ConvertToHostname does."""
    for scheme in ("http://", "https://"):
        key = key.removeprefix(scheme)
    return key.split("/", 1)[0].lower()


def _inline(entry: Mapping[str, Any], registry: str, source: Path) -> Credentials | None:
    fields = {name: entry.get(name) or "" for name in ("auth", "username", "password")}
    token = entry.get("identitytoken") or ""
    if not all(isinstance(v, str) for v in (*fields.values(), token)):
        raise _invalid(source, f"has a non-string value in the auths entry for {registry}")
    username, password = fields["username"], fields["password"]
    if fields["auth"]:
        username, password = _decode_auth(fields["auth"], registry, source)
    if not (username or token):
        return None
    return Credentials(source=source, username=username, password=password, identity_token=token)


def _decode_auth(value: str, registry: str, source: Path) -> tuple[str, str]:
    try:
        text = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        text = ""
    username, colon, password = text.partition(":")
    if not (username and colon):
        raise _invalid(
            source, f"has an auths entry for {registry} whose auth is not base64 of user:password"
        )
    return username, password


def _invalid(source: Path, why: str) -> OciError:
    return OciError(
        f"the Docker config {source} {why}; fix it, or name another file with "
        "oci.docker_config (aisoc plugin push: --docker-config)",
        code="oci_credentials_invalid",
    )


def _unsupported(source: Path, registry: str, how: str) -> OciError:
    return OciError(
        f"the Docker config {source} keeps the credentials for {registry} in a credential "
        f"helper ({how}); helpers are not run: write them inline (auths.{registry}.auth) in a "
        "Docker config of their own and name it with oci.docker_config "
        "(aisoc plugin push: --docker-config)",
        code="oci_credentials_unsupported",
    )
