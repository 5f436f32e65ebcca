"""Run `aisoc-plugind run` and `check-config`: settings in, a daemon or a report out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from aisoc_plugind.api.listen import check_listen, tls_context
from aisoc_plugind.cli.tree import EXIT_FAILED, EXIT_OK, Command
from aisoc_plugind.config.preflight import preflight
from aisoc_plugind.config.settings import Settings, load_settings
from aisoc_plugind.errors import ConfigError

if TYPE_CHECKING:
    from aisoc_plugind.service.daemon import Service

__all__ = ["DAEMON_COMMANDS"]

_PROG = "aisoc-plugind"


def _settings(args: argparse.Namespace) -> Settings:
    config: Path | None = args.config
    return load_settings(config)


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    check_listen(settings)
    print(json.dumps(settings.public_view(), indent=2, sort_keys=True))
    for warning in preflight(settings):
        print(f"warning: {warning.code}: {warning.message}", file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from aisoc_plugind.service.components import default_components
    from aisoc_plugind.service.daemon import Service  # one-shots need no aiohttp

    settings = _settings(args)
    check_listen(settings)
    tls_context(settings)
    service = Service(settings, components=default_components())
    try:
        failures = _serve(service)
    except KeyboardInterrupt:
        return EXIT_OK
    for text in failures:
        print(f"{_PROG}: error: {text}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def _serve(service: Service) -> list[str]:
    """Run the service; return the messages of the errors that ended it at bind time."""
    failures: list[str] = []
    try:
        anyio.run(service.run)
    except* (ConfigError, OSError) as group:
        # Errors at bind time (port or socket in use, unreadable TLS key) end the daemon.
        failures = [
            exc.message if isinstance(exc, ConfigError) else str(exc) for exc in group.exceptions
        ]
    return failures


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, help="TOML config file (default: built-in defaults + environment)"
    )


DAEMON_COMMANDS: tuple[Command, ...] = (
    Command(
        name="run",
        help="run the daemon in the foreground (for systemd)",
        run=_run,
        arguments=_config_option,
        error_prefix=_PROG,
        example="  aisoc-plugind run --config /etc/aisoc-plugind/config.toml",
    ),
    Command(
        name="check-config",
        help="validate the config, print the effective settings",
        run=_check_config,
        arguments=_config_option,
        error_prefix=_PROG,
        example="  aisoc-plugind check-config --config config.toml",
    ),
)
