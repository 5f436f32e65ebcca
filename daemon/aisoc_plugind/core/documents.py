"""Load manifest documents strictly: safe YAML and JSON, bounded, no aliases, no duplicate keys.

Two parsers must never read one manifest two ways: YAML is loaded with a safe loader that
also refuses aliases (no "billion laughs"), merge keys, duplicate keys and every explicit tag
outside the JSON-like core (`!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!map`,
`!!seq`), and JSON refuses duplicate keys and the non-JSON constants NaN and Infinity.

A manifest is hostile until its signature is checked, so the grammar is bounded before and
while it is read, making the cost linear in the (already capped) size: at most `MAX_DEPTH`
levels of nesting (a cheap pre-pass over the text counts unclosed `[`/`{` before any parser
runs; PyYAML's pure-Python scanner is quadratic in flow depth), at most `MAX_NODES` values,
and integers of at most `MAX_INT_DIGITS` digits (Python's own int/str conversion limit, so
that every accepted value has a canonical JSON form). Whatever else a document holds that a
constructor chokes on ends as a ManifestError too. Pure: text in, a Python value or
ManifestError out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from typing import Any

import yaml
import yaml.composer
import yaml.constructor
import yaml.nodes
import yaml.resolver

from aisoc_plugind.errors import ManifestError, Problem

__all__ = [
    "JSON_MANIFEST",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_NODES",
    "YAML_MANIFEST",
    "load_document",
]

YAML_MANIFEST = "plugin.yaml"
JSON_MANIFEST = "aisoc-plugin.json"
MAX_DEPTH = 64  # levels of mappings and lists
MAX_NODES = 5000  # values (scalars, mappings, lists, keys) in one document
MAX_INT_DIGITS = 4300  # sys.get_int_max_str_digits()'s default: str(int) works below it
# The smallest int with more than MAX_INT_DIGITS decimal digits, whatever notation (hex,
# octal, binary, base 60) it was written in.
_INT_LIMIT = 10**MAX_INT_DIGITS
# Longer number text is refused before it is constructed (room for a sign and underscores).
_MAX_NUMBER_TEXT = MAX_INT_DIGITS + 64
_BRACKETS = re.compile(r"[\[\]{}]")
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
# Explicit tags a manifest may use: the JSON-like core. Anything else (!!python/*, !!binary,
# !!set, !!timestamp, local tags, ...) is refused before it is constructed.
_SCALAR_TAGS = frozenset(
    {
        "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
    }
)


class _DuplicateKeyError(yaml.YAMLError, ValueError):
    """A mapping repeats a key (raised by both the YAML and the JSON reader)."""


class _AliasError(yaml.composer.ComposerError):
    """The document reuses a node (an alias or a merge): refused, it could expand without end."""


class _Refused(Exception):
    """The document is over a bound or uses a refused construct; carries the problem's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _too_deep() -> _Refused:
    return _Refused("manifest_too_deep", f"nested more than {MAX_DEPTH} levels deep")


def _too_many() -> _Refused:
    return _Refused("manifest_too_large", f"more than {MAX_NODES} values")


def _int_too_large() -> _Refused:
    return _Refused("manifest_bad_field", f"a number has more than {MAX_INT_DIGITS} digits")


class _StrictConstruction(yaml.constructor.SafeConstructor):
    """Safe construction, for scalars only: `_build` composes mappings and sequences itself
    (refusing aliases, merge keys, duplicate keys and explicit tags on the way), so no
    generic machinery ever walks a hostile collection."""


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
        """PyYAML's own parser with strict safe construction; composing stops at the node
        bound (this parser is slow enough for a 64 KiB document to matter)."""

        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _StrictConstruction.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._composed = 0

        def compose_node(
            self, parent: yaml.nodes.Node | None, index: Any
        ) -> yaml.nodes.Node | None:
            self._composed += 1
            if self._composed > MAX_NODES:
                raise _too_many()
            return super().compose_node(parent, index)


_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


def _build(loader: _StrictLoader, node: yaml.nodes.Node, seen: set[int], depth: int = 0) -> Any:
    """Construct a composed node strictly (what PyYAML's safe construction gives, with none of
    its generic machinery: most nodes of a manifest are plain strings), within the depth and
    node bounds."""
    if id(node) in seen or node in loader.constructed_objects:
        raise _AliasError(None, None, "aliases are not allowed in manifests", node.start_mark)
    if depth > MAX_DEPTH:
        raise _too_deep()
    seen.add(id(node))
    if len(seen) > MAX_NODES:
        raise _too_many()
    # The strict constructor (used for scalars below) refuses any node it finds here.
    loader.constructed_objects[node] = None
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        if tag == _STR:
            return node.value
        return _scalar(loader, node)
    if isinstance(node, yaml.MappingNode) and tag == "tag:yaml.org,2002:map":
        return _build_mapping(loader, node, seen, depth)
    if isinstance(node, yaml.SequenceNode) and tag == "tag:yaml.org,2002:seq":
        return [_build(loader, item, seen, depth + 1) for item in node.value]
    raise _Refused("manifest_unsafe_yaml", f"refused YAML construct: the tag {tag!r}{_at(node)}")


def _build_mapping(
    loader: _StrictLoader, node: yaml.MappingNode, seen: set[int], depth: int
) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            raise _AliasError(
                None, None, "merge keys (<<) are not allowed in manifests", key_node.start_mark
            )
        key = _build(loader, key_node, seen, depth + 1)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key is not hashable", key_node.start_mark
            )
        if key in mapping:
            raise _DuplicateKeyError(f"duplicate key {key!r} {key_node.start_mark}")
        mapping[key] = _build(loader, value_node, seen, depth + 1)
    return mapping


def _scalar(loader: _StrictLoader, node: yaml.nodes.Node) -> Any:
    """Construct a scalar of an allowed tag (int, float, bool, null, timestamp, ...)."""
    tag = node.tag
    # A plain date resolves to a timestamp: it constructs, and validation then refuses it
    # with a hint to quote it (it has no JSON form).
    if tag not in _SCALAR_TAGS and tag != _TIMESTAMP:
        raise _Refused(
            "manifest_unsafe_yaml", f"refused YAML construct: the tag {tag!r}{_at(node)}"
        )
    if tag in _NUMBER_TAGS and len(node.value) > _MAX_NUMBER_TEXT:  # base 60 is quadratic
        raise _int_too_large()
    del loader.constructed_objects[node]
    try:
        value = loader.construct_object(node, deep=True)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        if tag in _NUMBER_TAGS and len(node.value.lstrip("+-").replace("_", "")) > MAX_INT_DIGITS:
            raise _int_too_large() from exc  # int() refuses past Python's digit limit
        raise _Refused(
            "manifest_bad_syntax", f"a value does not read as {tag.rsplit(':', 1)[-1]}{_at(node)}"
        ) from exc
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        raise _int_too_large()
    return value


def _at(node: yaml.nodes.Node) -> str:
    mark = node.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _flow_depth_ok(text: str) -> bool:
    """Return False when `[`/`{` open more than MAX_DEPTH levels anywhere in `text`.

    Counted on the raw text (quotes and comments are not skipped): a bracket inside a string
    counts too, which errs on the side of refusing, never of parsing something deeper.
    """
    depth = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif depth:
            depth -= 1
    return True


def _load_yaml(text: str) -> Any:
    if not _flow_depth_ok(text):
        raise _problem("manifest_too_deep", f"nested more than {MAX_DEPTH} levels deep")
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            return None if node is None else _build(loader, node, set())
        finally:
            loader.dispose()
    except _Refused as exc:
        raise _problem(exc.code, exc.message) from exc
    except _DuplicateKeyError as exc:
        raise _duplicate(exc, YAML_MANIFEST) from exc
    except yaml.constructor.ConstructorError as exc:
        raise _problem("manifest_unsafe_yaml", f"refused YAML construct: {_one_line(exc)}") from exc
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1000 levels)
            raise RecursionError("nested too deeply") from exc
        raise _problem("manifest_bad_syntax", f"YAML does not parse: {_one_line(exc)}") from exc


def _problem(code: str, message: str, source: str = YAML_MANIFEST) -> ManifestError:
    return ManifestError([Problem(field="", code=code, message=message)], source=source)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_int(text: str) -> int:
    """Read a JSON integer; past MAX_INT_DIGITS digits it is the same problem as in YAML (a
    field's value out of range, `manifest_bad_field`), not a syntax error."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _int_too_large()
    return int(text)


def _load_json(text: str) -> Any:
    try:
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_int=_json_int,
        )
    except _DuplicateKeyError as exc:
        raise _duplicate(exc, JSON_MANIFEST) from exc
    except _Refused as exc:
        raise _problem(exc.code, exc.message, JSON_MANIFEST) from exc
    except ValueError as exc:
        raise _problem(
            "manifest_bad_syntax", f"JSON does not parse: {_one_line(exc)}", JSON_MANIFEST
        ) from exc
    try:
        _check_bounds(value)
    except _Refused as exc:
        raise _problem(exc.code, exc.message, JSON_MANIFEST) from exc
    return value


def _check_bounds(value: Any) -> None:
    """Apply the YAML builder's depth and size bounds to a parsed JSON value (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise _too_many()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            count += len(item)  # the keys count, as in YAML
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


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
