"""Manifest parsing: every bad input is a ManifestError with a stable code, never a crash."""

from __future__ import annotations

import json

import pytest
import yaml

from aisoc_plugind.core import documents, manifest
from aisoc_plugind.errors import ManifestError

GOOD = "id: acme.shodan\nname: Shodan\nversion: 1.0.0\nplugin_type: enricher\n"


def _codes(data: str | bytes, source: str = "plugin.yaml") -> set[str]:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(ManifestError) as info:
        manifest.parse(raw, source)
    return {p.code for p in info.value.problems}


def test_valid_yaml_manifest_parses() -> None:
    """A minimal manifest gives its fields and the default entry point."""
    m = manifest.parse(GOOD.encode())
    assert (m.id, m.name, m.version, m.plugin_type, m.entry_point) == (
        "acme.shodan",
        "Shodan",
        "1.0.0",
        "enricher",
        "plugin.py",
    )


def test_unknown_keys_are_kept() -> None:
    """Unknown keys are kept (and therefore signed), not rejected."""
    m = manifest.parse((GOOD + "x_vendor: {a: 1}\n").encode())
    assert m.as_json()["x_vendor"] == {"a": 1}


def test_legacy_json_manifest_parses() -> None:
    """aisoc-plugin.json is read as JSON."""
    doc = {"id": "acme.x", "name": "X", "version": "1", "plugin_type": "widget"}
    assert manifest.parse(json.dumps(doc).encode(), "aisoc-plugin.json").id == "acme.x"


@pytest.mark.parametrize("field", ["id", "name", "version", "plugin_type"])
def test_missing_required_field(field: str) -> None:
    """Each required field missing is reported with its name."""
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(field + ":"))
    with pytest.raises(ManifestError) as info:
        manifest.parse(text.encode())
    assert [(p.field, p.code) for p in info.value.problems] == [(field, "manifest_missing_field")]


def test_every_problem_is_listed_at_once() -> None:
    """Several problems come back together, under the umbrella code."""
    with pytest.raises(ManifestError) as info:
        manifest.parse(b"id: ../escape\nplugin_type: virus\nversion: 1.0\n")
    fields = {p.field for p in info.value.problems}
    assert {"id", "plugin_type", "name", "version"} <= fields
    assert info.value.code == "manifest_invalid"


@pytest.mark.parametrize(
    "bad_id", ["../escape", "a", "-lead", "a/b", "x" * 65, "sp ace", "nul\x00", "é-accent"]
)
def test_bad_id_is_refused(bad_id: str) -> None:
    """Ids outside ^[A-Za-z0-9][A-Za-z0-9._-]{1,63}$ are refused (no path tricks)."""
    doc = {"id": bad_id, "name": "n", "version": "1", "plugin_type": "action"}
    assert _codes(json.dumps(doc), "aisoc-plugin.json") == {"manifest_bad_id"}


def test_bad_plugin_type_is_refused() -> None:
    """plugin_type must be one of the six types."""
    assert _codes(GOOD.replace("enricher", "rootkit")) == {"manifest_bad_type"}


@pytest.mark.parametrize("entry", ["../x.py", "/etc/x.py", "a/../b.py", "x.pyc", "x-y.py"])
def test_bad_entry_point_is_refused(entry: str) -> None:
    """entry_point must be a relative module path inside the plugin."""
    assert _codes(GOOD + f"entry_point: {json.dumps(entry)}\n") == {"manifest_bad_field"}


def test_unquoted_number_version_is_refused_with_hint() -> None:
    """`version: 1.0` is a float in YAML; the error says to quote it."""
    with pytest.raises(ManifestError) as info:
        manifest.parse(GOOD.replace("1.0.0", "1.0").encode())
    assert "quote it" in info.value.message


def test_bad_yaml_syntax() -> None:
    """YAML that does not parse is manifest_bad_syntax."""
    assert _codes("id: [unclosed\n") == {"manifest_bad_syntax"}


def test_bad_json_syntax() -> None:
    """JSON that does not parse is manifest_bad_syntax."""
    assert _codes("{'id': 1}", "aisoc-plugin.json") == {"manifest_bad_syntax"}


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['id']",
        "!!python/name:os.system",
        "!!python/object:object {}",
    ],
)
def test_yaml_python_tags_are_refused(tag: str) -> None:
    """Python object tags never construct anything."""
    assert _codes(GOOD + f"x: {tag}\n") == {"manifest_unsafe_yaml"}


def test_yaml_alias_bomb_is_refused() -> None:
    """Aliases are refused outright, so a billion-laughs document costs nothing."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert _codes(GOOD + bomb) == {"manifest_bad_syntax"}


def test_oversized_manifest_is_refused_before_parsing() -> None:
    """Manifests over 64 KiB are refused by size."""
    assert _codes(GOOD + "# " + "x" * manifest.MAX_MANIFEST_BYTES) == {"manifest_too_large"}


def test_duplicate_yaml_key_is_refused() -> None:
    """Two parsers must not read one manifest two ways: duplicate keys are errors."""
    assert _codes(GOOD + "id: other.id\n") == {"manifest_duplicate_key"}


def test_duplicate_json_key_is_refused() -> None:
    """Same for the legacy JSON manifest."""
    text = '{"id":"a.b","id":"c.d","name":"n","version":"1","plugin_type":"action"}'
    assert _codes(text, "aisoc-plugin.json") == {"manifest_duplicate_key"}


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "null\n"])
def test_non_mapping_is_refused(text: str) -> None:
    """A manifest must be a mapping."""
    assert _codes(text) == {"manifest_not_mapping"}


def test_value_without_json_form_is_refused() -> None:
    """A YAML date cannot be signed canonically: refused, with the field named."""
    with pytest.raises(ManifestError) as info:
        manifest.parse((GOOD + "released: 2024-01-01\n").encode())
    assert info.value.problems[0].field == "released"


def test_non_utf8_is_refused() -> None:
    """Manifests are UTF-8."""
    assert _codes(b"id: \xff\xfe\n") == {"manifest_bad_syntax"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("tags", "not-a-list"), ("tags", [1, 2]), ("config_schema", ["x"]), ("name", " ")],
)
def test_bad_field_shapes(field: str, value: object) -> None:
    """Fields must have their documented shapes."""
    base = "\n".join(line for line in GOOD.splitlines() if not line.startswith(field + ":"))
    assert _codes(base + f"\n{field}: {json.dumps(value)}\n") == {"manifest_bad_field"}


@pytest.mark.parametrize(
    ("data", "source"),
    [
        (b"id: " + b"[" * 2000 + b"]" * 2000, "plugin.yaml"),
        (b'{"id": ' + b"[" * 20000 + b"]" * 20000 + b"}", "aisoc-plugin.json"),
    ],
)
def test_deep_nesting_is_an_error_not_a_crash(data: bytes, source: str) -> None:
    """Nesting past the recursion limit is manifest_too_deep (it used to escape as a crash)."""
    assert _codes(data, source) == {"manifest_too_deep"}


@pytest.mark.parametrize(
    "extra",
    [
        "extra: &x {a: 1}\nother: *x\n",  # a plain alias
        "base: &b [1, 2]\nlist: *b\n",
        "m: {<<: {a: 1}, b: 2}\n",  # a merge key, even without an alias
        "r: &r [*r]\n",  # a recursive alias
    ],
)
def test_aliases_and_merge_keys_are_refused(extra: str) -> None:
    """Node reuse of any kind (alias, recursion) and merge keys never construct."""
    codes = _codes(GOOD + extra)
    assert codes <= {"manifest_bad_syntax", "manifest_unsafe_yaml"} and codes


def test_yaml_tags_are_refused() -> None:
    """Python object tags are refused by the safe construction."""
    assert _codes(GOOD + "x: !!python/object/apply:os.system ['true']\n") == {
        "manifest_unsafe_yaml"
    }


# ---- the fast strict builder gives what PyYAML's safe construction gives ------------------

SAME_AS_SAFE_LOAD = [
    "a: 1\nb: 1.5\nc: true\nd: null\ne: ~\nf: 'x'\ng: \"y\"\nh: 0x1F\ni: 1_000\nj: -2\n",
    "list: [1, two, 3.0, null, false]\nnested: {k: {k2: [a, {b: c}]}}\n",
    "multi: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
    "date: 2026-11-26\nstamp: 2026-11-26T10:00:00Z\n",
    "inf: .inf\nnan_key: x\nbool_words: [yes, no, on, off]\nempty: \n",
    "explicit_str: !!str 12\nexplicit_int: !!int '7'\nexplicit_float: !!float '1'\n",
    "seq_of_maps:\n  - {a: 1}\n  - {b: 2}\n- \n".replace("- \n", ""),
    "unicode: \u00e9\u00e8 \u2603\nkey with spaces: v\n'quoted key': 1\n? complex\n: value\n",
    "",
    "just a string",
    "[1, 2, 3]",
]


@pytest.mark.parametrize("text", SAME_AS_SAFE_LOAD)
def test_the_strict_builder_matches_safe_load(text: str) -> None:
    """What is not refused constructs exactly as yaml.safe_load constructs it."""
    assert documents._load_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "extra", ["s: !!set {a, b}\n", "o: !!omap [a: 1, b: 2]\n", "b: !!binary aGVsbG8=\n"]
)
def test_tags_outside_the_json_core_are_refused_before_construction(extra: str) -> None:
    """Only !!str, !!int, !!float, !!bool, !!null, !!map and !!seq may be written out."""
    assert _codes(GOOD + extra) == {"manifest_unsafe_yaml"}


@pytest.mark.parametrize(
    "text",
    [
        "a: &x [1, 2]\nb: !!omap [k: *x]\n",  # an alias into an explicitly tagged node
        "a: !!omap [k: &x [1]]\nb: *x\n",  # an alias out of one
        "a: &x v\nb: !!python/tuple [*x]\n",
    ],
)
def test_aliases_across_explicit_tags_are_refused(text: str) -> None:
    codes = _codes(GOOD + text)
    assert codes <= {"manifest_bad_syntax", "manifest_unsafe_yaml"} and codes
