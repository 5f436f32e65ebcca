"""Find risky but legal settings before the daemon starts (preflight warnings).

The daemon starts anyway; each finding becomes a `config.warning` event and a line of
`aisoc-plugind check-config`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.files import FileRefused, private_file_status, readable_by_others

__all__ = ["ConfigWarning", "preflight"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigWarning:
    """A preflight finding: the daemon starts, but an operator should look."""

    code: str
    message: str


def preflight(settings: Settings) -> list[ConfigWarning]:
    """Return warnings about risky but legal settings (INTERFACE §2, seed 'Trust modes')."""
    out: list[ConfigWarning] = []
    if settings.environment != "development" and settings.trust_mode is not TrustMode.STRICT:
        out.append(
            ConfigWarning(
                code=f"trust_mode_{settings.trust_mode.value}_outside_development",
                message=f"PLUGIN_TRUST_MODE={settings.trust_mode.value} outside development "
                f"(ENVIRONMENT={settings.environment}): plugins that are not verified "
                "will load",
            )
        )
    if settings.environment != "development" and settings.isolation_mode == "none":
        out.append(
            ConfigWarning(
                code="isolation_none_outside_development",
                message=f"isolation.mode = none outside development "
                f"(ENVIRONMENT={settings.environment}): plugin code runs inside the daemon, "
                "with its privileges, its tokens and its audit log within reach",
            )
        )
    out += _dir_warnings(
        settings.plugins_dir,
        "plugins_dir",
        "anyone who can write there can run code as this daemon",
    )
    out += _dir_warnings(
        settings.keys_dir,
        "keys_dir",
        "anyone who can write there can make their own plugins trusted",
    )
    out += _listen_warnings(settings)
    out += _private_key_warnings(settings)
    out += _config_file_warnings(settings)
    return out


def _private_key_warnings(settings: Settings) -> list[ConfigWarning]:
    out: list[ConfigWarning] = []
    keys = (
        ("audit.signing_key", settings.audit_signing_key),
        ("api.tls_key", settings.api_tls_key),
    )
    for name, path in keys:
        if path is None:
            continue
        try:
            st = private_file_status(path)
        except (OSError, FileRefused):
            continue  # refused at start with its own error
        if readable_by_others(st):
            out.append(
                ConfigWarning(
                    code="private_key_readable",
                    message=f"{name} {path} is readable by others "
                    f"({stat.filemode(st.st_mode)}): any local user can copy it; make it "
                    "0600 or 0640 (in Kubernetes, set the Secret volume's defaultMode)",
                )
            )
    return out


def _config_file_warnings(settings: Settings) -> list[ConfigWarning]:
    path = settings.config_file
    if path is None:
        return []
    try:
        st = path.stat()
    except OSError:
        return []
    if st.st_mode & stat.S_IWGRP:
        return [
            ConfigWarning(
                code="config_file_writable",
                message=f"config file {path} is writable by its group "
                f"({stat.filemode(st.st_mode)}): every member can turn verification off",
            )
        ]
    return []


def _dir_warnings(path: Path, name: str, why: str) -> list[ConfigWarning]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [ConfigWarning(code=f"{name}_missing", message=f"{name} {path} does not exist")]
    except OSError as exc:
        return [ConfigWarning(code=f"{name}_unreadable", message=f"{path}: {exc.strerror}")]
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.filemode(st.st_mode)
        return [
            ConfigWarning(
                code=f"{name}_writable",
                message=f"{name} {path} is writable by group or others ({mode}): {why}",
            )
        ]
    return []


def _listen_warnings(settings: Settings) -> list[ConfigWarning]:
    if settings.listen.is_loopback:
        return []
    return [
        ConfigWarning(
            code="api_listen_not_loopback",
            message=f"api.listen {settings.api_listen} is reachable from other hosts",
        )
    ]
