"""`aisoc-plugind check-config`: every problem at once, then the warnings; `--strict`.

Errors (the daemon would refuse to start) are printed one a line, each under its TOML key
name, and exit 1. Otherwise the effective settings are printed as JSON on stdout and every
warning as `warning: CODE: MESSAGE` on stderr: the daemon's own preflight warnings, and
three that only a check before start can give: strict mode with no trusted key (nothing
would load), a missing tokens file (nobody could call the API), and `[plugin_config]`
entries whose id matches no plugin on disk (a typo, so the plugin would run without its
settings). With `--strict`, any warning also exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aisoc_plugind.api.listen import check_listen, tls_context
from aisoc_plugind.cli.tree import EXIT_FAILED, EXIT_OK
from aisoc_plugind.config.preflight import ConfigWarning, preflight
from aisoc_plugind.config.settings import Settings, load_settings
from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.bundle import has_manifest, read_manifest
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.errors import ConfigError, PluginDError

__all__ = ["check_config", "extra_warnings"]


def check_config(args: argparse.Namespace) -> int:
    """Run the command; return its exit code."""
    config: Path | None = args.config
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return _errors(list(exc.problems))
    errors: list[str] = []
    for check in (check_listen, tls_context):
        try:
            check(settings)
        except ConfigError as exc:
            errors.extend(exc.problems)
    if errors:
        return _errors(errors)
    print(json.dumps(settings.public_view(), indent=2, sort_keys=True))
    warnings = preflight(settings) + extra_warnings(settings)
    for warning in warnings:
        print(f"warning: {warning.code}: {warning.message}", file=sys.stderr)
    if warnings and getattr(args, "strict", False):
        print(f"aisoc-plugind: error: {len(warnings)} warning(s) and --strict", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _errors(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"aisoc-plugind: error: {len(problems)} problem(s) in the configuration", file=sys.stderr)
    return EXIT_FAILED


def extra_warnings(settings: Settings) -> list[ConfigWarning]:
    """Return the warnings only a check before start gives (see the module docstring)."""
    out: list[ConfigWarning] = []
    if settings.trust_mode is TrustMode.STRICT:
        keyring = load_keyring(settings.keys_dir)
        if not keyring.keys:
            out.append(
                ConfigWarning(
                    code="trust_no_keys",
                    message=f"trust.mode = strict and trust.keys_dir {settings.keys_dir} "
                    "holds no usable key: no plugin will load",
                )
            )
    if not settings.tokens_file.exists():
        out.append(
            ConfigWarning(
                code="api_tokens_file_missing",
                message=f"api.tokens_file {settings.tokens_file} does not exist: every API "
                "call will be refused (create one with `aisoc-plugind token create`)",
            )
        )
    unknown = sorted(set(settings.plugin_config) - _ids_on_disk(settings.plugins_dir))
    for plugin_id in unknown:
        out.append(
            ConfigWarning(
                code="plugin_config_unknown_id",
                message=f'[plugin_config."{plugin_id}"] matches no plugin in plugins.dir '
                f"{settings.plugins_dir}",
            )
        )
    return out


def _ids_on_disk(plugins_dir: Path) -> set[str]:
    """Return the manifest ids of the plugin directories directly under `plugins_dir`."""
    ids: set[str] = set()
    try:
        entries = sorted(plugins_dir.iterdir())
    except OSError:
        return ids
    for path in entries:
        if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
            continue
        try:
            if not has_manifest(path):
                continue
            name, data = read_manifest(path)
            ids.add(parse_manifest(data, name).id)
        except (PluginDError, OSError):
            continue  # the daemon reports broken plugins itself
    return ids
