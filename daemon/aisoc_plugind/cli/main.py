"""Turn argv into a command of the `aisoc` or `aisoc-plugind` tree; the only place that exits.

    aisoc-plugind  run | check-config | token {create,list,revoke} | audit {verify,keygen}
                   | completion bash
    aisoc          plugin {new,validate,keygen,sign,verify,package,push,pull}
                   plugins {list,show,discover,enable,disable,reload,unload,run,install}
                   | completion bash

Exit codes: 0 success, 1 the operation failed (message on stderr), 2 usage error. Writing to
a closed pipe (`| head`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from aisoc_plugind import __version__
from aisoc_plugind.cli.audit import AUDIT_COMMANDS
from aisoc_plugind.cli.authoring import PLUGIN_COMMANDS
from aisoc_plugind.cli.completion import add_completion
from aisoc_plugind.cli.operator import OPERATOR_COMMANDS, common_options
from aisoc_plugind.cli.plugind import DAEMON_COMMANDS
from aisoc_plugind.cli.tokens import TOKEN_COMMANDS
from aisoc_plugind.cli.tree import Parser, add_command, add_commands, run_parser

__all__ = ["aisoc_main", "aisoc_parser", "main", "plugind_parser", "run_aisoc", "run_plugind"]


def _root(prog: str, description: str, epilog: str) -> Parser:
    parser = Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def plugind_parser() -> Parser:
    """Return the `aisoc-plugind` command tree."""
    parser = _root(
        "aisoc-plugind",
        "AiSOC plugin lifecycle daemon.",
        "examples:\n  aisoc-plugind run --config /etc/aisoc-plugind/config.toml\n"
        "  aisoc-plugind check-config --config config.toml\n"
        "  aisoc-plugind token create --tokens-file tokens.toml --name ops "
        "--permissions plugins:read",
    )
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True, parser_class=Parser)
    for command in DAEMON_COMMANDS:
        add_command(sub, command)
    token = sub.add_parser(
        "token",
        help="create, list or revoke API tokens",
        description="Create, list or revoke control-API tokens.",
    )
    add_commands(token, TOKEN_COMMANDS, dest="action")
    audit = sub.add_parser(
        "audit",
        help="verify audit files, make a checkpoint key",
        description="Check the audit file's hash chain and signed checkpoints; make the "
        "checkpoint key pair.",
    )
    add_commands(audit, AUDIT_COMMANDS, dest="action")
    add_completion(sub, parser)
    return parser


def aisoc_parser() -> Parser:
    """Return the `aisoc` command tree."""
    parser = _root(
        "aisoc",
        "Author and operate AiSOC plugins.",
        "run `aisoc plugin --help` (authoring) or `aisoc plugins --help` (operating a daemon)",
    )
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True, parser_class=Parser)
    plugin = sub.add_parser(
        "plugin",
        help="author plugins: scaffold, check, sign, verify, package, push, pull",
        description="Author AiSOC plugins: scaffold, check, sign, verify, package, push and "
        "pull them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="typical flow: new -> validate -> keygen -> sign -> verify -> package -> push\n"
        "run `aisoc plugin COMMAND --help` for an example of each",
    )
    add_commands(plugin, PLUGIN_COMMANDS)
    plugins = sub.add_parser(
        "plugins",
        help="operate the plugins of a running daemon",
        description="Operate the plugins of aisoc-plugind.",
    )
    common_options(plugins, None)
    add_commands(plugins, OPERATOR_COMMANDS, common=common_options)
    add_completion(sub, parser)
    return parser


def run_plugind(argv: Sequence[str]) -> int:
    """Run `aisoc-plugind ARGV...`; return the exit code."""
    return run_parser(plugind_parser(), argv)


def run_aisoc(argv: Sequence[str]) -> int:
    """Run `aisoc ARGV...`; return the exit code."""
    return run_parser(aisoc_parser(), argv)


def _exit(run: Callable[[Sequence[str]], int], argv: Sequence[str] | None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and keep the interpreter's own
        # flush at exit from raising again (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `aisoc-plugind`."""
    _exit(run_plugind, argv)


def aisoc_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `aisoc`."""
    _exit(run_aisoc, argv)
