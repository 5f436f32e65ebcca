"""Private keys and the config file are checked like the other files that carry trust.

The audit signing key (it signs checkpoints over the chain), the API's TLS key (it makes this
the API for every client) and the config file (it sets the trust mode and the keys directory)
are refused when group or others may write them, when another unprivileged user owns them, or
(the keys) when they are not regular files; a private key others may read, and a config file
its group may write, are preflight warnings. Links are followed only as kubelet lays them out.
(The tests run as root: "another unprivileged user" is uid 65534, nobody.)
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
import pytest

from aisoc_plugind.api.listen import tls_context
from aisoc_plugind.api.tokens import PERMISSIONS
from aisoc_plugind.audit.log import log_options
from aisoc_plugind.config.preflight import preflight
from aisoc_plugind.config.settings import Settings, load_settings
from aisoc_plugind.core.signing import private_key_pem
from aisoc_plugind.errors import ConfigError
from tests.api_fixtures import write_tokens
from tests.conftest import Env
from tests.hardening.live import wait_exit
from tests.hardening.unsafe import NOBODY, spoil
from tests.live import free_port, run_daemon, write_config
from tests.mounts import kubelet_mount
from tests.tls import self_signed

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _tls_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key (0600)."""
    return self_signed(directory)


def _signing_key(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "audit-signing.pem"
    path.write_bytes(private_key_pem(nacl.signing.SigningKey.generate()))
    path.chmod(0o600)
    return path


KINDS = ["group-writable", "world-writable", "nobody", "link-outside", "fifo"]


def _settings(env: Env, **overrides: object) -> Settings:
    return Settings(
        plugins_dir=env.plugins,
        keys_dir=env.keys,
        audit_path=env.audit,
        tokens_file=env.tmp / "tokens.toml",
        state_dir=env.tmp / "state",
        environment="development",
        **overrides,  # type: ignore[arg-type]
    )


@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_an_untrustworthy_audit_signing_key_is_refused(env: Env, tmp_path: Path, kind: str) -> None:
    """Refused with `audit_signing_key_insecure` (a FIFO: `config_invalid`), never read."""
    key = _signing_key(tmp_path / "secrets")
    spoil(key, kind, tmp_path / "elsewhere" / "key.pem")
    with pytest.raises(ConfigError) as refused:
        log_options(_settings(env, audit_signing_key=key))
    expected = "config_invalid" if kind == "fifo" else "audit_signing_key_insecure"
    assert refused.value.code == expected, refused.value.message
    assert str(key) in refused.value.message


@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_an_untrustworthy_tls_key_is_refused(env: Env, tmp_path: Path, kind: str) -> None:
    """Refused with `tls_key_insecure` before anything listens (a FIFO never hangs it)."""
    cert, key = _tls_pair(tmp_path / "tls")
    spoil(key, kind, tmp_path / "elsewhere" / "api.key")
    with pytest.raises(ConfigError) as refused:
        tls_context(_settings(env, api_tls_cert=cert, api_tls_key=key))
    expected = "config_invalid" if kind == "fifo" else "tls_key_insecure"
    assert refused.value.code == expected, refused.value.message
    assert str(key) in refused.value.message


def test_keys_in_a_kubelet_secret_mount_are_used(env: Env, tmp_path: Path) -> None:
    """Links inside the Secret's directory are fine; a 0644 default mode only warns."""
    made = _tls_pair(tmp_path / "made")
    tls_dir, audit_dir = tmp_path / "tls", tmp_path / "audit-key"
    tls_dir.mkdir()
    cert = tls_dir / "tls.crt"
    cert.write_bytes(made[0].read_bytes())
    kubelet_mount(tls_dir, {"tls.key": made[1].read_bytes()}, mode=0o644)
    key = tls_dir / "tls.key"
    signing_pem = _signing_key(tmp_path / "k").read_bytes()
    kubelet_mount(audit_dir, {"signing.pem": signing_pem}, mode=0o600)
    signing = audit_dir / "signing.pem"
    settings = _settings(env, api_tls_cert=cert, api_tls_key=key, audit_signing_key=signing)
    assert tls_context(settings) is not None
    assert log_options(settings).signing_key is not None
    warnings = [w for w in preflight(settings) if w.code == "private_key_readable"]
    assert len(warnings) == 1 and "api.tls_key" in warnings[0].message
    assert "defaultMode" in warnings[0].message


@pytest.mark.parametrize("which", ["audit.signing_key", "api.tls_key"])
def test_a_private_key_others_may_read_is_a_preflight_warning(
    env: Env, tmp_path: Path, which: str
) -> None:
    cert, tls_key = _tls_pair(tmp_path / "tls")
    signing = _signing_key(tmp_path / "k")
    settings = _settings(env, api_tls_cert=cert, api_tls_key=tls_key, audit_signing_key=signing)
    assert [w for w in preflight(settings) if w.code == "private_key_readable"] == []
    (signing if which == "audit.signing_key" else tls_key).chmod(0o644)
    warnings = [w for w in preflight(settings) if w.code == "private_key_readable"]
    assert [which in w.message for w in warnings] == [True]


def _config(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[trust]\nmode = "strict"\n')
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o602, 0o606, 0o666, 0o777])
def test_a_config_file_anyone_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_config(tmp_path, mode), environ={})
    assert refused.value.code == "config_file_insecure"
    assert "writable by others" in refused.value.message


@needs_root
def test_a_config_file_another_user_owns_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path, 0o644)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    assert refused.value.code == "config_file_insecure"
    assert str(NOBODY) in refused.value.message


@pytest.mark.parametrize(
    ("mode", "warned"), [(0o600, False), (0o640, False), (0o644, False), (0o664, True)]
)
def test_a_config_file_its_group_may_write_is_a_warning(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    settings = load_settings(_config(tmp_path, mode), environ={})
    codes = [w.code for w in preflight(settings)]
    assert ("config_file_writable" in codes) is warned


def test_a_config_file_in_a_kubelet_configmap_mount_loads(tmp_path: Path) -> None:
    """ConfigMaps are mounted 0644 root-owned behind `..data` links: fine."""
    kubelet_mount(tmp_path / "cm", {"config.toml": b'[trust]\nmode = "warn"\n'}, mode=0o644)
    path = tmp_path / "cm" / "config.toml"
    assert load_settings(path, environ={}).trust_mode.value == "warn"


@pytest.mark.parametrize(
    ("what", "says"),
    [("config", "writable by others"), ("signing_key", "may not be trusted")],
)
def test_the_daemon_does_not_start_on_an_untrustworthy_file(
    env: Env, tmp_path: Path, what: str, says: str
) -> None:
    """A real daemon exits 1 and says why on stderr, before it is ready."""
    root = tmp_path / "d"
    root.mkdir()
    key = _signing_key(tmp_path / "k")
    audit = root / "log" / "audit.jsonl"
    port = free_port()
    tokens = write_tokens(root / "tokens.toml", {"root": PERMISSIONS})
    config = write_config(root, plugins=env.plugins, keys=env.keys, audit=audit, port=port)
    environ = {}
    if what == "config":
        config.chmod(0o646)
    else:
        key.chmod(0o622)
        environ["AISOC_PLUGIND__AUDIT__SIGNING_KEY"] = str(key)
    with run_daemon(
        root, config, port=port, token=tokens["root"], audit=audit, env=environ, wait_ready=False
    ) as d:
        assert wait_exit(d, 60) == 1
        stderr = d.stderr_text()
        assert says in stderr, stderr
        assert d.events("daemon.ready") == []
