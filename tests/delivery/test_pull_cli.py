"""`aisoc plugin pull`: the daemon's pull, extraction and verification, without a daemon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aisoc_plugind.cli.main import run_aisoc
from tests.conftest import VECTOR_PUB
from tests.delivery.pushes import PLUGIN_ID, push_plugin
from tests.oci_registry import (  # noqa: F401 - the fixtures
    RunningRegistry,
    free_port,
    hermetic,  # autouse: no proxy, no Docker config
    oci_auth_registry_fixture,
    oci_registry_fixture,
    oci_tls_registry_fixture,
)

pytestmark = pytest.mark.oci


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A keys dir trusting the test vectors' signer (the key push_plugin signs with)."""
    directory = tmp_path / "keys"
    directory.mkdir()
    shutil.copy(VECTOR_PUB, directory / "vector-signer.pem")
    return directory


def _pull(ref: str, into: Path, keys: Path, *extra: str) -> int:
    return run_aisoc(["plugin", "pull", ref, str(into), "--keys-dir", str(keys), *extra])


def _left(into: Path) -> list[str]:
    return sorted(p.name for p in into.iterdir()) if into.is_dir() else []


def test_pull_places_a_verified_plugin(
    oci_registry: str, tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signed package lands in DIR/<id>, verified by the trusted key; exit 0."""
    ref = push_plugin(oci_registry, tmp_path, "cli-ok", "1.0.0")
    into = tmp_path / "out"
    assert _pull(ref, into, keys, "--insecure") == 0
    out = capsys.readouterr().out
    assert f"pulled {PLUGIN_ID} 1.0.0" in out and "verified by key vector-signer" in out
    assert _left(into) == [PLUGIN_ID]
    assert (into / PLUGIN_ID / "plugin.sig").is_file()


def test_pull_json_output(
    oci_registry: str, tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one object: id, version, digest, path, signature status and key."""
    ref = push_plugin(oci_registry, tmp_path, "cli-json", "1.0.0")
    into = tmp_path / "out"
    assert _pull(ref, into, keys, "--insecure", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "plugin_id": PLUGIN_ID,
        "version": "1.0.0",
        "oci_ref": ref,
        "digest": ref.partition("@")[2],
        "path": str(into / PLUGIN_ID),
        "signature_status": "verified",
        "signing_key_id": "vector-signer",
    }


def test_pull_refuses_an_unsigned_package_in_strict_mode(
    oci_registry: str, tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Strict (the default): exit 1 with the code; nothing is left in DIR."""
    ref = push_plugin(oci_registry, tmp_path, "cli-unsigned", "1.0.0", sign=False)
    into = tmp_path / "out"
    assert _pull(ref, into, keys, "--insecure") == 1
    assert "[signature_unsigned]" in capsys.readouterr().err
    assert _left(into) == []


def test_pull_in_warn_mode_takes_an_unsigned_package(
    oci_registry: str, tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trust-mode warn places an unsigned package and says it is unsigned."""
    ref = push_plugin(oci_registry, tmp_path, "cli-warn", "1.0.0", sign=False)
    into = tmp_path / "out"
    assert _pull(ref, into, keys, "--insecure", "--trust-mode", "warn") == 0
    assert capsys.readouterr().out.strip().endswith(": unsigned")
    assert _left(into) == [PLUGIN_ID]


def test_pull_never_overwrites(
    oci_registry: str, tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing DIR/<id> is left alone: exit 1 plugin_dir_exists, no staging left over."""
    ref = push_plugin(oci_registry, tmp_path, "cli-twice", "1.0.0")
    into = tmp_path / "out"
    assert _pull(ref, into, keys, "--insecure") == 0
    assert _pull(ref, into, keys, "--insecure") == 1
    assert "[plugin_dir_exists]" in capsys.readouterr().err
    assert _left(into) == [PLUGIN_ID]


def test_pull_of_an_unreachable_registry(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: exit 1 with oci_unreachable."""
    host = f"127.0.0.1:{free_port()}"
    ref = f"{host}/aisoc/none@sha256:{'0' * 64}"
    assert _pull(ref, tmp_path / "out", keys, "--insecure") == 1
    assert "[oci_unreachable]" in capsys.readouterr().err


def test_pull_usage_errors(tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed reference, or no --keys-dir, is a usage error (exit 2)."""
    assert _pull("not a ref", tmp_path / "out", keys) == 2
    assert run_aisoc(["plugin", "pull", "ghcr.io/a/b:1", str(tmp_path)]) == 2
    assert "--keys-dir" in capsys.readouterr().err


def test_pull_needs_an_existing_keys_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A keys dir that does not exist fails before any request."""
    assert _pull("ghcr.io/a/b:1", tmp_path / "out", tmp_path / "missing") == 1
    assert "[keys_dir_missing]" in capsys.readouterr().err


def test_pull_from_tls_needs_the_ca(
    oci_tls_registry: RunningRegistry,
    tmp_path: Path,
    keys: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A private-CA registry: oci_tls_error without --ca-file, a verified pull with it."""
    reg = oci_tls_registry
    ref = push_plugin(reg.host, tmp_path, "cli-tls", "1.0.0", ca_file=reg.ca_file)
    into = tmp_path / "out"
    assert _pull(ref, into, keys) == 1
    assert "[oci_tls_error]" in capsys.readouterr().err
    assert _pull(ref, into, keys, "--ca-file", str(reg.ca_file)) == 0
    assert _left(into) == [PLUGIN_ID]


def test_pull_with_wrong_credentials(
    oci_auth_registry: RunningRegistry,
    tmp_path: Path,
    keys: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """htpasswd registry: a wrong password is oci_unauthorized and never printed."""
    reg = oci_auth_registry
    good = reg.docker_config(tmp_path / "good.json")
    ref = push_plugin(
        reg.host, tmp_path, "cli-auth", "1.0.0", ca_file=reg.ca_file, docker_config=good
    )
    secret = "wrong-but-secret-Pa55"
    bad = reg.docker_config(tmp_path / "bad.json", password=secret)
    ca = ["--ca-file", str(reg.ca_file)]
    into = tmp_path / "out"
    assert _pull(ref, into, keys, *ca, "--docker-config", str(bad)) == 1
    captured = capsys.readouterr()
    assert "[oci_unauthorized]" in captured.err
    assert secret not in captured.err + captured.out
    assert _pull(ref, into, keys, *ca, "--docker-config", str(good)) == 0
