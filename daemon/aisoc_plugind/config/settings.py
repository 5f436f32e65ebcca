"""Resolve settings once (environment, then TOML file, then defaults) into one frozen object.

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
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aisoc_plugind.core.listen import ListenAddress, parse_listen
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.errors import ConfigError

__all__ = [
    "AUDIT_SCHEMAS",
    "ENV_PREFIX",
    "ISOLATION_GROUPS",
    "ISOLATION_MODES",
    "KEYS",
    "LANDLOCK_MODES",
    "LOG_LEVELS",
    "FsyncPolicy",
    "OciFollow",
    "Settings",
    "env_name",
    "load_settings",
]

AUDIT_SCHEMAS = ("native", "ecs", "ocsf")
LOG_LEVELS = ("debug", "info", "warning", "error")
ISOLATION_MODES = ("process", "none")
ISOLATION_GROUPS = ("signer", "plugin")
LANDLOCK_MODES = ("auto", "require", "off")


class FsyncPolicy(StrEnum):
    """When audit lines are forced to stable storage (`audit.fsync`)."""

    ALWAYS = "always"
    MUTATIONS = "mutations"
    NEVER = "never"


@dataclass(frozen=True, slots=True, kw_only=True)
class OciFollow:
    """One `[[oci.follow]]` entry: a tag reference polled every `interval_s` seconds."""

    ref: str
    interval_s: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the daemon is configured with (INTERFACE §2, plus documented extras)."""

    environment: str = "production"
    plugins_dir: Path = Path("/opt/aisoc/plugins")
    watch: bool = True
    watch_debounce_ms: int = 30
    run_timeout_s: float = 30.0
    run_concurrency: int = 16
    scan_workers: int | None = None  # None: one per CPU, up to 4 (engine.scanpool)
    trust_mode: TrustMode = TrustMode.STRICT
    keys_dir: Path = Path("/opt/aisoc/plugin-keys")
    revoked_file: Path = Path("/etc/aisoc-plugind/revoked.toml")
    api_listen: str = "127.0.0.1:8470"
    tokens_file: Path = Path("/etc/aisoc-plugind/tokens.toml")
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    api_allowed_hosts: tuple[str, ...] = ()
    api_allow_insecure_listen: bool = False
    api_max_body_bytes: int = 1024 * 1024
    api_denied_burst: int = 50
    api_denied_per_second: float = 10.0
    api_max_body_bytes_total: int = 16 * 1024 * 1024
    api_max_connections: int = 256
    api_max_connections_per_host: int = 64
    api_keepalive_timeout_s: float = 15.0
    api_header_timeout_s: float = 10.0
    api_body_timeout_s: float = 30.0
    audit_path: Path = Path("/var/log/aisoc-plugind/audit.jsonl")
    audit_fsync: FsyncPolicy = FsyncPolicy.MUTATIONS
    audit_fail_closed: bool = True
    audit_schema: str = "native"
    audit_signing_key: Path | None = None
    audit_checkpoint_lines: int = 1000
    audit_checkpoint_interval_s: float = 60.0
    log_format: str = "json"
    log_level: str = "info"
    state_dir: Path = Path("/var/lib/aisoc-plugind/state")
    isolation_mode: str = "process"  # "process" | "none" (in the daemon: development only)
    isolation_group: str = "signer"  # "signer" | "plugin"
    isolation_dedicated: tuple[str, ...] = ()
    isolation_memory_mb: int = 512
    isolation_landlock: str = "auto"  # "auto" | "require" | "off"
    isolation_allow_subprocesses: bool = False  # hosts may start processes (no seccomp filter)
    isolation_read_paths: tuple[Path, ...] = ()
    max_result_bytes: int = 8 * 1024 * 1024
    shutdown_grace_s: float = 20.0
    oci_allow_insecure_registries: tuple[str, ...] = ()
    oci_ca_file: Path | None = None
    oci_docker_config: Path | None = None
    oci_require_digest: bool = True
    oci_allowed_registries: tuple[str, ...] = ()
    oci_follow: tuple[OciFollow, ...] = ()
    plugin_config: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    config_file: Path | None = None

    @property
    def listen(self) -> ListenAddress:
        """Return `api.listen` parsed (it was validated when the settings were built)."""
        return parse_listen(self.api_listen)

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
                value = [_plain(v) for v in value]
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
    if isinstance(v, str) and v.strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    }:
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


def _scan_workers(v: Any) -> int | None:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError('must be "auto" or a whole number from 0 to 64')
    number = int(v)
    if not 0 <= number <= 64:
        raise ValueError('must be "auto" or a whole number from 0 to 64')
    return number


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


def _host_list(v: Any) -> tuple[str, ...]:
    """Host names, `host:port` values, IP addresses or CIDR networks (`10.0.0.0/8`)."""
    hosts = tuple(h.lower() for h in _str_list(v))
    bad = []
    for host in hosts:
        if "/" in host:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                bad.append(host)
    if bad:
        raise ValueError(f"not a CIDR network: {', '.join(bad)}")
    return hosts


def _path_list(v: Any) -> tuple[Path, ...]:
    paths = tuple(Path(p) for p in _str_list(v))
    relative = [str(p) for p in paths if not p.is_absolute()]
    if relative:
        raise ValueError(f"paths must be absolute: {', '.join(relative)}")
    return paths


def _plain(v: Any) -> Any:
    """Return a value of a tuple setting as JSON can show it."""
    if isinstance(v, OciFollow):
        return {"ref": v.ref, "interval_s": v.interval_s}
    return str(v) if isinstance(v, Path) else v


def _follow(v: Any) -> tuple[OciFollow, ...]:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ValueError('must be an array of tables: [[oci.follow]] ref = "HOST/REPO:TAG"')
    return tuple(_follow_entry(x) for x in v)


def _follow_entry(entry: dict[str, Any]) -> OciFollow:
    unknown = sorted(set(entry) - {"ref", "interval_s"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (allowed: ref, interval_s)")
    if not isinstance(entry.get("ref"), str) or not entry["ref"].strip():
        raise ValueError("every entry needs ref, a tag reference (HOST/REPOSITORY:TAG)")
    ref = entry["ref"].strip()
    if "@" in ref:
        raise ValueError(f"{ref[:200]!r}: follow a tag, not a digest (a digest never moves)")
    interval = _positive(float)(entry.get("interval_s", 300.0))
    return OciFollow(ref=ref, interval_s=interval)


def _listen(v: Any) -> str:
    return parse_listen(_as_str(v)).text


KEYS: tuple[_Key, ...] = (
    _Key("environment", "", "environment", "ENVIRONMENT", _as_str),
    _Key("plugins_dir", "plugins", "dir", "AISOC_PLUGINS_DIR", _as_path),
    _Key("watch", "plugins", "watch", None, _as_bool),
    _Key("watch_debounce_ms", "plugins", "watch_debounce_ms", None, _positive(int)),
    _Key("run_timeout_s", "plugins", "run_timeout_s", None, _positive(float)),
    _Key("run_concurrency", "plugins", "run_concurrency", None, _positive(int)),
    _Key("scan_workers", "plugins", "scan_workers", None, _scan_workers),
    _Key(
        "trust_mode",
        "trust",
        "mode",
        "PLUGIN_TRUST_MODE",
        lambda v: TrustMode(_choice(tuple(m.value for m in TrustMode))(v)),
    ),
    _Key("keys_dir", "trust", "keys_dir", "PLUGIN_TRUSTED_KEYS_DIR", _as_path),
    _Key("revoked_file", "trust", "revoked_file", None, _as_path),
    _Key("api_listen", "api", "listen", "AISOC_PLUGIND_LISTEN", _listen),
    _Key("tokens_file", "api", "tokens_file", "AISOC_PLUGIND_TOKENS_FILE", _as_path),
    _Key("api_tls_cert", "api", "tls_cert", None, _as_opt_path),
    _Key("api_tls_key", "api", "tls_key", None, _as_opt_path),
    _Key("api_allowed_hosts", "api", "allowed_hosts", None, _host_list),
    _Key("api_allow_insecure_listen", "api", "allow_insecure_listen", None, _as_bool),
    _Key("api_max_body_bytes", "api", "max_body_bytes", None, _positive(int)),
    _Key("api_denied_burst", "api", "denied_burst", None, _positive(int)),
    _Key("api_denied_per_second", "api", "denied_per_second", None, _positive(float)),
    _Key("api_max_body_bytes_total", "api", "max_body_bytes_total", None, _positive(int)),
    _Key("api_max_connections", "api", "max_connections", None, _positive(int)),
    _Key("api_max_connections_per_host", "api", "max_connections_per_host", None, _positive(int)),
    _Key("api_keepalive_timeout_s", "api", "keepalive_timeout_s", None, _positive(float)),
    _Key("api_header_timeout_s", "api", "header_timeout_s", None, _positive(float)),
    _Key("api_body_timeout_s", "api", "body_timeout_s", None, _positive(float)),
    _Key("audit_path", "audit", "path", "AISOC_PLUGIND_AUDIT_LOG", _as_path),
    _Key(
        "audit_fsync",
        "audit",
        "fsync",
        None,
        lambda v: FsyncPolicy(_choice(tuple(p.value for p in FsyncPolicy))(v)),
    ),
    _Key("audit_fail_closed", "audit", "fail_closed", None, _as_bool),
    _Key("audit_schema", "audit", "schema", None, _choice(AUDIT_SCHEMAS)),
    _Key("audit_signing_key", "audit", "signing_key", None, _as_opt_path),
    _Key("audit_checkpoint_lines", "audit", "checkpoint_lines", None, _positive(int)),
    _Key("audit_checkpoint_interval_s", "audit", "checkpoint_interval_s", None, _positive(float)),
    _Key("log_format", "log", "format", None, _choice(("json", "console"))),
    _Key("log_level", "log", "level", None, _choice(LOG_LEVELS)),
    _Key("state_dir", "isolation", "state_dir", None, _as_path),
    _Key("isolation_mode", "isolation", "mode", None, _choice(ISOLATION_MODES)),
    _Key("isolation_group", "isolation", "group", None, _choice(ISOLATION_GROUPS)),
    _Key("isolation_dedicated", "isolation", "dedicated", None, _str_list),
    _Key("isolation_memory_mb", "isolation", "memory_mb", None, _positive(int)),
    _Key("isolation_landlock", "isolation", "landlock", None, _choice(LANDLOCK_MODES)),
    _Key("isolation_allow_subprocesses", "isolation", "allow_subprocesses", None, _as_bool),
    _Key("isolation_read_paths", "isolation", "read_paths", None, _path_list),
    _Key("max_result_bytes", "plugins", "max_result_bytes", None, _positive(int)),
    _Key("shutdown_grace_s", "daemon", "shutdown_grace_s", None, _positive(float)),
    _Key("oci_allow_insecure_registries", "oci", "allow_insecure_registries", None, _str_list),
    _Key("oci_ca_file", "oci", "ca_file", None, _as_opt_path),
    _Key("oci_docker_config", "oci", "docker_config", None, _as_opt_path),
    _Key("oci_require_digest", "oci", "require_digest", None, _as_bool),
    _Key("oci_allowed_registries", "oci", "allowed_registries", None, _str_list),
    _Key("oci_follow", "oci", "follow", None, _follow),
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
            values[key.attr] = _parse(key, raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    problems += _unknown_env(env)
    plugin_config = _plugin_config(doc, problems)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems), problems=problems)
    return Settings(**values, plugin_config=plugin_config, config_file=config_file)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            _check_config_file(path, os.fstat(fh.fileno()))
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _check_config_file(path: Path, st: os.stat_result) -> None:
    """Refuse a config file anyone may write, or one another unprivileged user owns: it
    sets the trust mode and the keys directory. (Group-writable is a preflight warning.)"""
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"config file {path} is writable by others ({stat.filemode(st.st_mode)}): anyone "
            "could turn verification off; make it 0640 or 0644",
            code="config_file_insecure",
        )
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"config file {path} is owned by uid {st.st_uid}, neither root nor this daemon's "
            f"user (uid {os.geteuid()}): that user could turn verification off",
            code="config_file_insecure",
        )


ENV_PREFIX = "AISOC_PLUGIND__"


def env_name(key: _Key) -> str:
    """Return the generic variable of a key: `AISOC_PLUGIND__SECTION__KEY` (upper case)."""
    parts = (key.section, key.key) if key.section else (key.key,)
    return ENV_PREFIX + "__".join(p.upper() for p in parts)


def _env_value(raw: str) -> Any:
    """Read a generic variable's value as a TOML value when it is one, else as a string.

    `5`, `2.5`, `true`, `["a", "b"]`, `[{ref = "…", interval_s = 60}]` and `"text"` are TOML;
    `strict`, `/opt/plugins` or `a,b` are taken as they are (lists split at commas).
    """
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


@dataclass(frozen=True, slots=True)
class _EnvText:
    """The text of a generic variable: read as TOML first, as plain text when that fails."""

    text: str


def _parse(key: _Key, raw: Any) -> Any:
    if not isinstance(raw, _EnvText):
        return key.parse(raw)
    value = _env_value(raw.text)
    if isinstance(value, str):
        return key.parse(value)
    try:
        return key.parse(value)
    except (ValueError, TypeError) as first:
        try:  # e.g. a string key whose value happens to read as a number
            return key.parse(raw.text)
        except (ValueError, TypeError):
            raise first from None


def _lookup(key: _Key, doc: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Any, str | None]:
    name = f"{key.section}.{key.key}" if key.section else key.key
    if key.env is not None and key.env in env:
        return env[key.env], f"{name} (environment variable {key.env})"
    generic = env_name(key)
    if generic in env:
        return _EnvText(env[generic]), f"{name} (environment variable {generic})"
    table = doc.get(key.section, {}) if key.section else doc
    if isinstance(table, dict) and key.key in table:
        return table[key.key], f"config key {name}"
    return None, None


def _unknown_env(env: Mapping[str, str]) -> list[str]:
    """A generic variable that names no key is a mistake worth stopping for (a typo)."""
    known = {env_name(k) for k in KEYS}
    return [
        f"unknown environment variable {name} (no such config key)"
        for name in sorted(env)
        if name.startswith(ENV_PREFIX) and name not in known
    ]


def _unknown_keys(doc: Mapping[str, Any]) -> list[str]:
    known = {(k.section, k.key) for k in KEYS}
    problems: list[str] = []
    for name, value in doc.items():
        if isinstance(value, dict) and name in _SECTIONS:
            if name != "plugin_config":
                problems += [
                    f"unknown config key {name}.{k}" for k in value if (name, k) not in known
                ]
        elif ("", name) not in known:
            problems.append(f"unknown config key {name}")
    return problems


def _plugin_config(doc: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    table = doc.get("plugin_config", {})
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        problems.append('plugin_config: must hold tables, [plugin_config."<plugin id>"]')
        return MappingProxyType({})
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in table.items()})
