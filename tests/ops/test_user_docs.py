"""User-facing files speak for themselves: no issue numbers, no internal documents cited."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
USER_FACING = [
    REPO / "README.md",
    REPO / "CHANGELOG.md",
    REPO / "config.example.toml",
    *sorted((REPO / "docs").rglob("*.md")),
    *sorted(p for p in (REPO / "deploy").rglob("*") if p.is_file()),
    *sorted(p for p in (REPO / "systemd").iterdir() if p.is_file()),
    *sorted((REPO / "examples").rglob("*.md")),
    *sorted((REPO / "daemon" / "aisoc_plugind" / "authoring" / "templates").rglob("*")),
]
INTERNAL = re.compile(
    r"\(#\d+\)|\bissue #?\d+|\bINTERFACE(\.md| §)|\bDESIGN\.md|\bSTYLE\.md|research item"
    r"|\.\./shared|\bthe seed's"
)


@pytest.mark.parametrize(
    "path", [p for p in USER_FACING if p.is_file()], ids=lambda p: str(p.relative_to(REPO))
)
def test_no_internal_references(path: Path) -> None:
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert hits == []
