"""Load manifest documents strictly: safe YAML and JSON, no aliases, no duplicate keys.

Two parsers must never read one manifest two ways: YAML is loaded with a safe loader that
also refuses aliases (no "billion laughs") and duplicate keys, and JSON refuses duplicate keys
and the non-JSON constants NaN and Infinity. Pure: text in, a Python value or ManifestError out.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
import yaml.constructor
import yaml.nodes

from aisoc_plugind.errors import ManifestError, Problem

__all__ = ["JSON_MANIFEST", "YAML_MANIFEST", "load_document"]

YAML_MANIFEST = "plugin.yaml"
JSON_MANIFEST = "aisoc-plugin.json"


class _DuplicateKeyError(yaml.YAMLError, ValueError):
    """A mapping repeats a key (raised by both the YAML and the JSON reader)."""


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and duplicate mapping keys."""

    def compose_node(self, parent: yaml.nodes.Node | None, index: int) -> yaml.nodes.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases are not allowed in manifests", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(f"duplicate key {key!r} {key_node.start_mark}")
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - strict safe loader
    except _DuplicateKeyError as exc:
        raise _duplicate(exc, YAML_MANIFEST) from exc
    except yaml.constructor.ConstructorError as exc:
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_unsafe_yaml",
                    message=f"refused YAML construct: {_one_line(exc)}",
                )
            ],
            source=YAML_MANIFEST,
        ) from exc
    except yaml.YAMLError as exc:
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_bad_syntax",
                    message=f"YAML does not parse: {_one_line(exc)}",
                )
            ],
            source=YAML_MANIFEST,
        ) from exc


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(text: str) -> Any:
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except _DuplicateKeyError as exc:
        raise _duplicate(exc, JSON_MANIFEST) from exc
    except ValueError as exc:
        raise ManifestError(
            [
                Problem(
                    field="",
                    code="manifest_bad_syntax",
                    message=f"JSON does not parse: {_one_line(exc)}",
                )
            ],
            source=JSON_MANIFEST,
        ) from exc


def _duplicate(exc: BaseException, source: str) -> ManifestError:
    return ManifestError(
        [
            Problem(
                field="",
                code="manifest_duplicate_key",
                message=f"{_one_line(exc)}: a key may appear only once",
            )
        ],
        source=source,
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_document(text: str, source: str) -> Any:
    """Load manifest text read from `source` (JSON when it ends in `.json`, else YAML)."""
    return _load_json(text) if source.endswith(".json") else _load_yaml(text)
