"""The delivery settings: oci.require_digest, oci.allowed_registries and oci.follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aisoc_plugind.config.settings import OciFollow, load_settings
from aisoc_plugind.errors import ConfigError


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path, {})


def test_defaults_pin_and_allow_any_registry() -> None:
    """Digests are required, every registry is allowed, nothing is followed."""
    s = load_settings(None, {})
    assert (s.oci_require_digest, s.oci_allowed_registries, s.oci_follow) == (True, (), ())


def test_oci_keys_are_read(tmp_path: Path) -> None:
    """The three keys from the file; interval_s defaults to 300."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[oci]\nrequire_digest = false\nallowed_registries = ["ghcr.io", "127.0.0.1:5000"]\n'
        '[[oci.follow]]\nref = "ghcr.io/acme/p:stable"\n'
        '[[oci.follow]]\nref = "ghcr.io/acme/q:stable"\ninterval_s = 60\n'
    )
    s = load_settings(path, {})
    assert not s.oci_require_digest
    assert s.oci_allowed_registries == ("ghcr.io", "127.0.0.1:5000")
    assert s.oci_follow == (
        OciFollow(ref="ghcr.io/acme/p:stable", interval_s=300.0),
        OciFollow(ref="ghcr.io/acme/q:stable", interval_s=60.0),
    )
    shown = json.loads(json.dumps(s.public_view()))
    assert shown["oci_follow"][1] == {"ref": "ghcr.io/acme/q:stable", "interval_s": 60.0}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[oci]\nfollow = "ghcr.io/a/b:1"\n', "array of tables"),
        ("[[oci.follow]]\ninterval_s = 5\n", "needs ref"),
        ('[[oci.follow]]\nref = "ghcr.io/a/b@sha256:00"\n', "not a digest"),
        ('[[oci.follow]]\nref = "ghcr.io/a/b:1"\ninterval_s = 0\n', "positive"),
        ('[[oci.follow]]\nref = "ghcr.io/a/b:1"\nevery = 5\n', "unknown key(s) every"),
        ("[oci]\nrequire_digest = 3\n", "true or false"),
    ],
)
def test_bad_oci_values_are_config_errors(tmp_path: Path, text: str, why: str) -> None:
    """Each problem names its key and says what is wrong."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert "config key oci." in info.value.message and why in info.value.message
