"""Render events as audit lines: the schema's shape, the chain field, at most 8192 bytes.

The processors are chosen once, when the log is built (`Renderer(schema)`); rendering an
event is then one schema call, one `json.dumps` and, only for an oversized event, a bounded
loop that cuts string values and lists until the line fits (`"truncated": true`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aisoc_plugind.audit.schemas import to_ecs, to_ocsf

__all__ = ["MAX_LINE_BYTES", "SCHEMAS", "Renderer", "native"]

MAX_LINE_BYTES = 8192
_MARK = "…"
_MIN_CUT = 16

Schema = Callable[[Mapping[str, Any]], dict[str, Any]]


def native(event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the native event shape (INTERFACE §7): the event as built."""
    return dict(event)


SCHEMAS: dict[str, Schema] = {"native": native, "ecs": to_ecs, "ocsf": to_ocsf}


# One encoder for every line (json.dumps with options builds a new one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return _ENCODE(doc).encode("ascii")


class Renderer:
    """Turn event dicts into audit lines of one schema, each chained to the previous line."""

    def __init__(self, schema: str = "native", *, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.schema = SCHEMAS[schema]
        self.max_bytes = max_bytes

    def shape(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Return the event in the configured schema (without the chain field)."""
        return self.schema(event)

    def line(self, doc: Mapping[str, Any], prev: str) -> bytes:
        """Return one line (no newline) holding `doc` and `"prev"`, cut to `max_bytes`."""
        out = _dumps({**doc, "prev": prev})
        if len(out) <= self.max_bytes:
            return out
        return self._fit(doc, prev)

    def plain(self, event: Mapping[str, Any]) -> bytes:
        """Return an event that is not part of the chain (stdout only), cut to `max_bytes`."""
        out = _dumps(self.shape(event))
        return out if len(out) <= self.max_bytes else self.line(self.shape(event), "")

    def _fit(self, doc: Mapping[str, Any], prev: str) -> bytes:
        """Cut the longest values just enough for the line to fit; mark it `truncated`.

        A binary search finds the largest per-value length that fits, so as much of the
        event as possible is kept.
        """
        best: bytes | None = None
        low, high = _MIN_CUT, _longest(doc)
        while low <= high:
            limit = (low + high) // 2
            out = _dumps({**_cut(doc, limit), "truncated": True, "prev": prev})
            if len(out) <= self.max_bytes:
                best, low = out, limit + 1
            else:
                high = limit - 1
        return best if best is not None else _last_resort(doc, prev)


def _longest(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return max((_longest(v) for v in value.values()), default=0)
    if isinstance(value, list | tuple):
        return max([len(value) * 64, *(_longest(v) for v in value)], default=0)
    return 0


def _cut(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + _MARK
    if isinstance(value, Mapping):
        return {k: _cut(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_cut(v, limit) for v in value[: max(limit // 64, 1)]]
        if len(value) > len(items):
            items.append(f"{_MARK}{len(value) - len(items)} more")
        return items
    return value


def _last_resort(doc: Mapping[str, Any], prev: str) -> bytes:
    """Keep only the common keys when even short values do not fit (very many fields)."""
    keep = {
        k: doc[k] for k in ("timestamp", "@timestamp", "time", "event", "level", "seq") if k in doc
    }
    return _dumps({**keep, "truncated": True, "prev": prev})
