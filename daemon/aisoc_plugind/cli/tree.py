"""Build command trees from declared commands and run one: parsing, error lines, exit codes.

Every command of `aisoc` and `aisoc-plugind` is a `Command` in some group; the runner parses
argv, calls the command, and turns what it raises into one `PROG: error: MESSAGE` line on
stderr and an exit code: 0 success, 1 the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aisoc_plugind.errors import PluginDError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "CommandFailed",
    "Parser",
    "UsageError",
    "add_command",
    "add_commands",
    "run_parser",
    "say",
    "warn",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class CommandFailed(Exception):
    """The operation failed for a reason already worded for the user (exit 1)."""


class _ParseExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that returns instead of exiting (only the entry points exit)."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """Print `message` and unwind to the runner with `status`."""
        if message:
            sys.stderr.write(message)
        raise _ParseExit(status)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """Add nothing: the command takes no arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One leaf command: its name, help, arguments, handler and an example for `--help`.

    `error_prefix` names the command in error lines (default: the command's full prog).
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=_no_arguments)
    example: str = ""
    error_prefix: str | None = None


def add_commands(
    parser: argparse.ArgumentParser,
    commands: Sequence[Command],
    *,
    dest: str = "command",
    metavar: str = "COMMAND",
    common: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Add `commands` as the subcommands of `parser`; `common` adds shared options to each."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=True, parser_class=Parser)
    for command in commands:
        add_command(sub, command, common=common, allow_abbrev=False)


def add_command(
    sub: argparse._SubParsersAction[Any],
    command: Command,
    *,
    common: Callable[[argparse.ArgumentParser], None] | None = None,
    allow_abbrev: bool = True,
) -> argparse.ArgumentParser:
    """Add one leaf command to `sub` (help, example, arguments, what runs it); return it."""
    epilog = f"example:\n{command.example}" if command.example else None
    child: argparse.ArgumentParser = sub.add_parser(
        command.name,
        help=command.help,
        description=command.help,
        allow_abbrev=allow_abbrev,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.arguments(child)
    if common is not None:
        common(child)
    child.set_defaults(_command=command, _prog=command.error_prefix or child.prog, _parser=child)
    return child


def run_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse `argv` with `parser` and run the command it names; return the exit code."""
    try:
        args, extra = parser.parse_known_args(list(argv))
        if extra:  # let the command's own parser say it, with its own usage line
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except _ParseExit as exc:
        return exc.status
    command: Command = args._command
    prog: str = args._prog
    try:
        return command.run(args)
    except UsageError as exc:
        args._parser.print_usage(sys.stderr)
        return _fail(prog, str(exc), EXIT_USAGE)
    except CommandFailed as exc:
        return _fail(prog, str(exc), EXIT_FAILED)
    except PluginDError as exc:
        return _fail(prog, exc.message, EXIT_FAILED)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the entry point ends quietly
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(prog, f"{where}{exc.strerror or exc}", EXIT_FAILED)


def _fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def say(line: str = "") -> None:
    """Print one line of the command's output on stdout."""
    print(line, file=sys.stdout)


def warn(prog: str, message: str) -> None:
    """Print one warning line on stderr."""
    print(f"{prog}: warning: {message}", file=sys.stderr)
