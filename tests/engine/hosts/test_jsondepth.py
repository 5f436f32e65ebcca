"""The explicit nesting limit of plugin results: the same answer on every Python version."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aisoc_plugind.engine.hosts.inprocess import normalise_result
from aisoc_plugind.engine.hosts.jsondepth import MAX_RESULT_DEPTH, deeper_than
from aisoc_plugind.errors import PluginResultInvalid


def nested(depth: int, kind: str = "list") -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_exactly_the_limit_passes_one_more_is_refused(kind: str) -> None:
    ok = nested(MAX_RESULT_DEPTH + 1, kind)  # the innermost 1 is a scalar, not a level
    assert not deeper_than(ok, json.dumps(ok))
    bad = [ok]
    assert deeper_than(bad, json.dumps(bad))


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    value = {"text": "[" * 10_000 + "{" * 10_000}
    assert not deeper_than(value, json.dumps(value))


def test_many_shallow_containers_are_fine() -> None:
    value = {"rows": [[i, {"v": [i]}] for i in range(5_000)]}
    assert not deeper_than(value, json.dumps(value))


def test_a_deep_branch_among_shallow_ones_is_found() -> None:
    value = {"a": [1, 2, 3], "b": {"c": nested(MAX_RESULT_DEPTH + 10)}}
    text = json.dumps(value)
    assert deeper_than(value, text)
    assert deeper_than(value, text, limit=MAX_RESULT_DEPTH)
    assert not deeper_than(value, text, limit=2 * MAX_RESULT_DEPTH)


def test_tuples_count_as_lists() -> None:
    value: Any = 1
    for _ in range(MAX_RESULT_DEPTH + 5):
        value = (value,)
    assert deeper_than(value, json.dumps(value))


def test_in_process_results_refuse_5000_levels_as_invalid() -> None:
    # Before 3.13 the encoder itself gives up (RecursionError); from 3.13 the check does.
    with pytest.raises(PluginResultInvalid, match=r"nested deeper|not JSON-serialisable"):
        normalise_result({"deep": nested(5000)})
    with pytest.raises(PluginResultInvalid, match="nested deeper"):
        normalise_result({"deep": nested(MAX_RESULT_DEPTH + 1)})
    assert normalise_result({"ok": nested(100)}).value == {"ok": nested(100)}
