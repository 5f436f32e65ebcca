"""Tests of `aisoc plugin new|validate|keygen|sign|verify|package` (daemon/authoring.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from aisoc_plugind.authoring import packaging, scaffold, validate
from aisoc_plugind.cli.main import run_aisoc
from aisoc_plugind.core.manifest import PLUGIN_TYPES
from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.core.signing import plugin_digest
from aisoc_plugind.engine.bundle import read_bundle
from tests.conftest import UNTRUSTED_PUB, VECTOR_KEY, VECTOR_PUB, VECTORS, copy_tree

VECTOR_PLUGINS = ("geoip-enricher", "legacy-connector")
COMMANDS = ("new", "validate", "keygen", "sign", "verify", "package")
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

VALID_MANIFEST = """\
id: example.ok
name: OK
version: 1.0.0
plugin_type: action
"""
VALID_CODE = "class Plugin:\n    def run(self, payload, context):\n        return {'ok': True}\n"


# ---- helpers -------------------------------------------------------------------------------


def cli(*argv: str | Path) -> int:
    """Run `aisoc plugin ARGV` in-process and return its exit status."""
    return run_aisoc(["plugin", *(str(a) for a in argv)])


def copy_vector(tmp_path: Path, name: str) -> Path:
    """Copy a read-only vector plugin into tmp_path and make the copy writable."""
    return copy_tree(VECTORS / "plugins" / name, tmp_path / name)


def make_plugin(root: Path, files: dict[str, str]) -> Path:
    """Write a plugin directory from `{relative path: text}`."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def valid_plugin(tmp_path: Path, name: str = "ok") -> Path:
    """Write a minimal valid plugin."""
    return make_plugin(tmp_path / name, {"plugin.yaml": VALID_MANIFEST, "plugin.py": VALID_CODE})


def keys_dir_with(tmp_path: Path, *pems: Path) -> Path:
    """Return a fresh trusted-keys directory holding copies of the given PEM files."""
    keys = tmp_path / "trusted"
    keys.mkdir(exist_ok=True)
    for pem in pems:
        shutil.copyfile(pem, keys / pem.name)
    return keys


def private_vector_key(tmp_path: Path) -> Path:
    """Copy the vector signer's private key to a 0600 file."""
    key = tmp_path / "vector-signer.key"
    shutil.copyfile(VECTOR_KEY, key)
    key.chmod(0o600)
    return key


def digest_of(plugin_dir: Path) -> bytes:
    """Compute the daemon's digest of a plugin directory."""
    bundle = read_bundle(plugin_dir)
    manifest = parse_manifest(bundle.manifest_bytes, bundle.manifest_name)
    return plugin_digest(manifest.as_json(), bundle.sources)


def vectors_json() -> dict[str, dict[str, str]]:
    """Return the per-plugin entries of vectors.json."""
    plugins: dict[str, dict[str, str]] = json.loads((VECTORS / "vectors.json").read_text())[
        "plugins"
    ]
    return plugins


def openssl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run openssl and return the completed process (never raises on failure)."""
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False, timeout=30
    )


def tar_members(archive: Path) -> list[tarfile.TarInfo]:
    """Return the members of a .tar.gz in archive order."""
    with tarfile.open(archive, "r:gz") as tar:
        return tar.getmembers()


def sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--help` exits 0 and ends with a worked example."""
    assert cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"aisoc plugin {command}" in out.split("example:")[1]


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`aisoc plugin` alone returns 2 with a usage message."""
    assert cli() == 2
    assert "usage: aisoc plugin" in capsys.readouterr().err


def test_missing_required_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing required option returns 2, not 1."""
    assert cli("sign", "--plugin-dir", "x") == 2
    assert "--private-key" in capsys.readouterr().err


def test_failure_is_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An operation that fails prints exactly one `aisoc plugin CMD: error:` line."""
    assert cli("validate", tmp_path / "missing") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("aisoc plugin validate: error: ")


# ---- new -------------------------------------------------------------------------------------


def test_templates_exist_for_every_plugin_type() -> None:
    """Every manifest plugin type has a template."""
    assert set(scaffold.PLUGIN_TYPES) == PLUGIN_TYPES
    assert all(scaffold.template(t).code for t in scaffold.PLUGIN_TYPES)


def test_new_creates_manifest_code_test_and_readme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`new` writes plugin.yaml, plugin.py, a test module and a README."""
    target = tmp_path / "geo"
    assert cli("new", "Geo Tagger", "--type", "enricher", "-o", target, "--author", "A <a@b>") == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "plugin.py",
        "plugin.yaml",
        "test_geo_tagger.py",
    ]
    manifest = parse_manifest((target / "plugin.yaml").read_bytes())
    assert (manifest.id, manifest.name, manifest.plugin_type) == (
        "geo-tagger",
        "Geo Tagger",
        "enricher",
    )
    assert manifest.data["author"] == "A <a@b>"
    assert "created enricher plugin geo-tagger" in capsys.readouterr().out


def test_new_defaults_to_a_directory_named_by_the_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without -o the plugin lands in ./<id>."""
    monkeypatch.chdir(tmp_path)
    assert cli("new", "Alert Chart", "--type", "widget") == 0
    assert (tmp_path / "alert-chart" / "plugin.yaml").is_file()


def test_new_refuses_an_existing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing target directory is refused and left untouched."""
    (tmp_path / "taken").mkdir()
    assert cli("new", "X plugin", "-o", tmp_path / "taken") == 1
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "taken").iterdir()) == []


def test_new_takes_an_explicit_id(tmp_path: Path) -> None:
    """`--id` overrides the id derived from NAME."""
    assert cli("new", "Whatever", "--id", "acme.custom_1", "-o", tmp_path / "p") == 0
    assert parse_manifest((tmp_path / "p" / "plugin.yaml").read_bytes()).id == "acme.custom_1"


def test_new_rejects_an_invalid_id_as_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --id that breaks the manifest id rule is a usage error (2)."""
    assert cli("new", "X", "--id", "bad/id", "-o", tmp_path / "p") == 2
    assert "must match" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_new_rejects_an_unknown_type_as_usage_error(tmp_path: Path) -> None:
    """`--type` outside the manifest's plugin types is a usage error (2)."""
    assert cli("new", "X y", "--type", "scanner", "-o", tmp_path / "p") == 2


def test_new_fails_when_no_id_can_be_derived(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NAME with nothing usable for an id asks for --id."""
    assert cli("new", "!!!", "-o", tmp_path / "p") == 1
    assert "pass --id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("GeoIP Enricher", "geoip-enricher"),
        ("Café  Señal!", "cafe-senal"),
        ("acme.ticket_maker", "acme.ticket_maker"),
        ("  --Lead & Trail--  ", "lead-trail"),
        ("x", None),
        ("日本語", None),
        ("a" * 80, "a" * 64),
    ],
)
def test_derive_id_slugs_the_name(name: str, expected: str | None) -> None:
    """The default id is an ASCII slug of NAME, or None when none fits the id rule."""
    assert scaffold.derive_id(name) == expected


def test_new_manifest_survives_yaml_special_characters(tmp_path: Path) -> None:
    """Quotes, colons and hashes in NAME and author are kept verbatim in the manifest."""
    name, author = 'Tricky: "quoted" #1', "O'Brien: <ob@example.org> # not a comment"
    assert cli("new", name, "--author", author, "-o", tmp_path / "p") == 0
    manifest = parse_manifest((tmp_path / "p" / "plugin.yaml").read_bytes())
    assert (manifest.name, manifest.data["author"]) == (name, author)


# ---- validate --------------------------------------------------------------------------------


def test_validate_accepts_a_generated_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A freshly generated plugin validates with no errors and no warnings."""
    assert cli("new", "Fresh One", "--type", "detection", "-o", tmp_path / "p") == 0
    capsys.readouterr()
    assert cli("validate", tmp_path / "p") == 0
    out = capsys.readouterr().out
    assert "ok: fresh-one 0.1.0 (detection)" in out
    assert "0 error(s), 0 warning(s)" in out


@pytest.mark.parametrize("name", VECTOR_PLUGINS)
def test_validate_accepts_the_vector_plugins(name: str, tmp_path: Path) -> None:
    """Both vector plugins (YAML and legacy JSON manifests) are valid."""
    assert cli("validate", copy_vector(tmp_path, name)) == 0


def test_validate_lists_every_problem_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing field, bad id/type, missing entry point, bad schema, syntax error: all listed."""
    root = make_plugin(
        tmp_path / "bad",
        {
            "plugin.yaml": "id: -nope\nversion: 1.0.0\nplugin_type: scanner\n"
            "entry_point: main.py\nconfig_schema:\n  type: 5\n",
            "plugin.py": "class Plugin:\n    pass\n",
            "helpers/util.py": "def f(:\n    pass\n",
        },
    )
    assert cli("validate", root) == 1
    out = capsys.readouterr().out
    manifest = root / "plugin.yaml"
    for expected in (
        f"{manifest}: error: name: required field is missing [manifest_missing_field]",
        f"{manifest}: error: id: '-nope' must match",
        f"{manifest}: error: plugin_type: 'scanner' is not one of",
        f"{manifest}: error: entry_point: main.py does not exist",
        f"{manifest}: error: config_schema.type: not a valid JSON Schema",
        f"{root / 'helpers/util.py'}:1: error: ",
    ):
        assert expected in out, expected


def test_validate_reports_bad_yaml_with_its_line_and_still_compiles_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest that does not parse is reported with its line; code is still checked."""
    root = make_plugin(
        tmp_path / "bad",
        {
            "plugin.yaml": "id: x1\nname: [unclosed\nversion: 1\n",
            "plugin.py": "def broken(\n",
        },
    )
    assert cli("validate", root) == 1
    out = capsys.readouterr().out
    assert f"{root / 'plugin.yaml'}:" in out
    assert "YAML does not parse" in out
    assert f"{root / 'plugin.py'}:1: error: " in out


def test_validate_reports_bad_json_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A legacy JSON manifest with a syntax error is reported against its file."""
    root = make_plugin(tmp_path / "bad", {"aisoc-plugin.json": '{"id": ', "plugin.py": VALID_CODE})
    assert cli("validate", root) == 1
    assert f"{root / 'aisoc-plugin.json'}:1: error: JSON does not parse" in capsys.readouterr().out


def test_validate_reports_a_missing_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory without a manifest fails with manifest_missing."""
    root = make_plugin(tmp_path / "p", {"plugin.py": VALID_CODE})
    assert cli("validate", root) == 1
    assert "[manifest_missing]" in capsys.readouterr().out


def test_validate_reports_syntax_error_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A syntax error is located as FILE:LINE."""
    root = valid_plugin(tmp_path)
    (root / "plugin.py").write_text(VALID_CODE + "\n\nx = = 1\n")
    assert cli("validate", root) == 1
    assert (
        f"{root / 'plugin.py'}:6: error: invalid syntax [python_syntax_error]"
        in capsys.readouterr().out
    )


def test_validate_reports_a_json_schema_problem_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid nested config_schema names the failing location."""
    root = valid_plugin(tmp_path)
    (root / "plugin.yaml").write_text(
        VALID_MANIFEST + "config_schema:\n  type: object\n  properties:\n"
        "    port: {type: integer, minimum: low}\n"
    )
    assert cli("validate", root) == 1
    assert (
        "config_schema.properties.port.minimum: not a valid JSON Schema" in capsys.readouterr().out
    )


def test_validate_warns_when_the_config_needs_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config_schema an empty config fails is a warning, not an error."""
    root = valid_plugin(tmp_path)
    (root / "plugin.yaml").write_text(
        VALID_MANIFEST + "config_schema:\n  type: object\n  required: [api_key]\n"
    )
    assert cli("validate", root) == 0
    assert "warning: config_schema: an empty plugin config fails it" in capsys.readouterr().out


def test_validate_warns_about_files_the_signature_does_not_cover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data, native, .pth and stray bytecode files are warned about; the plugin stays valid."""
    root = valid_plugin(tmp_path)
    for rel in ("rules.json", "model.pkl", "native.so", "evil.pth", "helpers.pyc", "data/x.txt"):
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert cli("validate", root) == 0
    out = capsys.readouterr().out
    for rel in ("rules.json", "model.pkl", "native.so", "evil.pth", "helpers.pyc", "data/x.txt"):
        assert f"{root / rel}: warning: not covered by plugin.sig" in out, rel
    assert "6 warning(s)" in out


def test_validate_is_quiet_about_docs_caches_and_the_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README, LICENSE, plugin.sig, __pycache__ and editor files raise no warning."""
    root = valid_plugin(tmp_path)
    for rel in (
        "README.md",
        "LICENSE",
        "plugin.sig",
        "__pycache__/plugin.cpython-311.pyc",
        ".git/config",
        "plugin.py~",
        ".plugin.py.swp",
        ".DS_Store",
    ):
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert cli("validate", root) == 0
    out = capsys.readouterr().out
    assert ": warning:" not in out
    assert "0 error(s), 0 warning(s)" in out


def test_validate_refuses_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink inside the plugin is an error (the daemon refuses links)."""
    root = valid_plugin(tmp_path)
    (root / "link.py").symlink_to(root / "plugin.py")
    assert cli("validate", root) == 1
    assert f"{root / 'link.py'}: error: a symlink" in capsys.readouterr().out


def test_validate_refuses_a_private_key_in_the_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PEM private key inside the plugin directory is an error."""
    root = valid_plugin(tmp_path)
    shutil.copyfile(VECTOR_KEY, root / "signing.key")
    assert cli("validate", root) == 1
    assert "[private_key_in_plugin]" in capsys.readouterr().out


def test_validate_warns_when_the_entry_module_binds_no_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry module without a top-level `Plugin` gets a warning."""
    root = valid_plugin(tmp_path)
    (root / "plugin.py").write_text("class Plugn:\n    pass\n")
    assert cli("validate", root) == 0
    assert "[plugin_class_missing]" in capsys.readouterr().out


def test_validate_accepts_a_plugin_imported_from_a_helper(tmp_path: Path) -> None:
    """`from .impl import Plugin` counts as defining Plugin."""
    root = valid_plugin(tmp_path)
    (root / "impl.py").write_text(VALID_CODE)
    (root / "plugin.py").write_text("from .impl import Plugin\n\n__all__ = ['Plugin']\n")
    report = validate.validate_plugin(root)
    assert report.findings == ()


def test_validate_refuses_a_linked_plugin_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plugin directory that is itself a symlink is refused, as the daemon refuses it."""
    (tmp_path / "link").symlink_to(valid_plugin(tmp_path))
    assert cli("validate", tmp_path / "link") == 1
    assert "is a symlink" in capsys.readouterr().err


def test_validate_warns_when_both_manifests_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With plugin.yaml and aisoc-plugin.json, the ignored JSON manifest is pointed out."""
    root = valid_plugin(tmp_path)
    (root / "aisoc-plugin.json").write_text('{"id": "other"}')
    assert cli("validate", root) == 0
    assert f"{root / 'aisoc-plugin.json'}: warning: ignored" in capsys.readouterr().out


def test_validate_reports_compile_warnings_with_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compile-time warning (invalid escape sequence) is a located warning, not an error."""
    root = valid_plugin(tmp_path)
    (root / "helpers.py").write_text('import re\n\nPATTERN = re.compile("\\d+")\n')
    assert cli("validate", root) == 0
    assert f"{root / 'helpers.py'}:3: warning: invalid escape sequence" in capsys.readouterr().out


def test_validate_fails_on_signed_code_that_packages_would_drop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A *.py file inside .git is signed by the daemon but not packaged: an error."""
    root = valid_plugin(tmp_path)
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "hooks" / "hook.py").write_text("x = 1\n")
    assert cli("validate", root) == 1
    assert "[file_excluded_but_signed]" in capsys.readouterr().out


# ---- keygen ----------------------------------------------------------------------------------


def test_keygen_writes_a_0600_private_key_and_a_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes PKCS#8 signing.key with mode 0600 and SPKI signing.pub."""
    assert cli("keygen", "--out", tmp_path / "keys") == 0
    key, pub = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert "public key:" in capsys.readouterr().out


def test_keygen_refuses_to_overwrite_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing signing.key is never replaced."""
    assert cli("keygen", "--out", tmp_path) == 0
    before = (tmp_path / "signing.key").read_bytes()
    assert cli("keygen", "--out", tmp_path) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "signing.key").read_bytes() == before


def test_keygen_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    """An existing signing.pub also stops keygen, before any private key is written."""
    (tmp_path / "signing.pub").write_text("old")
    assert cli("keygen", "--out", tmp_path) == 1
    assert not (tmp_path / "signing.key").exists()


def test_keygen_keys_load_with_cryptography(tmp_path: Path) -> None:
    """`cryptography` reads both files as one Ed25519 key pair."""
    assert cli("keygen", "--out", tmp_path) == 0
    private = load_pem_private_key((tmp_path / "signing.key").read_bytes(), password=None)
    public = load_pem_public_key((tmp_path / "signing.pub").read_bytes())
    assert isinstance(private, Ed25519PrivateKey)
    assert isinstance(public, Ed25519PublicKey)
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw == public.public_bytes(Encoding.Raw, PublicFormat.Raw)


@needs_openssl
def test_keygen_keys_are_readable_by_openssl(tmp_path: Path) -> None:
    """`openssl pkey` reads signing.key and derives exactly signing.pub from it."""
    assert cli("keygen", "--out", tmp_path) == 0
    derived = openssl("pkey", "-in", tmp_path / "signing.key", "-pubout")
    assert derived.returncode == 0, derived.stderr
    assert derived.stdout == (tmp_path / "signing.pub").read_text()
    assert openssl("pkey", "-pubin", "-in", tmp_path / "signing.pub", "-noout").returncode == 0


# ---- sign ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VECTOR_PLUGINS)
def test_sign_reproduces_the_vector_signature(name: str, tmp_path: Path) -> None:
    """Signing a vector plugin with the vector key rewrites its plugin.sig byte for byte."""
    plugin = copy_vector(tmp_path, name)
    expected = (plugin / "plugin.sig").read_bytes()
    (plugin / "plugin.sig").unlink()
    assert cli("sign", "--plugin-dir", plugin, "--private-key", private_vector_key(tmp_path)) == 0
    assert (plugin / "plugin.sig").read_bytes() == expected
    assert expected.decode() == vectors_json()[name]["plugin_sig"]


def test_sign_prints_the_digest_and_covered_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sign reports the digest the daemon will compute and every covered file."""
    plugin = copy_vector(tmp_path, "geoip-enricher")
    assert cli("sign", "--plugin-dir", plugin, "--private-key", private_vector_key(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"digest: {vectors_json()['geoip-enricher']['digest_sha256_hex']}" in out
    assert "helpers/__init__.py, helpers/lookup.py, plugin.py" in out


def test_sign_writes_128_lowercase_hex_without_newline(tmp_path: Path) -> None:
    """plugin.sig is exactly 128 lowercase hex characters."""
    plugin = valid_plugin(tmp_path)
    assert cli("sign", "--plugin-dir", plugin, "--private-key", private_vector_key(tmp_path)) == 0
    data = (plugin / "plugin.sig").read_bytes()
    assert len(data) == 128
    assert data == data.lower()
    bytes.fromhex(data.decode("ascii"))


def test_sign_writes_to_the_out_file(tmp_path: Path) -> None:
    """--out puts the signature elsewhere and leaves the plugin untouched."""
    plugin = valid_plugin(tmp_path)
    out = tmp_path / "detached.sig"
    assert (
        cli(
            "sign",
            "--plugin-dir",
            plugin,
            "--private-key",
            private_vector_key(tmp_path),
            "--out",
            out,
        )
        == 0
    )
    assert len(out.read_bytes()) == 128
    assert not (plugin / "plugin.sig").exists()


def test_sign_refuses_an_invalid_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid plugin is not signed; the error names the first problem."""
    plugin = make_plugin(tmp_path / "bad", {"plugin.yaml": "id: x1\n", "plugin.py": VALID_CODE})
    assert cli("sign", "--plugin-dir", plugin, "--private-key", private_vector_key(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("aisoc plugin sign: error: ")
    assert "is not a valid plugin" in err
    assert err.count("\n") == 1
    assert not (plugin / "plugin.sig").exists()


def test_sign_rejects_a_public_key_given_as_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A public key passed as --private-key is a clear error."""
    plugin = valid_plugin(tmp_path)
    assert cli("sign", "--plugin-dir", plugin, "--private-key", VECTOR_PUB) == 1
    assert "expected a PRIVATE KEY PEM block, found PUBLIC KEY" in capsys.readouterr().err


def test_sign_explains_that_encrypted_keys_need_decrypting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An encrypted PKCS#8 key is refused with the openssl command that decrypts it."""
    key = tmp_path / "enc.key"
    key.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    assert cli("sign", "--plugin-dir", valid_plugin(tmp_path), "--private-key", key) == 1
    assert "openssl pkey -in" in capsys.readouterr().err


def test_sign_warns_about_a_key_readable_by_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group/world-readable private key is signed with, but warned about."""
    key = private_vector_key(tmp_path)
    key.chmod(0o644)
    assert cli("sign", "--plugin-dir", valid_plugin(tmp_path), "--private-key", key) == 0
    assert "warning: " in capsys.readouterr().err


def test_sign_reports_a_missing_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key path that does not exist fails with one error line naming it."""
    assert (
        cli("sign", "--plugin-dir", valid_plugin(tmp_path), "--private-key", tmp_path / "nope.key")
        == 1
    )
    assert f"{tmp_path / 'nope.key'}: No such file or directory" in capsys.readouterr().err


@needs_openssl
def test_openssl_verifies_our_signature_over_the_digest(tmp_path: Path) -> None:
    """`openssl pkeyutl -verify -rawin` accepts plugin.sig over the 32-byte digest."""
    assert cli("keygen", "--out", tmp_path / "keys") == 0
    plugin = valid_plugin(tmp_path)
    assert (
        cli("sign", "--plugin-dir", plugin, "--private-key", tmp_path / "keys" / "signing.key") == 0
    )
    (tmp_path / "digest.bin").write_bytes(digest_of(plugin))
    (tmp_path / "sig.bin").write_bytes(bytes.fromhex((plugin / "plugin.sig").read_text()))
    result = openssl(
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        tmp_path / "keys" / "signing.pub",
        "-rawin",
        "-in",
        tmp_path / "digest.bin",
        "-sigfile",
        tmp_path / "sig.bin",
    )
    assert result.returncode == 0, result.stderr
    assert "Signature Verified Successfully" in result.stdout


@needs_openssl
def test_sign_accepts_a_key_generated_by_openssl(tmp_path: Path) -> None:
    """A key from `openssl genpkey -algorithm ed25519` signs; its OpenSSL public key verifies."""
    key, pub = tmp_path / "ossl.key", tmp_path / "trusted" / "ossl.pem"
    pub.parent.mkdir()
    assert openssl("genpkey", "-algorithm", "ed25519", "-out", key).returncode == 0
    assert openssl("pkey", "-in", key, "-pubout", "-out", pub).returncode == 0
    plugin = valid_plugin(tmp_path)
    assert cli("sign", "--plugin-dir", plugin, "--private-key", key) == 0
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", pub.parent) == 0


# ---- verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VECTOR_PLUGINS)
def test_verify_accepts_the_vectors_with_the_signer_key(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The vector plugins verify under vector-signer.pem, with its key id and digest."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    assert cli("verify", "--plugin-dir", copy_vector(tmp_path, name), "--keys-dir", keys) == 0
    out = capsys.readouterr().out
    assert "status: verified" in out
    assert "key id: vector-signer" in out
    assert f"digest: {vectors_json()[name]['digest_sha256_hex']}" in out


@pytest.mark.parametrize("name", VECTOR_PLUGINS)
def test_verify_refuses_the_vectors_under_the_untrusted_key(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With only untrusted-signer.pem trusted, the vector plugins are invalid (exit 1)."""
    keys = keys_dir_with(tmp_path, UNTRUSTED_PUB)
    assert cli("verify", "--plugin-dir", copy_vector(tmp_path, name), "--keys-dir", keys) == 1
    captured = capsys.readouterr()
    assert "status: invalid" in captured.out
    assert "key id: -" in captured.out
    assert "aisoc plugin verify: error: " in captured.err


def test_verify_lists_what_was_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify names the manifest and every *.py file the digest covers."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    plugin = copy_vector(tmp_path, "geoip-enricher")
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 0
    out = capsys.readouterr().out
    assert "checked: plugin.yaml (minus signature, trust) and 3 Python file(s):" in out
    assert "  helpers/__init__.py\n  helpers/lookup.py\n  plugin.py\n" in out


def test_verify_detects_a_changed_source_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Editing a signed *.py file makes the signature invalid."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    plugin = copy_vector(tmp_path, "geoip-enricher")
    with (plugin / "helpers" / "lookup.py").open("a") as fh:
        fh.write("# changed\n")
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 1
    assert "matches none of the 1 trusted key(s)" in capsys.readouterr().out


def test_verify_ignores_unsigned_manifest_keys(tmp_path: Path) -> None:
    """Changing the manifest's `signature`/`trust` keys keeps the plugin verified."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    plugin = copy_vector(tmp_path, "geoip-enricher")
    text = (plugin / "plugin.yaml").read_text().replace("trust: ignored-by-digest", "trust: x")
    (plugin / "plugin.yaml").write_text(text)
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 0


def test_verify_reports_an_unsigned_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without plugin.sig the status is unsigned and the hint says to sign."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    assert cli("verify", "--plugin-dir", valid_plugin(tmp_path), "--keys-dir", keys) == 1
    captured = capsys.readouterr()
    assert "status: unsigned" in captured.out
    assert "no plugin.sig file" in captured.err
    assert "aisoc plugin sign" in captured.err


def test_verify_reports_a_badly_encoded_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plugin.sig that is neither hex nor raw bytes is invalid, with the reason."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    plugin = valid_plugin(tmp_path)
    (plugin / "plugin.sig").write_text("not a signature")
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 1
    captured = capsys.readouterr()
    assert "status: invalid" in captured.out
    assert "128 hex characters" in captured.err


def test_verify_accepts_a_raw_64_byte_signature(tmp_path: Path) -> None:
    """A plugin.sig holding the 64 raw signature bytes verifies too (INTERFACE §4)."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    plugin = copy_vector(tmp_path, "legacy-connector")
    raw = bytes.fromhex((plugin / "plugin.sig").read_text())
    (plugin / "plugin.sig").write_bytes(raw)
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 0


def test_verify_warns_about_unusable_key_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed key file is skipped with a warning; the good key still verifies."""
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    (keys / "broken.pem").write_text("garbage")
    plugin = copy_vector(tmp_path, "legacy-connector")
    assert cli("verify", "--plugin-dir", plugin, "--keys-dir", keys) == 0
    assert "broken.pem skipped" in capsys.readouterr().err


def test_verify_fails_on_a_missing_keys_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A keys directory that does not exist is an error, not an empty keyring."""
    assert (
        cli("verify", "--plugin-dir", valid_plugin(tmp_path), "--keys-dir", tmp_path / "nokeys")
        == 1
    )
    assert "no such keys directory" in capsys.readouterr().err


# ---- package ---------------------------------------------------------------------------------


def signed_vector(tmp_path: Path) -> Path:
    """Return a writable copy of the signed geoip-enricher vector plugin."""
    return copy_vector(tmp_path, "geoip-enricher")


def test_package_is_reproducible(tmp_path: Path) -> None:
    """Two runs over the same plugin give byte-identical archives."""
    plugin = signed_vector(tmp_path)
    assert cli("package", plugin, "-o", tmp_path / "a.tar.gz") == 0
    assert cli("package", plugin, "-o", tmp_path / "b.tar.gz") == 0
    assert sha256(tmp_path / "a.tar.gz") == sha256(tmp_path / "b.tar.gz")


def test_package_ignores_file_times_owners_and_modes(tmp_path: Path) -> None:
    """Different mtimes and permission bits on disk give the same archive bytes."""
    plugin = signed_vector(tmp_path)
    assert cli("package", plugin, "-o", tmp_path / "a.tar.gz") == 0
    for i, path in enumerate(sorted(plugin.rglob("*"))):
        os.utime(path, (1_000_000 + i * 7919, 1_500_000_000 + i * 104729))
    (plugin / "plugin.py").chmod(0o755)
    assert cli("package", plugin, "-o", tmp_path / "b.tar.gz") == 0
    assert sha256(tmp_path / "a.tar.gz") == sha256(tmp_path / "b.tar.gz")


def test_package_normalises_entries(tmp_path: Path) -> None:
    """Entries sit under <id>/, sorted, owned by 0:0 with no names, mode 0644/0755, mtime 0."""
    plugin = signed_vector(tmp_path)
    (plugin / "plugin.py").chmod(0o700)
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 0
    members = tar_members(tmp_path / "p.tar.gz")
    top = "example.geoip-enricher"
    assert [m.name for m in members] == [
        top,
        f"{top}/README.md",
        f"{top}/helpers",
        f"{top}/helpers/__init__.py",
        f"{top}/helpers/lookup.py",
        f"{top}/plugin.py",
        f"{top}/plugin.sig",
        f"{top}/plugin.yaml",
    ]
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.isdir() or m.isfile()


def test_package_gzip_header_has_no_time_or_name(tmp_path: Path) -> None:
    """The gzip header carries mtime 0 and no original file name."""
    assert cli("package", signed_vector(tmp_path), "-o", tmp_path / "p.tar.gz") == 0
    header = (tmp_path / "p.tar.gz").read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME flag
    assert header[4:8] == b"\0\0\0\0"


def test_package_uses_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SOURCE_DATE_EPOCH sets every entry's mtime."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert cli("package", signed_vector(tmp_path), "-o", tmp_path / "p.tar.gz") == 0
    assert {m.mtime for m in tar_members(tmp_path / "p.tar.gz")} == {1700000000}


def test_package_rejects_a_malformed_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SOURCE_DATE_EPOCH that is not an integer fails instead of being ignored."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert cli("package", signed_vector(tmp_path), "-o", tmp_path / "p.tar.gz") == 1


def test_package_excludes_caches_vcs_and_editor_files(tmp_path: Path) -> None:
    """__pycache__, *.pyc, .git, .hg, .svn, .DS_Store and editor temp files are left out."""
    plugin = signed_vector(tmp_path)
    for rel in (
        "__pycache__/plugin.cpython-311.pyc",
        "helpers/__pycache__/lookup.cpython-311.pyc",
        "stray.pyc",
        ".git/HEAD",
        ".hg/store",
        ".svn/entries",
        ".DS_Store",
        "plugin.py~",
        ".plugin.py.swp",
        "#plugin.py#",
        ".pytest_cache/README.md",
    ):
        (plugin / rel).parent.mkdir(parents=True, exist_ok=True)
        (plugin / rel).write_bytes(b"junk")
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 0
    names = [m.name.split("/", 1)[-1] for m in tar_members(tmp_path / "p.tar.gz")]
    assert names == [
        "example.geoip-enricher",
        "README.md",
        "helpers",
        "helpers/__init__.py",
        "helpers/lookup.py",
        "plugin.py",
        "plugin.sig",
        "plugin.yaml",
    ]


def test_package_keeps_side_files(tmp_path: Path) -> None:
    """Data files are packaged (and warned about by validate)."""
    plugin = signed_vector(tmp_path)
    (plugin / "data").mkdir()
    (plugin / "data" / "countries.json").write_text("{}")
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 0
    names = {m.name for m in tar_members(tmp_path / "p.tar.gz")}
    assert "example.geoip-enricher/data/countries.json" in names


def test_package_refuses_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink anywhere in the plugin stops packaging, naming the link."""
    plugin = signed_vector(tmp_path)
    (plugin / "helpers" / "extra.txt").symlink_to("/etc/hostname")
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 1
    assert "symlink" in capsys.readouterr().err
    assert not (tmp_path / "p.tar.gz").exists()


def test_package_refuses_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A FIFO (not a regular file) stops packaging."""
    plugin = signed_vector(tmp_path)
    os.mkfifo(plugin / "pipe")
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 1
    assert "not a regular file" in capsys.readouterr().err


def test_package_defaults_to_id_and_version_in_the_current_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without -o the archive is ./<id>-<version>.tar.gz."""
    plugin = signed_vector(tmp_path)
    out_dir = tmp_path / "dist"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    assert cli("package", plugin) == 0
    assert (out_dir / "example.geoip-enricher-1.2.0.tar.gz").is_file()
    assert "sha256: " in capsys.readouterr().out


def test_package_creates_the_output_directory(tmp_path: Path) -> None:
    """-o into a directory that does not exist yet creates it."""
    out = tmp_path / "dist" / "nested" / "p.tar.gz"
    assert cli("package", signed_vector(tmp_path), "-o", out) == 0
    assert out.is_file()


def test_package_warns_without_a_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unsigned plugin is packaged with a warning on stderr."""
    assert cli("package", valid_plugin(tmp_path), "-o", tmp_path / "p.tar.gz") == 0
    assert "has no plugin.sig" in capsys.readouterr().err


def test_package_refuses_output_inside_the_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writing the archive into the plugin directory is refused (it would package itself)."""
    plugin = signed_vector(tmp_path)
    assert cli("package", plugin, "-o", plugin / "p.tar.gz") == 1
    assert "inside the plugin directory" in capsys.readouterr().err


def test_package_refuses_an_invalid_plugin(tmp_path: Path) -> None:
    """A plugin that fails validation is not packaged."""
    plugin = make_plugin(tmp_path / "bad", {"plugin.yaml": "id: x1\n", "plugin.py": VALID_CODE})
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 1
    assert not (tmp_path / "p.tar.gz").exists()


def test_packaged_plugin_still_verifies(tmp_path: Path) -> None:
    """Unpacking the archive gives a plugin whose signature verifies: nothing signed was lost."""
    plugin = signed_vector(tmp_path)
    (plugin / "__pycache__").mkdir()
    (plugin / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 0
    with tarfile.open(tmp_path / "p.tar.gz", "r:gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    keys = keys_dir_with(tmp_path, VECTOR_PUB)
    unpacked = tmp_path / "unpacked" / "example.geoip-enricher"
    assert cli("verify", "--plugin-dir", unpacked, "--keys-dir", keys) == 0


def test_package_archive_bytes_match_the_library_call(tmp_path: Path) -> None:
    """The CLI writes exactly what build_package returns."""
    plugin = signed_vector(tmp_path)
    assert cli("package", plugin, "-o", tmp_path / "p.tar.gz") == 0
    built = packaging.build_package(plugin)
    assert (tmp_path / "p.tar.gz").read_bytes() == built.data
    with gzip.open(io.BytesIO(built.data)) as gz:
        assert gz.read(100).startswith(b"example.geoip-enricher")
