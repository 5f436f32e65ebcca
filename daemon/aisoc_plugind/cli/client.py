"""Run `aisoc plugins ...`: the operator's client of the control API (INTERFACE §6).

Blocking `http.client` on purpose: one request per command, no event loop, and unix-socket
addresses (`unix:/run/aisoc-plugind/api.sock`) work with a three-line connection class.
The API address comes from `--api`, else `AISOC_API`, else `http://127.0.0.1:8470`; the
token from `--token`, else `AISOC_TOKEN` (prefer the variable: arguments show in `ps`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_API = "http://127.0.0.1:8470"
PREFIX = "/api/v1/plugins"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ClientError(Exception):
    """The request failed; the message is what the operator sees."""


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where the API is and how to authenticate."""

    api: str
    token: str | None
    timeout: float
    cacert: str | None = None

    def connect(self) -> http.client.HTTPConnection:
        """Return a connection to the API (not yet connected)."""
        if self.api.startswith("unix:"):
            return _UnixConnection(self.api[5:], self.timeout)
        parts = urlsplit(self.api)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"invalid API address {self.api!r}: use http://HOST:PORT, "
                             "https://HOST:PORT or unix:/path.sock")
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.cacert)
            return http.client.HTTPSConnection(parts.netloc, timeout=self.timeout,
                                               context=context)
        return http.client.HTTPConnection(parts.netloc, timeout=self.timeout)

    def base_path(self) -> str:
        """Return the path prefix of an `http(s)://host/prefix` address."""
        return "" if self.api.startswith("unix:") else urlsplit(self.api).path.rstrip("/")


def request(endpoint: Endpoint, method: str, path: str, body: Any = None
            ) -> tuple[int, Any]:
    """Send one request; return (status, decoded JSON body or None); raise ClientError."""
    headers = {"Accept": "application/json"}
    if endpoint.token:
        headers["Authorization"] = f"Bearer {endpoint.token}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn = endpoint.connect()
    try:
        conn.request(method, endpoint.base_path() + path, body=data, headers=headers)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(f"cannot reach the API at {endpoint.api}: {exc}") from exc
    finally:
        conn.close()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError as exc:
        raise ClientError(f"the API answered {status} with a body that is not JSON") from exc


def _check(endpoint: Endpoint, status: int, doc: Any) -> Any:
    if status < 400:
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = str(message) if message else f"the API answered HTTP {status}"
    if status == 401 and not endpoint.token:
        text += " (set AISOC_TOKEN or pass --token)"
    raise ClientError(text)


def call(endpoint: Endpoint, method: str, path: str, body: Any = None) -> Any:
    """Send one request and return its JSON body; raise ClientError on any failure."""
    status, doc = request(endpoint, method, path, body)
    return _check(endpoint, status, doc)


# ---- rendering -----------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def _error_code(record: dict[str, Any]) -> str:
    error = record.get("error")
    return str(error.get("code", "")) if isinstance(error, dict) else ""


def render_list(doc: dict[str, Any]) -> str:
    """Return the plugin list as a table."""
    rows = [("ID", "VERSION", "TYPE", "STATE", "SIGNATURE", "KEY", "ERROR")]
    rows += [(str(r.get("id")), str(r.get("version")), str(r.get("plugin_type")),
              str(r.get("state")), str(r.get("signature_status") or "-"),
              str(r.get("signing_key_id") or "-"), _error_code(r) or "-")
             for r in doc.get("plugins", [])]
    return _table(rows) if len(rows) > 1 else "no plugins"


def render_record(doc: dict[str, Any]) -> str:
    """Return one plugin record as `key: value` lines."""
    lines = []
    for key, value in doc.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) \
            else "-" if value is None else str(value)
        lines.append(f"{key + ':':<18}{shown}")
    return "\n".join(lines)


def render_discover(doc: dict[str, Any]) -> str:
    """Return what a discovery pass did."""
    found = doc.get("discovered") or []
    lines = [f"discovered: {', '.join(found) if found else 'nothing new'}"]
    lines += [f"failed: {f.get('path')}: {f.get('error')}" for f in doc.get("failed") or []]
    return "\n".join(lines)


def render_state(doc: dict[str, Any]) -> str:
    """Return a one-line summary of a record after enable/disable/reload."""
    return f"{doc.get('id')} {doc.get('version')}: {doc.get('state')}"


def render_run(doc: dict[str, Any]) -> str:
    """Return a run's result as indented JSON."""
    return json.dumps(doc.get("result"), indent=2, ensure_ascii=False)


def render_install(doc: dict[str, Any]) -> str:
    """Return a one-line summary of an install."""
    return f"installed {doc.get('plugin_id')} from {doc.get('oci_ref')} ({doc.get('digest')})"


# ---- commands ------------------------------------------------------------------------------


def _pid(args: argparse.Namespace) -> str:
    return quote(args.id, safe="")


def _json_object(text: str | None, name: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"--{name} must be a JSON object")
    return value


def _list(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    query = {k: v for k, v in (("plugin_type", args.type), ("state", args.state)) if v}
    path = PREFIX + (f"?{urlencode(query)}" if query else "")
    return call(ep, "GET", path), render_list


def _show(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return call(ep, "GET", f"{PREFIX}/{_pid(args)}"), render_record


def _discover(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return call(ep, "POST", f"{PREFIX}/discover"), render_discover


def _switch(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return call(ep, "POST", f"{PREFIX}/{_pid(args)}/{args.command}"), render_state


def _unload(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    call(ep, "DELETE", f"{PREFIX}/{_pid(args)}")
    return {"id": args.id, "state": "unloaded"}, lambda _: f"{args.id}: unloaded"


def _run(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    body: dict[str, Any] = {}
    for name in ("payload", "context"):
        value = _json_object(getattr(args, name), name)
        if value is not None:
            body[name] = value
    return call(ep, "POST", f"{PREFIX}/{_pid(args)}/run", body), render_run


def _install(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    doc = call(ep, "POST", f"{PREFIX}/install_from_oci", {"oci_ref": args.oci_ref})
    return doc, render_install


_COMMANDS = {"list": _list, "show": _show, "discover": _discover, "enable": _switch,
             "disable": _switch, "reload": _switch, "unload": _unload, "run": _run,
             "install": _install}


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--api", default=default,
                        help=f"API address (default: $AISOC_API or {DEFAULT_API}; "
                             "unix:/path.sock works)")
    parser.add_argument("--token", default=default,
                        help="bearer token (default: $AISOC_TOKEN; prefer the variable)")
    parser.add_argument("--cacert", default=default, help="CA bundle for an https API")
    parser.add_argument("--timeout", type=float, default=default,
                        help="seconds to wait for the API (default 60)")
    parser.add_argument("--json", action="store_true", default=default,
                        help="print the API's JSON instead of a table")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aisoc plugins",
                                     description="Operate the plugins of aisoc-plugind.")
    _common(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        _common(p, argparse.SUPPRESS)  # options work after the command too
        return p

    listing = add("list", "list plugins")
    listing.add_argument("--type", help="only this plugin_type")
    listing.add_argument("--state", help="only this state")
    add("discover", "scan the plugins directory now")
    for name, text in (("show", "show one plugin"), ("enable", "enable a plugin"),
                       ("disable", "disable a plugin"), ("reload", "reload a plugin from disk"),
                       ("unload", "unload a plugin (files stay on disk)")):
        add(name, text).add_argument("id", help="plugin id")
    run = add("run", "run a plugin")
    run.add_argument("id", help="plugin id")
    run.add_argument("--payload", help="JSON object handed to the plugin")
    run.add_argument("--context", help="JSON object handed to the plugin")
    add("install", "install a signed plugin from an OCI registry").add_argument(
        "oci_ref", help="e.g. registry.example.org/plugins/geoip:1.2.0")
    return parser


def _endpoint(args: argparse.Namespace) -> Endpoint:
    return Endpoint(api=args.api or os.environ.get("AISOC_API") or DEFAULT_API,
                    token=args.token or os.environ.get("AISOC_TOKEN") or None,
                    timeout=args.timeout or 60.0, cacert=args.cacert)


def client_main(argv: Sequence[str]) -> int:
    """Run `aisoc plugins <command>`; argv starts at the command. Return 0, 1 or 2."""
    argv = list(argv)[1:] if list(argv)[:1] == ["plugins"] else list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        doc, render = _COMMANDS[args.command](_endpoint(args), args)
    except UsageError as exc:
        print(f"aisoc plugins: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        print(f"aisoc plugins: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else render(doc))
    return EXIT_OK
