"""Settings: file, environment, defaults; bad values are errors; preflight warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisoc_plugind.config.preflight import preflight
from aisoc_plugind.config.settings import Settings, load_settings
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.errors import ConfigError
from tests.conftest import REPO


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract() -> None:
    """Without file or env, INTERFACE §2's defaults apply."""
    s = load_settings(None, {})
    assert (
        s.environment,
        str(s.plugins_dir),
        s.watch,
        s.run_timeout_s,
        s.trust_mode,
        str(s.keys_dir),
        s.api_listen,
        str(s.tokens_file),
        str(s.audit_path),
        s.log_format,
    ) == (
        "production",
        "/opt/aisoc/plugins",
        True,
        30.0,
        TrustMode.STRICT,
        "/opt/aisoc/plugin-keys",
        "127.0.0.1:8470",
        "/etc/aisoc-plugind/tokens.toml",
        "/var/log/aisoc-plugind/audit.jsonl",
        "json",
    )


def test_file_then_env_override(tmp_path: Path) -> None:
    """The file overrides defaults; the environment overrides the file."""
    path = _toml(tmp_path, '[trust]\nmode = "warn"\n[plugins]\ndir = "/srv/p"\nwatch = false\n')
    s = load_settings(path, {"AISOC_PLUGINS_DIR": "/env/p"})
    assert (s.trust_mode, str(s.plugins_dir), s.watch) == (TrustMode.WARN, "/env/p", False)


@pytest.mark.parametrize("mode", ["permissive", "", "off", "strict2"])
def test_unknown_trust_mode_is_an_error(mode: str) -> None:
    """PLUGIN_TRUST_MODE outside strict/warn/disabled is refused, never a fallback."""
    with pytest.raises(ConfigError, match="PLUGIN_TRUST_MODE"):
        load_settings(None, {"PLUGIN_TRUST_MODE": mode})


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    """A typo in the config file is reported, not ignored."""
    with pytest.raises(ConfigError, match=r"trust\.mdoe"):
        load_settings(_toml(tmp_path, '[trust]\nmdoe = "warn"\n'), {})


def test_all_problems_reported_together(tmp_path: Path) -> None:
    """Several bad values give one error naming each."""
    path = _toml(tmp_path, '[plugins]\nrun_timeout_s = -1\n[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, {"AISOC_PLUGIND_LISTEN": "nope"})
    for word in ("run_timeout_s", "log.format", "AISOC_PLUGIND_LISTEN"):
        assert word in info.value.message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    """Unparseable or absent config files are clear errors."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_toml(tmp_path, "[[["), {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "none.toml", {})


def test_plugin_config_tables(tmp_path: Path) -> None:
    """[plugin_config."<id>"] tables are available per plugin."""
    path = _toml(tmp_path, '[plugin_config."acme.shodan"]\napi_key = "sk-live-123"\n')
    s = load_settings(path, {})
    assert s.config_for("acme.shodan") == {"api_key": "sk-live-123"} and s.config_for("x") == {}
    assert "sk-live-123" not in str(s.public_view())


def test_disabled_outside_development_warns(tmp_path: Path) -> None:
    """PLUGIN_TRUST_MODE=disabled outside development is a preflight warning."""
    s = Settings(trust_mode=TrustMode.DISABLED, plugins_dir=tmp_path, keys_dir=tmp_path)
    codes = [w.code for w in preflight(s)]
    assert "trust_mode_disabled_outside_development" in codes


def test_development_silences_trust_warning(tmp_path: Path) -> None:
    """ENVIRONMENT=development silences the trust-mode warning."""
    tmp_path.chmod(0o755)
    s = Settings(
        trust_mode=TrustMode.DISABLED,
        environment="development",
        plugins_dir=tmp_path,
        keys_dir=tmp_path,
    )
    assert preflight(s) == []


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_writable_plugins_dir_warns(tmp_path: Path, mode: int) -> None:
    """A plugins or keys dir writable by group/others is a remote-code-execution warning."""
    tmp_path.chmod(mode)
    s = Settings(plugins_dir=tmp_path, keys_dir=tmp_path)
    codes = {w.code for w in preflight(s)}
    assert {"plugins_dir_writable", "keys_dir_writable"} <= codes


def test_non_loopback_listen_warns(tmp_path: Path) -> None:
    """Listening beyond loopback is flagged."""
    tmp_path.chmod(0o755)
    s = Settings(plugins_dir=tmp_path, keys_dir=tmp_path, api_listen="0.0.0.0:8470")
    assert [w.code for w in preflight(s)] == ["api_listen_not_loopback"]


def test_example_config_documents_every_key_and_loads() -> None:
    """config.example.toml names every key config.py knows, and loads as-is."""
    import tomllib

    from aisoc_plugind.config.settings import KEYS

    example = REPO / "config.example.toml"
    doc = tomllib.loads(example.read_text())
    for key in KEYS:
        table = doc.get(key.section, {}) if key.section else doc
        assert key.key in table, f"{key.section}.{key.key} missing from config.example.toml"
    assert load_settings(example, {}).trust_mode is TrustMode.STRICT


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"auto"', None), ('"AUTO"', None), ("0", 0), ("3", 3), ("64", 64)],
)
def test_scan_workers_accepts_auto_or_a_count(
    tmp_path: Path, value: str, expected: int | None
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[plugins]\nscan_workers = {value}\n")
    assert load_settings(config, environ={}).scan_workers == expected


@pytest.mark.parametrize("value", ["-1", "65", "true", '"many"', "1.5", "[1]"])
def test_scan_workers_refuses_anything_else(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[plugins]\nscan_workers = {value}\n")
    with pytest.raises(ConfigError, match="scan_workers"):
        load_settings(config, environ={})
