"""Parse and validate plugin manifests (`plugin.yaml`, legacy `aisoc-plugin.json`).

Pure: takes bytes, returns a frozen Manifest or raises ManifestError listing every problem.
The text is loaded strictly by `core.documents` (no tags, aliases or duplicate keys).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aisoc_plugind.core.documents import JSON_MANIFEST, YAML_MANIFEST, load_document
from aisoc_plugind.errors import ManifestError, Problem

__all__ = [
    "ID_RE",
    "JSON_MANIFEST",
    "MANIFEST_NAMES",
    "MAX_MANIFEST_BYTES",
    "PLUGIN_TYPES",
    "REQUIRED",
    "YAML_MANIFEST",
    "Manifest",
    "parse",
    "validate",
]

MANIFEST_NAMES = (YAML_MANIFEST, JSON_MANIFEST)  # preference order: YAML wins
MAX_MANIFEST_BYTES = 64 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,63}$")
PLUGIN_TYPES = frozenset({"enricher", "action", "connector", "responder", "detection", "widget"})
REQUIRED = ("id", "name", "version", "plugin_type")
_STR_FIELDS = (
    "name",
    "version",
    "description",
    "author",
    "homepage",
    "license",
    "min_aisoc_version",
    "entry_point",
    "oci_image",
)
_ENTRY_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*/)*[A-Za-z_][A-Za-z0-9_]*\.py$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A validated manifest; `plain` is the full parsed mapping (unknown keys kept).

    `plain` is shared, never modified: read it (records keep it as their `manifest`); take
    `as_json()` for a copy of your own, and `data` for a read-only view.
    """

    id: str
    name: str
    version: str
    plugin_type: str
    entry_point: str
    source: str
    plain: Mapping[str, Any]

    @property
    def data(self) -> Mapping[str, Any]:
        """Return a read-only view of the manifest mapping (nested mappings and lists too)."""
        frozen: Mapping[str, Any] = _freeze(self.plain)
        return frozen

    def as_json(self) -> dict[str, Any]:
        """Return a copy of the manifest mapping as a plain JSON-ready dict."""
        thawed: dict[str, Any] = _thaw(self.plain)
        return thawed


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def parse(data: bytes, source: str = YAML_MANIFEST) -> Manifest:
    """Parse manifest bytes read from `source` (a file name) and validate them."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_too_large",
                    message=f"{len(data)} bytes, the limit is {MAX_MANIFEST_BYTES}",
                )
            ],
            source=source,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            [Problem(field="", code="manifest_bad_syntax", message="not UTF-8 text")], source=source
        ) from exc
    try:
        return validate(load_document(text, source), source=source)
    except ManifestError:
        raise
    except RecursionError as exc:  # e.g. 2000 nested brackets: an error, not a crash
        raise ManifestError(
            [Problem(field="", code="manifest_too_deep", message="nested too deeply to parse")],
            source=source,
        ) from exc
    except Exception as exc:  # hostile until verified: whatever a parser raises is refused
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_bad_syntax",
                    message=f"cannot be read ({type(exc).__name__})",
                )
            ],
            source=source,
        ) from exc


def validate(loaded: Any, *, source: str = YAML_MANIFEST, checked: bool = False) -> Manifest:
    """Validate an already-parsed manifest mapping; list every problem in one error.

    `checked`: the mapping was validated already, by this same code in a scan worker (only
    the shape is looked at again, not every value).
    """
    if not isinstance(loaded, dict):
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_not_mapping",
                    message="the manifest must be a mapping of keys",
                )
            ],
            source=source,
        )
    problems = list(_problems(loaded, _QUICK_CHECKS if checked else _CHECKS))
    if problems:
        raise ManifestError(problems, source=source)
    return Manifest(
        id=loaded["id"],
        name=loaded["name"],
        version=loaded["version"],
        plugin_type=loaded["plugin_type"],
        entry_point=loaded.get("entry_point", "plugin.py"),
        source=source,
        plain=loaded,
    )


def _problems(
    m: dict[str, Any], checks: tuple[Callable[[dict[str, Any]], list[Problem]], ...]
) -> list[Problem]:
    out: list[Problem] = []
    for check in checks:
        out.extend(check(m))
    return out


def _check_required(m: dict[str, Any]) -> list[Problem]:
    return [
        Problem(field=k, code="manifest_missing_field", message="required field is missing")
        for k in REQUIRED
        if k not in m
    ]


def _check_strings(m: dict[str, Any]) -> list[Problem]:
    return [
        Problem(
            field=k,
            code="manifest_bad_field",
            message=f"must be a non-empty string, found {type(m[k]).__name__}"
            + (" (quote it in YAML)" if isinstance(m[k], int | float) else ""),
        )
        for k in ("id", "plugin_type", *_STR_FIELDS)
        if k in m and (not isinstance(m[k], str) or not m[k].strip())
    ]


def _check_id(m: dict[str, Any]) -> list[Problem]:
    value = m.get("id")
    if isinstance(value, str) and not ID_RE.fullmatch(value):
        return [
            Problem(
                field="id", code="manifest_bad_id", message=f"{value!r} must match {ID_RE.pattern}"
            )
        ]
    return []


def _check_type(m: dict[str, Any]) -> list[Problem]:
    value = m.get("plugin_type")
    if isinstance(value, str) and value not in PLUGIN_TYPES:
        return [
            Problem(
                field="plugin_type",
                code="manifest_bad_type",
                message=f"{value!r} is not one of {', '.join(sorted(PLUGIN_TYPES))}",
            )
        ]
    return []


def _check_entry_point(m: dict[str, Any]) -> list[Problem]:
    value = m.get("entry_point")
    if isinstance(value, str) and not _ENTRY_RE.fullmatch(value):
        return [
            Problem(
                field="entry_point",
                code="manifest_bad_field",
                message=f"{value!r} must be a relative path of Python identifiers "
                "ending in .py (no '..', no absolute path)",
            )
        ]
    return []


def _check_optional_shapes(m: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    tags = m.get("tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        out.append(
            Problem(field="tags", code="manifest_bad_field", message="must be a list of strings")
        )
    schema = m.get("config_schema")
    if schema is not None and not isinstance(schema, dict):
        out.append(
            Problem(
                field="config_schema",
                code="manifest_bad_field",
                message="must be a JSON Schema object",
            )
        )
    return out


def _check_json_values(m: dict[str, Any]) -> list[Problem]:
    bad = _non_json_path(m, "")
    if bad is None:
        return []
    return [
        Problem(
            field=bad,
            code="manifest_bad_field",
            message="value has no JSON form (dates, binary, non-string keys and "
            "NaN cannot be signed); quote it",
        )
    ]


_CHECKS: tuple[Callable[[dict[str, Any]], list[Problem]], ...] = (
    _check_required,
    _check_strings,
    _check_id,
    _check_type,
    _check_entry_point,
    _check_optional_shapes,
    _check_json_values,
)
_QUICK_CHECKS = _CHECKS[:-1]  # all but the walk over every value


def _non_json_path(value: Any, path: str) -> str | None:
    """Return the dotted path of the first value JSON cannot represent, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path}.{k!r}".lstrip(".")
            found = _non_json_path(v, f"{path}.{k}".lstrip("."))
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _non_json_path(v, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path
    ok = value is None or isinstance(value, str | int | float | bool)
    return None if ok else path


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value
