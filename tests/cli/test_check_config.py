"""`check-config`: every problem at once under its TOML key, warnings, `--strict`; and every
key settable from the environment as `AISOC_PLUGIND__SECTION__KEY`."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.cli.main import run_plugind
from aisoc_plugind.config.settings import KEYS, env_name, load_settings
from aisoc_plugind.errors import ConfigError
from tests.conftest import VECTOR_PUB

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = tomllib.loads((REPO / "config.example.toml").read_text())


def _config(tmp_path: Path, extra: str = "", *, keys: bool = True, tokens: bool = True) -> Path:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(exist_ok=True)
    if keys:
        (keys_dir / "signer.pem").write_bytes(VECTOR_PUB.read_bytes())
    (tmp_path / "plugins").mkdir(exist_ok=True)
    tokens_file = tmp_path / "tokens.toml"
    if tokens:
        tokens_file.write_text("")
    config = tmp_path / "config.toml"
    config.write_text(
        f'environment = "development"\n[plugins]\ndir = "{tmp_path}/plugins"\n'
        f'[trust]\nkeys_dir = "{keys_dir}"\n[audit]\npath = "{tmp_path}/audit.jsonl"\n'
        f'[api]\ntokens_file = "{tokens_file}"\n'
        f'[isolation]\nstate_dir = "{tmp_path}/state"\n{extra}'
    )
    return config


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("AISOC", "PLUGIN_TRUST", "PLUGIN_TRUSTED")) or name == "ENVIRONMENT":
            monkeypatch.delenv(name)


def test_every_problem_at_once_under_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    config.write_text(
        config.read_text() + '[daemon]\nshutdown_grace_s = -1\n[log]\nlevel = "loud"\nbogus = 1\n'
    )
    monkeypatch.setenv("PLUGIN_TRUST_MODE", "lenient")
    monkeypatch.setenv("AISOC_PLUGIND__PLUGINS__RUN_TIMEOUT_S", "soon")
    monkeypatch.setenv("AISOC_PLUGIND__NO__SUCH", "1")
    assert run_plugind(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 6, err
    for key in (
        "daemon.shutdown_grace_s",
        "log.level",
        "log.bogus",
        "trust.mode (environment variable PLUGIN_TRUST_MODE)",
        "plugins.run_timeout_s (environment variable AISOC_PLUGIND__PLUGINS__RUN_TIMEOUT_S)",
        "AISOC_PLUGIND__NO__SUCH",
    ):
        assert key in err
    assert "6 problem(s)" in err


def test_listen_problems_are_reported_like_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    config.write_text(
        config.read_text().replace("[api]\n", '[api]\nlisten = "0.0.0.0:8470"\n') + "\n"
    )
    assert run_plugind(["check-config", "--config", str(config)]) == 1
    assert "not a loopback address" in capsys.readouterr().err


def test_a_clean_config_has_no_warnings_and_passes_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert run_plugind(["check-config", "--strict", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)
    assert "warning" not in err


@pytest.mark.parametrize(
    ("extra", "keys", "tokens", "code"),
    [
        ("", False, True, "trust_no_keys"),
        ("", True, False, "api_tokens_file_missing"),
        ('[plugin_config."no-such-plugin"]\nx = 1\n', True, True, "plugin_config_unknown_id"),
    ],
)
def test_warnings_and_strict(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    keys: bool,
    tokens: bool,
    code: str,
) -> None:
    config = _config(tmp_path, extra, keys=keys, tokens=tokens)
    assert run_plugind(["check-config", "--config", str(config)]) == 0
    assert f"warning: {code}:" in capsys.readouterr().err
    assert run_plugind(["check-config", "--strict", "--config", str(config)]) == 1
    assert "--strict" in capsys.readouterr().err


def test_plugin_config_of_a_plugin_on_disk_is_no_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, '[plugin_config."shodan-enricher"]\nx = 1\n')
    plugin = tmp_path / "plugins" / "shodan"
    plugin.mkdir()
    example = REPO / "examples" / "plugins" / "shodan-enricher" / "plugin.yaml"
    (plugin / "plugin.yaml").write_bytes(example.read_bytes())
    (tmp_path / "plugins" / "broken").mkdir()
    (tmp_path / "plugins" / "broken" / "plugin.yaml").write_text("id: [")
    assert run_plugind(["check-config", "--strict", "--config", str(config)]) == 0
    assert "plugin_config_unknown_id" not in capsys.readouterr().err


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


SAMPLES: dict[str, Any] = {
    "api.allowed_hosts": ["api.example", "10.0.0.0/8"],
    "api.tls_cert": "/etc/ssl/cert.pem",
    "api.tls_key": "/etc/ssl/key.pem",
    "audit.signing_key": "/etc/aisoc-plugind/audit.key",
    "isolation.dedicated": ["a-plugin"],
    "isolation.read_paths": ["/usr/share/geoip"],
    "oci.allow_insecure_registries": ["127.0.0.1:5000"],
    "oci.allowed_registries": ["registry.example"],
    "oci.ca_file": "/etc/ssl/ca.pem",
    "oci.docker_config": "/etc/aisoc-plugind/docker.json",
    "oci.follow": [{"ref": "registry.example/p:stable", "interval_s": 60}],
}


def _sample(section: str, key: str) -> Any:
    name = f"{section}.{key}" if section else key
    if name in SAMPLES:
        return SAMPLES[name]
    table = EXAMPLE.get(section, {}) if section else EXAMPLE
    assert key in table, f"{name} is not documented in config.example.toml"
    return table[key]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: env_name(k))
def test_every_key_can_be_set_from_the_environment(key: Any, tmp_path: Path) -> None:
    value = _sample(key.section, key.key)
    from_file = tmp_path / "file.toml"
    header = f"[{key.section}]\n" if key.section else ""
    from_file.write_text(f"{header}{key.key} = {_toml_value(value)}\n")
    expected = getattr(load_settings(from_file, environ={}), key.attr)
    text = value if isinstance(value, str) else _toml_value(value)
    got = getattr(load_settings(None, environ={env_name(key): text}), key.attr)
    assert got == expected


def test_environment_text_forms(tmp_path: Path) -> None:
    env = {
        "AISOC_PLUGIND__API__ALLOWED_HOSTS": "a.example,10.0.0.0/8",
        "AISOC_PLUGIND__ENVIRONMENT": "123",  # a string key whose value reads as a number
        "AISOC_PLUGIND__PLUGINS__WATCH": "false",
        "AISOC_PLUGIND__ISOLATION__MODE": "none",
    }
    settings = load_settings(None, environ=env)
    assert settings.api_allowed_hosts == ("a.example", "10.0.0.0/8")
    assert settings.environment == "123"
    assert settings.watch is False
    assert settings.isolation_mode == "none"


def test_named_variables_win_over_generic_ones() -> None:
    env = {"PLUGIN_TRUST_MODE": "warn", "AISOC_PLUGIND__TRUST__MODE": "disabled"}
    assert load_settings(None, environ=env).trust_mode.value == "warn"


def test_a_bad_cidr_is_refused_under_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"AISOC_PLUGIND__API__ALLOWED_HOSTS": '["10.0.0.0/33"]'})
    assert caught.value.problems == (
        "api.allowed_hosts (environment variable AISOC_PLUGIND__API__ALLOWED_HOSTS): "
        "not a CIDR network: 10.0.0.0/33",
    )
