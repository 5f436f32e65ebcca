"""Render the files of a new plugin (`aisoc plugin new`) from the templates shipped as data.

`templates/` holds, per plugin type, `plugin.py-tpl` (the Plugin class), `tests.py-tpl` (its
extra tests) and `template.json` (summary, config schema, an example payload and the result
it gives), plus the shared `README.md-tpl`, `test_plugin.py-tpl` and manifest header.
`{{name}}` placeholders are filled; the manifest is written with the YAML dumper and checked
with the daemon's own parser.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from aisoc_plugind.authoring.layout import write_new_file
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.errors import AuthoringError

__all__ = [
    "ENTRY_POINT",
    "INITIAL_VERSION",
    "PLUGIN_TYPES",
    "TypeTemplate",
    "create_plugin",
    "derive_id",
    "generated_test_name",
    "render",
    "template",
]

ENTRY_POINT = "plugin.py"
INITIAL_VERSION = "0.1.0"
PLUGIN_TYPES = tuple(sorted(manifest_mod.PLUGIN_TYPES))
_SLUG_DROP_RE = re.compile(r"[^a-z0-9._-]+")
_SLUG_DASHES_RE = re.compile(r"-{2,}")
_PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeTemplate:
    """What `new` generates for one plugin type, and the example its test checks."""

    summary: str
    code: str
    config_schema: Mapping[str, Any]
    example_payload: Mapping[str, Any]
    example_result: Mapping[str, Any]
    extra_tests: str


def _text(*parts: str) -> str:
    return (
        resources.files("aisoc_plugind.authoring")
        .joinpath("templates", *parts)
        .read_text(encoding="utf-8")
    )


@cache
def template(plugin_type: str) -> TypeTemplate:
    """Return the template of one plugin type (read from the package's data files once)."""
    if plugin_type not in PLUGIN_TYPES:
        raise AuthoringError(f"no template for plugin type {plugin_type!r}")
    meta = json.loads(_text(plugin_type, "template.json"))
    return TypeTemplate(
        summary=meta["summary"],
        code=_text(plugin_type, "plugin.py-tpl"),
        config_schema=meta["config_schema"],
        example_payload=meta["example_payload"],
        example_result=meta["example_result"],
        extra_tests=_text(plugin_type, "tests.py-tpl"),
    )


def derive_id(name: str) -> str | None:
    """Return a manifest id made from a display name (`GeoIP Enricher` -> `geoip-enricher`).

    Accents are folded to ASCII and anything else outside `[a-z0-9._-]` becomes `-`;
    returns None when what is left does not match the manifest's id rule.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = _SLUG_DASHES_RE.sub("-", _SLUG_DROP_RE.sub("-", folded.lower()))
    slug = slug.strip("-._")[:64].rstrip("-._")
    return slug if manifest_mod.ID_RE.fullmatch(slug) else None


def generated_test_name(plugin_id: str) -> str:
    """Return the generated test file's name; unique per plugin so one pytest run can hold many."""
    return f"test_{re.sub(r'[^a-z0-9]+', '_', plugin_id.lower()).strip('_')}.py"


def render(*, plugin_type: str, name: str, plugin_id: str, author: str | None) -> dict[str, str]:
    """Return `{relative path: text}` for a new plugin; the manifest is checked by the parser."""
    tpl = template(plugin_type)
    values = {
        "id": plugin_id,
        "name": name,
        "type": plugin_type,
        "package": "_plugin_under_test_" + re.sub(r"\W", "_", plugin_id),
        "test_module": generated_test_name(plugin_id),
        "payload": _py_literal(tpl.example_payload),
        "result": _py_literal(tpl.example_result),
        "extra_tests": tpl.extra_tests,
        "summary": tpl.summary,
    }
    files = {
        manifest_mod.YAML_MANIFEST: _manifest_text(tpl, name, plugin_id, plugin_type, author),
        ENTRY_POINT: _fill(tpl.code, values),
        values["test_module"]: _fill(_text("test_plugin.py-tpl"), values),
        "README.md": _fill(_text("README.md-tpl"), values),
    }
    # The generated manifest must pass the daemon's own parser; a failure here is our bug.
    manifest_mod.parse(files[manifest_mod.YAML_MANIFEST].encode("utf-8"))
    return files


def create_plugin(
    target: Path, *, name: str, plugin_type: str, plugin_id: str, author: str | None
) -> tuple[str, ...]:
    """Create `target` holding a working plugin of `plugin_type`; refuse an existing path."""
    files = render(plugin_type=plugin_type, name=name, plugin_id=plugin_id, author=author)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.mkdir()
    except FileExistsError as exc:
        raise AuthoringError(
            f"{target} already exists; `new` only creates a new directory (choose another with -o)"
        ) from exc
    try:
        for rel, text in files.items():
            write_new_file(target / rel, text.encode("utf-8"), 0o644)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return tuple(files)


def _manifest_text(
    tpl: TypeTemplate, name: str, plugin_id: str, plugin_type: str, author: str | None
) -> str:
    doc: dict[str, Any] = {
        "id": plugin_id,
        "name": name,
        "version": INITIAL_VERSION,
        "plugin_type": plugin_type,
        "description": tpl.summary,
        **({"author": author} if author else {}),
        "tags": [plugin_type],
        "entry_point": ENTRY_POINT,
        "config_schema": tpl.config_schema,
    }
    body = yaml.safe_dump(
        doc, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return _text("manifest-header.yaml-tpl") + body


def _py_literal(value: Any, indent: int = 0) -> str:
    """Return `value` (JSON-shaped) as Python source, one item a line when it is long."""
    flat = _flat_literal(value)
    if len(flat) + indent <= 60 or not isinstance(value, Mapping | list | tuple):
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, Mapping):
        items = [f"{pad}{json.dumps(k)}: {_py_literal(v, indent + 4)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{_py_literal(v, indent + 4)}," for v in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def _flat_literal(value: Any) -> str:
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)}: {_flat_literal(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flat_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _fill(text: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)
