"""Hostile manifests, made to measure: each kind, in as many distinct variants as wanted.

Every variant is under the 64 KiB cap (or just over it, for that kind) and differs from the
others (no cache helps the daemon), and none may ever load.
"""

from __future__ import annotations

import json
from collections.abc import Callable

Maker = Callable[[int], tuple[str, bytes]]
YAML, JSON = "plugin.yaml", "aisoc-plugin.json"


def head(i: int) -> str:
    return f"id: hostile-{i}\nname: Hostile\nversion: 1.0.{i}\nplugin_type: enricher\n"


def _deep_flow(i: int) -> tuple[str, bytes]:
    # PyYAML's pure-Python scanner is quadratic in this: 4.2 s for 60 KiB.
    depth = 400 + i
    one = "[" * depth + "]" * depth
    return YAML, (head(i) + "x: [" + ",".join([one] * (60_000 // len(one))) + "]\n").encode()


def _wide_shallow(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "x: [" + "1," * (25_000 + i) + "1]\n").encode()


def _alias_bomb(i: int) -> tuple[str, bytes]:
    rows = [f"a: &a [{', '.join(['x'] * (9 + i % 5))}]"]
    rows += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    return YAML, (head(i) + "\n".join(rows) + "\n").encode()


def _many_aliases(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "a: &a v\nb: [" + "*a, " * (12_000 + i) + "*a]\n").encode()


def _huge_int(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "n: " + "9" * (5000 + i) + "\n").encode()


def _huge_hex(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "n: 0x" + "f" * (50_000 + i) + "\n").encode()


def _base60(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "n: " + "59:" * (18_000 + i) + "1\n").encode()


def _deep_block(i: int) -> tuple[str, bytes]:
    levels = 150 + i % 50
    body = "".join("  " * n + f"k{n}:\n" for n in range(levels)) + "  " * levels + "v\n"
    return YAML, (head(i) + body).encode()


def _tags(i: int) -> tuple[str, bytes]:
    tag = ["!!binary aGVsbG8=", "!!python/object/apply:os.system ['id']", "!!set {a}", "!x y"][
        i % 4
    ]
    return YAML, (head(i) + f"t: {tag}\n" * 1 + "k: [" + "!!str a, " * 3000 + "b]\n").encode()


def _bad_values(i: int) -> tuple[str, bytes]:
    value = ["2024-13-45", "!!bool maybe", "!!int zero", "!!float many", "!!timestamp x"][i % 5]
    return YAML, (head(i) + f"v: {value}\n").encode()


def _json_deep(i: int) -> tuple[str, bytes]:
    depth = 20_000 + i
    return JSON, b'{"id": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"


def _json_wide(i: int) -> tuple[str, bytes]:
    doc = {"id": f"hostile-{i}", "name": "H", "version": "1.0.0", "plugin_type": "enricher"}
    return JSON, json.dumps({**doc, "x": list(range(9000 + i))}).encode()


def _over_cap(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + "# " + "x" * (66 * 1024 + i) + "\n").encode()


def _not_utf8(i: int) -> tuple[str, bytes]:
    return YAML, head(i).encode("utf-16") if i % 2 else head(i).encode() + b"x: \xff\xfe\n"


def _duplicate_keys(i: int) -> tuple[str, bytes]:
    return YAML, (head(i) + f"id: hostile-other-{i}\n").encode()


KINDS: dict[str, Maker] = {
    "deep_flow": _deep_flow,
    "wide_shallow": _wide_shallow,
    "alias_bomb": _alias_bomb,
    "many_aliases": _many_aliases,
    "huge_int": _huge_int,
    "huge_hex": _huge_hex,
    "base60": _base60,
    "deep_block": _deep_block,
    "tags": _tags,
    "bad_values": _bad_values,
    "json_deep": _json_deep,
    "json_wide": _json_wide,
    "over_cap": _over_cap,
    "not_utf8": _not_utf8,
    "duplicate_keys": _duplicate_keys,
}


def variants(count: int) -> list[tuple[str, str, bytes]]:
    """Return `count` distinct hostile manifests as (kind, file name, bytes), every kind."""
    makers = list(KINDS.items())
    out = []
    for i in range(count):
        kind, make = makers[i % len(makers)]
        name, data = make(i)
        out.append((kind, name, data))
    return out
