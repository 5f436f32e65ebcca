"""Turn argv into settings and a running service or a one-shot command; the only place that exits.

`aisoc-plugind run|check-config|token ...` and `aisoc plugin ...|plugins ...`.
Exit codes: 0 success, 1 the operation failed (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from aisoc_plugind import __version__
from aisoc_plugind.config.settings import Settings, load_settings, preflight
from aisoc_plugind.errors import ConfigError

if TYPE_CHECKING:
    from aisoc_plugind.service.daemon import Component, Service

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aisoc-plugind",
        description="AiSOC plugin lifecycle daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  aisoc-plugind run --config /etc/aisoc-plugind/config.toml\n"
               "  aisoc-plugind check-config --config config.toml\n"
               "  aisoc-plugind token create --tokens-file tokens.toml --name ops "
               "--permissions plugins:read",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground (for systemd)")
    run.add_argument("--config", type=Path, help="TOML config file (default: built-ins + env)")
    check = sub.add_parser("check-config", help="validate config, print effective settings")
    check.add_argument("--config", type=Path, help="TOML config file")
    sub.add_parser("token", help="create, list or revoke API tokens", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `aisoc-plugind`."""
    sys.exit(run_plugind(sys.argv[1:] if argv is None else list(argv)))


def run_plugind(argv: list[str]) -> int:
    """Run `aisoc-plugind` with `argv`; return the exit code."""
    if argv[:1] == ["token"]:
        return _token(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"aisoc-plugind: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "check-config":
        return _check_config(settings)
    return _run(settings)


def _check_config(settings: Settings) -> int:
    from aisoc_plugind.api.app import check_listen

    try:
        check_listen(settings)
    except ConfigError as exc:
        print(f"aisoc-plugind: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(settings.public_view(), indent=2, sort_keys=True))
    for warning in preflight(settings):
        print(f"warning: {warning.code}: {warning.message}", file=sys.stderr)
    return EXIT_OK


def _run(settings: Settings) -> int:
    from aisoc_plugind.api.app import check_listen, tls_context
    from aisoc_plugind.service.daemon import (
        Service,  # the service pulls in aiohttp; one-shots need not
    )

    try:
        check_listen(settings)
        tls_context(settings)
    except ConfigError as exc:
        print(f"aisoc-plugind: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    service = Service(settings, components=default_components())
    try:
        return _serve(service)
    except KeyboardInterrupt:
        return EXIT_OK


def _serve(service: Service) -> int:
    failures: list[str] = []
    try:
        anyio.run(service.run)
    except* (ConfigError, OSError) as group:
        # Errors at bind time (port or socket in use, unreadable TLS key) end the daemon.
        failures = [exc.message if isinstance(exc, ConfigError) else str(exc)
                    for exc in group.exceptions]
    for text in failures:
        print(f"aisoc-plugind: error: {text}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def default_components() -> list[Component]:
    """Return the service components of a production daemon, in start order.

    sd_notify comes last: it stops first (STOPPING=1 as shutdown begins) and its SIGHUP hook
    (READY=1) runs after the API has re-read the tokens.
    """
    from aisoc_plugind.api.app import api_component
    from aisoc_plugind.service.sdnotify import sdnotify_component
    from aisoc_plugind.service.watcher import watcher_component

    return [api_component, watcher_component, sdnotify_component]


def _token(argv: list[str]) -> int:
    from aisoc_plugind.api.tokens import token_main

    return token_main(argv)


def aisoc_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `aisoc` (authoring `plugin ...` and operator `plugins ...`)."""
    sys.exit(run_aisoc(sys.argv[1:] if argv is None else list(argv)))


def run_aisoc(argv: list[str]) -> int:
    """Dispatch `aisoc plugin ...` to authoring and `aisoc plugins ...` to the client."""
    usage = "usage: aisoc {plugin,plugins} ... (see aisoc plugin --help, aisoc plugins --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "plugins":
        from aisoc_plugind.cli.client import client_main

        return client_main(argv[1:])
    if argv[:2] == ["plugin", "push"]:
        from aisoc_plugind.delivery.oci import push_main

        return push_main(argv[2:])
    if argv[0] == "plugin":
        from aisoc_plugind.authoring.commands import main as authoring_main

        return authoring_main(argv[1:])
    print(f"aisoc: error: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
    return EXIT_USAGE
