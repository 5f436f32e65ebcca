"""Check every native event the test suite produced against `docs/events.schema.json`.

A session-scoped autouse fixture walks pytest's temporary directory after the last test:
every file there that holds JSON lines (audit files, daemons' captured stdout, with or
without a journald priority prefix) is read, and each native event in it (an object with
`timestamp`, `event` and `level`; ECS and OCSF documents are checked by their own tests) is
validated. A violation fails the session, naming the file, line and what is wrong.
Lines that tests corrupt on purpose (tampered chains, torn writes) are not JSON; unit tests
of the writer that emit made-up events opt out with `opt_out(tmp_path)` (a file named
`.not-native-events` in a directory also exempts everything below it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "events.schema.json"
MAX_FILE = 64 * 1024 * 1024
OPT_OUT = ".not-native-events"  # a directory holding this file (and all below it) is skipped
_PRIORITY = re.compile(rb"^<\d>")
__all__ = ["check_event_files", "native_events", "opt_out"]


_EXEMPT: set[Path] = set()


def opt_out(directory: Path) -> None:
    """Exempt `directory` from the check (for tests that write made-up events on purpose)."""
    _EXEMPT.add(directory)


def native_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, event) for the native events in one file."""
    try:
        if path.stat().st_size > MAX_FILE:
            return
        with path.open("rb") as fh:
            head = fh.read(4)
            if not (head.startswith(b"{") or _PRIORITY.match(head)):
                return
            fh.seek(0)
            data = fh.read()
    except OSError:
        return
    for number, raw in enumerate(data.splitlines(), 1):
        line = _PRIORITY.sub(b"", raw, count=1)
        if not line.startswith(b"{"):
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):  # hostile fixtures (deep or broken JSON)
            continue
        if (
            isinstance(doc, dict)
            and {"timestamp", "event", "level"} <= doc.keys()
            and "@timestamp" not in doc
            and "class_uid" not in doc
        ):
            yield number, doc


def check_event_files(root: Path, schema: dict[str, Any]) -> tuple[int, list[str]]:
    """Validate every native event under `root`; return (events checked, problems)."""
    validator = jsonschema.Draft202012Validator(schema)
    checked, problems = 0, []
    opted_out = {p.parent for p in root.rglob(OPT_OUT)} | _EXEMPT
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if opted_out.intersection(path.parents):
            continue
        for number, doc in native_events(path):
            checked += 1
            for error in validator.iter_errors(doc):
                where = "/".join(str(p) for p in error.absolute_path) or "(event)"
                problems.append(
                    f"{path.relative_to(root)}:{number}: {doc.get('event')}: {where}: "
                    f"{error.message[:200]}"
                )
    return checked, problems


@pytest.fixture(scope="session", autouse=True)
def _every_event_matches_the_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    schema = json.loads(SCHEMA_FILE.read_text())
    checked, problems = check_event_files(tmp_path_factory.getbasetemp(), schema)
    if problems:
        shown = "\n".join(problems[:40])
        pytest.fail(
            f"{len(problems)} of {checked} events do not match {SCHEMA_FILE.name}:\n{shown}",
            pytrace=False,
        )
