"""Find plugin configuration values in text and put `[redacted]` in their place.

A plugin's configuration (`[plugin_config."<id>"]`) can hold credentials, and exception text
from a plugin (or from a check of its configuration) can quote them. Every text that leaves
the engine (an event, a record's `error`, an error response) goes through a `Redactor` built
from the configured values: it looks for each value (strings, and the text of numbers and
dates, found at any depth in tables and arrays) as written, in its `repr()`/`ascii()` form and
as a JSON string, and replaces every occurrence. Values shorter than `MIN_CHARS` characters are
left alone: `on`, `42` or `yes` would shred ordinary text and are no secrets. Keys are names,
not values, and booleans are never secrets, so neither is looked for.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["MARK", "MIN_CHARS", "NO_REDACTION", "SCAN_CAP", "Redactor"]

MARK = "[redacted]"
# A value whose text is shorter than this is not looked for (see the module docstring).
MIN_CHARS = 4
# Text is searched up to this many characters; a longer text is cut there first (and a
# value cut in half at the end is dropped too), so a huge message costs a bounded search.
SCAN_CAP = 64 * 1024
_MAX_DEPTH = 64
_ELLIPSIS = "…"


class Redactor:
    """Replace known secret values in text; see the module docstring."""

    __slots__ = ("_needles",)

    def __init__(self, values: Iterable[Any] = ()) -> None:
        found: set[str] = set()
        for leaf in _leaves(values, 0):
            found.update(_forms(leaf))
        # Longest first: where two values overlap, the span covering both goes.
        self._needles = tuple(sorted(found, key=lambda n: (-len(n), n)))

    @classmethod
    def of_configs(cls, configs: Mapping[str, Any]) -> Redactor:
        """Return a redactor for every value of every plugin's configuration table."""
        return cls(configs.values())

    def __bool__(self) -> bool:
        return bool(self._needles)

    def __call__(self, text: str) -> str:
        """Return `text` with every occurrence of a known value replaced by `[redacted]`."""
        if not self._needles or not text:
            return text
        cut = len(text) > SCAN_CAP
        if cut:
            text = text[:SCAN_CAP]
        spans = _merged(_spans(text, self._needles))
        if spans:
            text = _replaced(text, spans)
        return self._without_partial_tail(text) + _ELLIPSIS if cut else text

    def clip(self, text: str, limit: int) -> str:
        """Redact `text`, then cut it to `limit` characters (ending in "…" when cut).

        Redacting first means a value is never cut in half and half of it shown.
        """
        text = self(text)
        return text if len(text) <= limit else text[:limit] + _ELLIPSIS

    def _without_partial_tail(self, text: str) -> str:
        """Drop the end of a cut text where a value may start (its rest was cut off): as
        many characters as the longest value has, less one."""
        keep = len(text) - (len(self._needles[0]) - 1)
        return text[: max(keep, 0)]


def _leaves(values: Iterable[Any], depth: int) -> Iterator[Any]:
    """Yield every scalar under `values` (the values of tables, the items of arrays)."""
    if depth > _MAX_DEPTH:
        return
    for value in values:
        if isinstance(value, Mapping):
            yield from _leaves(value.values(), depth + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            yield from _leaves(value, depth + 1)
        else:
            yield value


def _forms(value: Any) -> set[str]:
    """Return the ways `value` can show up in an exception's text (long enough to look for)."""
    if value is None or isinstance(value, bool):
        return set()
    if isinstance(value, str):
        if len(value) < MIN_CHARS:
            return set()
        forms = {
            value,
            repr(value)[1:-1],
            ascii(value)[1:-1],
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            repr(value.encode("utf-8", "surrogatepass"))[2:-1],
        }
    elif isinstance(value, int | float):
        forms = {str(value), repr(value)}
    elif isinstance(value, datetime.date | datetime.time):
        forms = {str(value), value.isoformat(), repr(value)}
    else:  # a TOML document holds nothing else; be safe with whatever a caller passes
        forms = {str(value), repr(value)}
    return {f for f in forms if len(f) >= MIN_CHARS}


def _spans(text: str, needles: Iterable[str]) -> list[tuple[int, int]]:
    """Return (start, end) of every occurrence of every needle, overlapping ones too."""
    spans: list[tuple[int, int]] = []
    for needle in needles:
        start = text.find(needle)
        while start >= 0:
            spans.append((start, start + len(needle)))
            start = text.find(needle, start + 1)
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or touching spans, in order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _replaced(text: str, spans: list[tuple[int, int]]) -> str:
    parts: list[str] = []
    last = 0
    for start, end in spans:
        parts.append(text[last:start])
        parts.append(MARK)
        last = end
    parts.append(text[last:])
    return "".join(parts)


NO_REDACTION = Redactor()  # for callers that hold no configuration
