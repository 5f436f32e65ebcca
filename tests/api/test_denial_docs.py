"""docs/api.md lists every reason an `api.denied` event can carry.

The reasons are the string constants the api package hands to `ApiError(reason=...)`, assigns
to a `reason` variable, or returns from `denial_reason()`; read from the source with `ast`, so
a new denial cannot ship undocumented.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import aisoc_plugind.api

API = Path(aisoc_plugind.api.__file__).parent
DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _strings(node: ast.AST) -> set[str]:
    return {
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"[a-z_]+", n.value)
    }


def denial_reasons() -> set[str]:
    found: set[str] = set()
    for path in API.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.keyword) and node.arg == "reason") or (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "reason" for t in node.targets)
            ):
                found |= _strings(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name in (
                "denial_reason",
                "browser_refusal",
            ):
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        found |= _strings(ret.value)
    return found


def test_every_denial_reason_is_documented() -> None:
    reasons = denial_reasons()
    assert {"token_missing", "token_expired", "permission_missing", "host_not_allowed"} <= reasons
    row = next(line for line in DOC.read_text().splitlines() if line.startswith("| `api.denied`"))
    documented = set(re.findall(r"`([a-z_]+)`", row))
    assert reasons - documented == set(), "undocumented denial reasons"
