"""Resolve settings once (environment, then TOML file, then defaults) and run preflight checks.

The result is one frozen Settings object handed to everything else. Every problem in the
file or the environment is collected and reported together as a ConfigError; an unknown key
or an unknown trust mode is an error, never a silent fallback.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aisoc_plugind.audit.log import FsyncPolicy
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the daemon is configured with (INTERFACE §2, plus documented extras)."""

    environment: str = "production"
    plugins_dir: Path = Path("/opt/aisoc/plugins")
    watch: bool = True
    watch_debounce_ms: int = 30
    run_timeout_s: float = 30.0
    run_concurrency: int = 16
    trust_mode: TrustMode = TrustMode.STRICT
    keys_dir: Path = Path("/opt/aisoc/plugin-keys")
    api_listen: str = "127.0.0.1:8470"
    tokens_file: Path = Path("/etc/aisoc-plugind/tokens.toml")
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    api_allowed_hosts: tuple[str, ...] = ()
    api_allow_insecure_listen: bool = False
    api_max_body_bytes: int = 1024 * 1024
    api_denied_burst: int = 50
    api_denied_per_second: float = 10.0
    audit_path: Path = Path("/var/log/aisoc-plugind/audit.jsonl")
    audit_fsync: FsyncPolicy = FsyncPolicy.MUTATIONS
    audit_fail_closed: bool = True
    log_format: str = "json"
    shutdown_grace_s: float = 20.0
    oci_allow_insecure_registries: tuple[str, ...] = ()
    plugin_config: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))
    config_file: Path | None = None

    def config_for(self, plugin_id: str) -> dict[str, Any]:
        """Return a fresh copy of the `[plugin_config."<id>"]` table (empty when absent)."""
        return dict(self.plugin_config.get(plugin_id, {}))

    def public_view(self) -> dict[str, Any]:
        """Return the effective settings for display (plugin config values are not shown)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "plugin_config":
                value = sorted(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class _Key:
    """How one setting is found: TOML section/key, env var, and its parser."""

    attr: str
    section: str
    key: str
    env: str | None
    parse: Callable[[Any], Any]


def _as_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v.strip()


def _as_path(v: Any) -> Path:
    return Path(_as_str(v))


def _as_opt_path(v: Any) -> Path | None:
    return None if v in ("", None) else _as_path(v)


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in {"1", "true", "yes", "on", "0", "false",
                                                    "no", "off"}:
        return v.strip().lower() in {"1", "true", "yes", "on"}
    raise ValueError("must be true or false")


def _positive(kind: type[int] | type[float]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a positive number")
        number = kind(v)
        if number <= 0:
            raise ValueError("must be a positive number")
        return number
    return parse


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        text = str(v).strip().lower()
        if text not in options:
            raise ValueError(f"{v!r} is not one of: {', '.join(options)}")
        return text
    return parse


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    return tuple(x.strip() for x in v)


def _listen(v: Any) -> str:
    text = _as_str(v)
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ValueError("unix socket path must be absolute (unix:/run/x.sock)")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT or unix:/path.sock")
    return text


KEYS: tuple[_Key, ...] = (
    _Key("environment", "", "environment", "ENVIRONMENT", _as_str),
    _Key("plugins_dir", "plugins", "dir", "AISOC_PLUGINS_DIR", _as_path),
    _Key("watch", "plugins", "watch", None, _as_bool),
    _Key("watch_debounce_ms", "plugins", "watch_debounce_ms", None, _positive(int)),
    _Key("run_timeout_s", "plugins", "run_timeout_s", None, _positive(float)),
    _Key("run_concurrency", "plugins", "run_concurrency", None, _positive(int)),
    _Key("trust_mode", "trust", "mode", "PLUGIN_TRUST_MODE",
         lambda v: TrustMode(_choice(tuple(m.value for m in TrustMode))(v))),
    _Key("keys_dir", "trust", "keys_dir", "PLUGIN_TRUSTED_KEYS_DIR", _as_path),
    _Key("api_listen", "api", "listen", "AISOC_PLUGIND_LISTEN", _listen),
    _Key("tokens_file", "api", "tokens_file", "AISOC_PLUGIND_TOKENS_FILE", _as_path),
    _Key("api_tls_cert", "api", "tls_cert", None, _as_opt_path),
    _Key("api_tls_key", "api", "tls_key", None, _as_opt_path),
    _Key("api_allowed_hosts", "api", "allowed_hosts", None, _str_list),
    _Key("api_allow_insecure_listen", "api", "allow_insecure_listen", None, _as_bool),
    _Key("api_max_body_bytes", "api", "max_body_bytes", None, _positive(int)),
    _Key("api_denied_burst", "api", "denied_burst", None, _positive(int)),
    _Key("api_denied_per_second", "api", "denied_per_second", None, _positive(float)),
    _Key("audit_path", "audit", "path", "AISOC_PLUGIND_AUDIT_LOG", _as_path),
    _Key("audit_fsync", "audit", "fsync", None,
         lambda v: FsyncPolicy(_choice(tuple(p.value for p in FsyncPolicy))(v))),
    _Key("audit_fail_closed", "audit", "fail_closed", None, _as_bool),
    _Key("log_format", "log", "format", None, _choice(("json", "console"))),
    _Key("shutdown_grace_s", "daemon", "shutdown_grace_s", None, _positive(float)),
    _Key("oci_allow_insecure_registries", "oci", "allow_insecure_registries", None, _str_list),
)
_SECTIONS = {k.section for k in KEYS if k.section} | {"plugin_config"}


def load_settings(config_file: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an optional TOML file and the environment; raise ConfigError."""
    env = os.environ if environ is None else environ
    doc = _read_toml(config_file) if config_file is not None else {}
    problems = _unknown_keys(doc)
    values: dict[str, Any] = {}
    for key in KEYS:
        raw, where = _lookup(key, doc, env)
        if where is None:
            continue
        try:
            values[key.attr] = key.parse(raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    plugin_config = _plugin_config(doc, problems)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return Settings(**values, plugin_config=plugin_config, config_file=config_file)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _lookup(key: _Key, doc: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Any, str | None]:
    if key.env is not None and key.env in env:
        return env[key.env], f"environment variable {key.env}"
    table = doc.get(key.section, {}) if key.section else doc
    if isinstance(table, dict) and key.key in table:
        name = f"{key.section}.{key.key}" if key.section else key.key
        return table[key.key], f"config key {name}"
    return None, None


def _unknown_keys(doc: Mapping[str, Any]) -> list[str]:
    known = {(k.section, k.key) for k in KEYS}
    problems: list[str] = []
    for name, value in doc.items():
        if isinstance(value, dict) and name in _SECTIONS:
            if name != "plugin_config":
                problems += [f"unknown config key {name}.{k}" for k in value
                             if (name, k) not in known]
        elif ("", name) not in known:
            problems.append(f"unknown config key {name}")
    return problems


def _plugin_config(doc: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    table = doc.get("plugin_config", {})
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        problems.append('plugin_config: must hold tables, [plugin_config."<plugin id>"]')
        return MappingProxyType({})
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in table.items()})


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigWarning:
    """A preflight finding: the daemon starts, but an operator should look."""

    code: str
    message: str


def preflight(settings: Settings) -> list[ConfigWarning]:
    """Return warnings about risky but legal settings (INTERFACE §2, seed 'Trust modes')."""
    out: list[ConfigWarning] = []
    if settings.environment != "development" and settings.trust_mode is not TrustMode.STRICT:
        out.append(ConfigWarning(
            code=f"trust_mode_{settings.trust_mode.value}_outside_development",
            message=f"PLUGIN_TRUST_MODE={settings.trust_mode.value} outside development "
                    f"(ENVIRONMENT={settings.environment}): plugins that are not verified "
                    "will load"))
    out += _dir_warnings(settings.plugins_dir, "plugins_dir",
                         "anyone who can write there can run code as this daemon")
    out += _dir_warnings(settings.keys_dir, "keys_dir",
                         "anyone who can write there can make their own plugins trusted")
    out += _listen_warnings(settings)
    return out


def _dir_warnings(path: Path, name: str, why: str) -> list[ConfigWarning]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [ConfigWarning(code=f"{name}_missing", message=f"{name} {path} does not exist")]
    except OSError as exc:
        return [ConfigWarning(code=f"{name}_unreadable", message=f"{path}: {exc.strerror}")]
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.filemode(st.st_mode)
        return [ConfigWarning(code=f"{name}_writable",
                              message=f"{name} {path} is writable by group or others ({mode}): "
                                      f"{why}")]
    return []


def _listen_warnings(settings: Settings) -> list[ConfigWarning]:
    if settings.api_listen.startswith("unix:"):
        return []
    host = settings.api_listen.rpartition(":")[0].strip("[]")
    if is_loopback_host(host):
        return []
    return [ConfigWarning(code="api_listen_not_loopback",
                          message=f"api.listen {settings.api_listen} is reachable from other "
                                  "hosts")]


def is_loopback_host(host: str) -> bool:
    """Return True for `localhost` and loopback IP literals."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
