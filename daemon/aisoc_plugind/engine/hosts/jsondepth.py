"""Refuse plugin results nested deeper than a fixed limit, on every Python version.

Up to CPython 3.12 `json.dumps` raises `RecursionError` on a result nested about a thousand
levels deep; from 3.13 on it encodes much deeper values, which a client's parser may then
refuse or choke on. The limit is therefore checked explicitly, the same everywhere. The
check costs two `str.count` passes over the encoded text; the values are walked (without
recursion) only when the text holds more brackets than the limit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_RESULT_DEPTH", "deeper_than", "unserialisable"]

MAX_RESULT_DEPTH = 512


def deeper_than(value: Any, text: str, limit: int = MAX_RESULT_DEPTH) -> bool:
    """Return whether `value` (encoded as `text`) nests lists and dicts over `limit` deep."""
    if text.count("[") + text.count("{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list | tuple)
        )
    return False


# What JSON encoding errors say, by type, without the encoder's own text: it names the
# offending value's class, which a plugin can make up from the payload.
_UNSERIALISABLE = {
    TypeError: "it holds a value JSON cannot encode (not a dict, list, str, number, bool "
    "or None, or a key that is not a string)",
    ValueError: "it holds NaN or Infinity, or refers to itself",
    RecursionError: f"it is nested deeper than {MAX_RESULT_DEPTH} levels",
}


def unserialisable(exc: BaseException) -> str:
    """Return why a result could not be encoded, quoting nothing from the result."""
    for kind, reason in _UNSERIALISABLE.items():
        if isinstance(exc, kind):
            return f"the result is not JSON-serialisable: {reason}"
    return f"the result is not JSON-serialisable ({type(exc).__name__})"
