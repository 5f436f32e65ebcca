"""Load manifest documents strictly: safe YAML and JSON, no aliases, no duplicate keys.

Two parsers must never read one manifest two ways: YAML is loaded with a safe loader that
also refuses aliases (no "billion laughs") and duplicate keys, and JSON refuses duplicate keys
and the non-JSON constants NaN and Infinity. Pure: text in, a Python value or ManifestError out.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

import yaml
import yaml.composer
import yaml.constructor
import yaml.nodes
import yaml.resolver

from aisoc_plugind.errors import ManifestError, Problem

__all__ = ["JSON_MANIFEST", "YAML_MANIFEST", "load_document"]

YAML_MANIFEST = "plugin.yaml"
JSON_MANIFEST = "aisoc-plugin.json"


class _DuplicateKeyError(yaml.YAMLError, ValueError):
    """A mapping repeats a key (raised by both the YAML and the JSON reader)."""


class _AliasError(yaml.composer.ComposerError):
    """The document reuses a node (an alias or a merge): refused, it could expand without end."""


class _StrictConstruction(yaml.constructor.SafeConstructor):
    """Safe construction that refuses aliases, merge keys and duplicate mapping keys.

    An alias shows up as one node constructed twice, whichever parser (libyaml's or PyYAML's
    own) composed the document, so the check holds for both; it fires at the first reuse,
    before any expansion.
    """

    def construct_object(self, node: yaml.nodes.Node, deep: bool = False) -> Any:
        if node in self.constructed_objects or node in self.recursive_objects:
            raise _AliasError(None, None, "aliases are not allowed in manifests", node.start_mark)
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _AliasError(
                    None, None, "merge keys (<<) are not allowed in manifests", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key is not hashable", key_node.start_mark
                )
            if key in mapping:
                raise _DuplicateKeyError(f"duplicate key {key!r} {key_node.start_mark}")
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


if yaml.__with_libyaml__:  # libyaml parses about eight times faster than PyYAML's parser
    from yaml.cyaml import CParser  # type: ignore[attr-defined]

    class _StrictLoader(CParser, _StrictConstruction, yaml.resolver.Resolver):
        """libyaml's parser (it bounds nesting depth itself) with strict safe construction."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _StrictConstruction.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml

    class _StrictLoader(  # type: ignore[no-redef]
        yaml.reader.Reader,
        yaml.scanner.Scanner,
        yaml.parser.Parser,
        yaml.composer.Composer,
        _StrictConstruction,
        yaml.resolver.Resolver,
    ):
        """PyYAML's own parser with strict safe construction."""

        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _StrictConstruction.__init__(self)
            yaml.resolver.Resolver.__init__(self)


_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"


def _build(loader: _StrictLoader, node: yaml.nodes.Node, seen: set[int]) -> Any:
    """Construct a composed node strictly (the same result as `_StrictConstruction`, with
    none of the generic machinery: most nodes of a manifest are plain strings)."""
    if id(node) in seen or node in loader.constructed_objects:
        raise _AliasError(None, None, "aliases are not allowed in manifests", node.start_mark)
    seen.add(id(node))
    # The strict constructor (used for explicit tags below) refuses any node it finds here.
    loader.constructed_objects[node] = None
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        if tag == _STR:
            return node.value
        del loader.constructed_objects[node]
        return loader.construct_object(node, deep=True)  # int, float, bool, null, ...
    if isinstance(node, yaml.MappingNode) and tag == "tag:yaml.org,2002:map":
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                raise _AliasError(
                    None, None, "merge keys (<<) are not allowed in manifests", key_node.start_mark
                )
            key = _build(loader, key_node, seen)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key is not hashable", key_node.start_mark
                )
            if key in mapping:
                raise _DuplicateKeyError(f"duplicate key {key!r} {key_node.start_mark}")
            mapping[key] = _build(loader, value_node, seen)
        return mapping
    if isinstance(node, yaml.SequenceNode) and tag == "tag:yaml.org,2002:seq":
        return [_build(loader, item, seen) for item in node.value]
    del loader.constructed_objects[node]
    return loader.construct_object(node, deep=True)  # explicit tags: the strict constructor


def _load_yaml(text: str) -> Any:
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            return None if node is None else _build(loader, node, set())
        finally:
            loader.dispose()
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
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1000 levels)
            raise RecursionError("nested too deeply") from exc
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
