"""Run `aisoc plugins ...`: the operator's client of the control API (INTERFACE §6).

The API address comes from `--api`, else `AISOC_API`, else `http://127.0.0.1:8470`; the
token from `--token`, else `AISOC_TOKEN` (prefer the variable: arguments show in `ps`).
Tables by default, `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from aisoc_plugind.cli.client import DEFAULT_API, Endpoint, call
from aisoc_plugind.cli.tree import Command, UsageError

__all__ = [
    "OPERATOR_COMMANDS",
    "common_options",
    "render_discover",
    "render_install",
    "render_list",
    "render_record",
    "render_run",
    "render_state",
]

PREFIX = "/api/v1/plugins"
_PROG = "aisoc plugins"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _error_code(record: dict[str, Any]) -> str:
    error = record.get("error")
    return str(error.get("code", "")) if isinstance(error, dict) else ""


def render_list(doc: dict[str, Any]) -> str:
    """Return the plugin list as a table."""
    rows = [("ID", "VERSION", "TYPE", "STATE", "SIGNATURE", "KEY", "ERROR")]
    rows += [
        (
            str(r.get("id")),
            str(r.get("version")),
            str(r.get("plugin_type")),
            str(r.get("state")),
            str(r.get("signature_status") or "-"),
            str(r.get("signing_key_id") or "-"),
            _error_code(r) or "-",
        )
        for r in doc.get("plugins", [])
    ]
    return _table(rows) if len(rows) > 1 else "no plugins"


def render_record(doc: dict[str, Any]) -> str:
    """Return one plugin record as `key: value` lines."""
    lines = []
    for key, value in doc.items():
        shown = (
            json.dumps(value, ensure_ascii=False)
            if isinstance(value, dict | list)
            else "-"
            if value is None
            else str(value)
        )
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


def _reload(ep: Endpoint, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    body = {"allow_downgrade": True} if args.allow_downgrade else None
    return call(ep, "POST", f"{PREFIX}/{_pid(args)}/reload", body), render_state


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
    body: dict[str, Any] = {"oci_ref": args.oci_ref}
    if args.replace:
        body["replace"] = True
    doc = call(ep, "POST", f"{PREFIX}/install_from_oci", body)
    return doc, render_install


def _endpoint(args: argparse.Namespace) -> Endpoint:
    """Return where the API is and how to authenticate, from options and environment."""
    return Endpoint(
        api=args.api or os.environ.get("AISOC_API") or DEFAULT_API,
        token=args.token or os.environ.get("AISOC_TOKEN") or None,
        timeout=args.timeout or 60.0,
        cacert=args.cacert,
    )


def _command(
    fetch: Callable[[Endpoint, argparse.Namespace], tuple[Any, Callable[[Any], str]]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        doc, render = fetch(_endpoint(args), args)
        print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else render(doc))
        return 0

    return run


def common_options(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """Add the connection options; with SUPPRESS (on a subcommand) they may follow it too."""
    parser.add_argument(
        "--api",
        default=default,
        help=f"API address (default: $AISOC_API or {DEFAULT_API}; unix:/path.sock works)",
    )
    parser.add_argument(
        "--token", default=default, help="bearer token (default: $AISOC_TOKEN; prefer the variable)"
    )
    parser.add_argument("--cacert", default=default, help="CA bundle for an https API")
    parser.add_argument(
        "--timeout", type=float, default=default, help="seconds to wait for the API (default 60)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print the API's JSON instead of a table",
    )


def _plugin_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="plugin id")


def _args_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--type", help="only this plugin_type")
    p.add_argument("--state", help="only this state")


def _args_run(p: argparse.ArgumentParser) -> None:
    _plugin_id(p)
    p.add_argument("--payload", help="JSON object handed to the plugin")
    p.add_argument("--context", help="JSON object handed to the plugin")


def _args_reload(p: argparse.ArgumentParser) -> None:
    _plugin_id(p)
    p.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="allow a lower version (or one that is not semantic versioning): the rollback",
    )


def _args_install(p: argparse.ArgumentParser) -> None:
    p.add_argument("oci_ref", help="e.g. registry.example.org/plugins/geoip@sha256:<digest>")
    p.add_argument(
        "--replace",
        action="store_true",
        help="upgrade an installed id in place (old version kept in .previous/)",
    )


def _op(
    name: str,
    text: str,
    fetch: Callable[[Endpoint, argparse.Namespace], tuple[Any, Callable[[Any], str]]],
    arguments: Callable[[argparse.ArgumentParser], None] = _plugin_id,
) -> Command:
    return Command(
        name=name, help=text, run=_command(fetch), arguments=arguments, error_prefix=_PROG
    )


def _no_args(p: argparse.ArgumentParser) -> None:
    """The command takes no arguments besides the connection options."""


OPERATOR_COMMANDS: tuple[Command, ...] = (
    _op("list", "list plugins", _list, _args_list),
    _op("show", "show one plugin", _show),
    _op("discover", "scan the plugins directory now", _discover, _no_args),
    _op("enable", "enable a plugin", _switch),
    _op("disable", "disable a plugin", _switch),
    _op("reload", "reload a plugin from disk", _reload, _args_reload),
    _op("unload", "unload a plugin (files stay on disk)", _unload),
    _op("run", "run a plugin", _run, _args_run),
    _op("install", "install a signed plugin from an OCI registry", _install, _args_install),
)
