"""Bash completion for `aisoc` and `aisoc-plugind`, generated from the argparse trees.

The script is built from the very parsers that parse the command line, so it cannot drift
from them: `aisoc completion bash` and `aisoc-plugind completion bash` print it (install
with `aisoc completion bash > /etc/bash_completion.d/aisoc`, or `source <(...)`; zsh users
load it through `bashcompinit`). It completes command words at every level, the options of
the command typed so far, the choices of options that have them, and file names for options
that take a path.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from typing import Any

from aisoc_plugind.cli.tree import Command, add_command, say

__all__ = ["SHELLS", "add_completion", "bash_script"]

SHELLS = ("bash",)
_PATHLIKE = re.compile(r"(FILE|DIR|PATH|KEY|OUT|CONFIG|TOKENS)", re.IGNORECASE)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse exposes no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for name, child in _subparsers(parser).items():
        yield from _walk(child, f"{path} {name}")


def _words(parser: argparse.ArgumentParser) -> list[str]:
    words = list(_subparsers(parser))
    for action in parser._actions:
        words.extend(action.option_strings)
    return words


def _takes_paths(parser: argparse.ArgumentParser) -> bool:
    """Whether a positional argument of this command names a file or directory."""
    return any(
        not action.option_strings
        and action.choices is None
        and _PATHLIKE.search(f"{action.metavar or ''} {action.dest}")
        for action in parser._actions
    )


def _value_words(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Map each option that takes a value to `choices` words or the `@file` marker."""
    values: dict[str, str] = {}
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        if action.choices is not None:
            words = " ".join(str(c) for c in action.choices)
        elif _PATHLIKE.search(f"{action.metavar or ''} {action.dest}"):
            words = "@file"
        else:
            words = "@none"
        for option in action.option_strings:
            values[option] = words
    return values


def bash_script(parser: argparse.ArgumentParser) -> str:
    """Return a bash completion script for the command `parser.prog`."""
    prog = parser.prog
    func = "_" + re.sub(r"\W", "_", prog) + "_complete"
    words: list[str] = []
    values: list[str] = []
    files: list[str] = []
    for path, node in _walk(parser):
        words.append(f"        [{shlex.quote(path or '.')}]={shlex.quote(' '.join(_words(node)))}")
        if _takes_paths(node):
            files.append(f"        [{shlex.quote(path)}]=1")
        for option, choices in _value_words(node).items():
            key = shlex.quote(f"{path or '.'}|{option}")
            values.append(f"        [{key}]={shlex.quote(choices)}")
    return "\n".join(
        [
            f"# bash completion for {prog}, generated from its argument parser",
            f"{func}() {{",
            "    local -A words=(",
            *words,
            "    )",
            "    local -A values=(",
            *values,
            "    )",
            "    local -A files=(",
            *files,
            "    )",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" path="" i w',
            '    local prev="${COMP_WORDS[COMP_CWORD-1]}"',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        w="${COMP_WORDS[i]}"',
            '        [[ -n "${words["$path $w"]+set}" ]] && path="$path $w"',
            "    done",
            '    local spec="${values["${path:-.}|$prev"]-}"',
            '    if [[ "$spec" == "@file" ]]; then',
            '        COMPREPLY=($(compgen -f -- "$cur"))',
            '    elif [[ "$spec" == "@none" ]]; then',
            "        COMPREPLY=()",
            '    elif [[ -n "$spec" ]]; then',
            '        COMPREPLY=($(compgen -W "$spec" -- "$cur"))',
            '    elif [[ "$cur" != -* && -n "${files["${path:-.}"]-}" ]]; then',
            '        COMPREPLY=($(compgen -f -- "$cur"))',
            "    else",
            '        COMPREPLY=($(compgen -W "${words[${path:-.}]}" -- "$cur"))',
            "    fi",
            "}",
            f"complete -o filenames -F {func} {prog}",
            "",
        ]
    )


def add_completion(sub: argparse._SubParsersAction[Any], root: argparse.ArgumentParser) -> None:
    """Add `completion SHELL` to a command tree's top level; it prints `root`'s script."""

    def run(args: argparse.Namespace) -> int:
        say(bash_script(root).rstrip("\n"))
        return 0

    def arguments(child: argparse.ArgumentParser) -> None:
        child.add_argument(
            "shell", choices=SHELLS, help="the shell (only bash; zsh via bashcompinit)"
        )

    add_command(
        sub,
        Command(
            name="completion",
            help="print a shell completion script",
            run=run,
            arguments=arguments,
            example=f"  {root.prog} completion bash > /etc/bash_completion.d/{root.prog}",
        ),
    )
