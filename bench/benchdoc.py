"""Keep one marked section per benchmark in docs/benchmarks.md up to date."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
_NEW_DOC = (
    "# Benchmarks\n\nMeasured, never asserted in unit tests. Re-run the command of a "
    "section to refresh it.\n"
)


def markers(name: str, isolation: str) -> tuple[str, str]:
    """Return the doc section markers of benchmark `name` in one isolation mode (`none`
    keeps the markers the section had before process isolation existed)."""
    suffix = "" if isolation == "none" else f":{isolation}"
    return f"<!-- {name}{suffix}:begin -->", f"<!-- {name}{suffix}:end -->"


def replace_section(section: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the old one,
    or append it; every other section is kept."""
    text = doc.read_text() if doc.exists() else _NEW_DOC
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
