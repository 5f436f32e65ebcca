"""Run `aisoc-plugind run` and `check-config`: settings in, a daemon or a report out.

`run` holds SIGTERM, SIGINT and SIGHUP first of all (`service.signals`), so that no signal
ends the process before the service listens for them. A daemon that could not start, or that
found another one running on its configuration, prints one line, `aisoc-plugind: error:
CODE: MESSAGE`, and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from aisoc_plugind.api.listen import check_listen, tls_context
from aisoc_plugind.cli.checkconfig import check_config
from aisoc_plugind.cli.tree import EXIT_FAILED, EXIT_OK, Command
from aisoc_plugind.config.settings import Settings, load_settings
from aisoc_plugind.errors import PluginDError
from aisoc_plugind.service import signals

if TYPE_CHECKING:
    from aisoc_plugind.service.daemon import Service

__all__ = ["DAEMON_COMMANDS"]

_PROG = "aisoc-plugind"


def _settings(args: argparse.Namespace) -> Settings:
    config: Path | None = args.config
    return load_settings(config)


def _run(args: argparse.Namespace) -> int:
    previous = signals.hold()  # first: the entry point did it already, in-process callers not
    try:
        from aisoc_plugind.service.components import default_components
        from aisoc_plugind.service.daemon import Service  # one-shots need no aiohttp

        settings = _settings(args)
        check_listen(settings)
        tls_context(settings)
        return _serve(Service(settings, components=default_components()))
    finally:
        signals.restore(previous)


def _serve(service: Service) -> int:
    """Run the service; return the exit code (a failure is one line on stderr)."""
    try:
        anyio.run(service.run)
    except PluginDError as exc:  # already_running: nothing was touched
        return _failed(exc)
    if service.failure is not None:  # a start (or run) that failed: daemon.stopped says so
        return _failed(service.failure)
    return EXIT_OK


def _failed(exc: PluginDError) -> int:
    print(f"{_PROG}: error: {exc.code}: {' '.join(exc.message.split())}", file=sys.stderr)
    return EXIT_FAILED


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, help="TOML config file (default: built-in defaults + environment)"
    )


def _check_config_options(p: argparse.ArgumentParser) -> None:
    _config_option(p)
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")


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
        run=check_config,
        arguments=_check_config_options,
        error_prefix=_PROG,
        example="  aisoc-plugind check-config --config config.toml",
    ),
)
