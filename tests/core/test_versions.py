"""Semantic-versioning precedence and version-change verdicts, as tables (semver.org §11)."""

from __future__ import annotations

import itertools

import pytest

from aisoc_plugind.core.versions import (
    SemVer,
    VersionChange,
    change,
    compare,
    needs_operator,
    parse_semver,
)

# semver.org §11's own example chain, each lower than the next.
SEMVER_ORG_CHAIN = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "2.0.0",
    "2.1.0",
    "2.1.1",
]

LOWER_THAN = [
    ("0.9.9", "1.0.0"),
    ("1.9.0", "1.10.0"),  # numeric, not lexical
    ("1.0.9", "1.0.10"),
    ("1.0.0-rc.1", "1.0.0"),  # a pre-release ranks below its release
    ("1.0.0-2", "1.0.0-10"),  # numeric identifiers compare numerically
    ("1.0.0-99", "1.0.0-a"),  # numeric identifiers rank below alphanumeric ones
    ("1.0.0-Z", "1.0.0-a"),  # alphanumeric identifiers compare in ASCII order
    ("1.0.0-a", "1.0.0-a.0"),  # a longer list of equal identifiers ranks higher
    ("1.0.0-alpha-1", "1.0.0-alpha-2"),
    ("0.0.1", "0.1.0"),
]

EQUAL = [
    ("1.0.0", "1.0.0+build.5"),  # build metadata is ignored
    ("1.0.0+a", "1.0.0+b"),
    ("1.0.0-rc.1+x", "1.0.0-rc.1"),
]

NOT_SEMVER = [
    "1",
    "1.0",
    "v1.0.0",
    "1.0.0.0",
    "01.0.0",  # leading zero
    "1.0.0-01",  # leading zero in a numeric pre-release identifier
    "1.0.0-",
    "1.0.0+",
    "1.0.0-a..b",
    " 1.0.0",
    "1.0.0\n",
    "\u0661.0.0",  # ARABIC-INDIC DIGIT ONE is a digit, not an ASCII one
    "latest",
    "",
    "1.0.0-" + "a" * 300,  # over the length cap
]

CHANGES = [
    ("1.0.0", "1.0.1", VersionChange.UPGRADE),
    ("1.0.0", "2.0.0-rc.1", VersionChange.UPGRADE),
    ("2.0.0-rc.1", "2.0.0", VersionChange.UPGRADE),
    ("1.0.0", "1.0.0", VersionChange.SAME),
    ("1.0.0", "1.0.0+rebuilt", VersionChange.SAME),
    ("latest", "latest", VersionChange.SAME),  # the very same string never changed
    ("2.0.0", "1.0.0", VersionChange.DOWNGRADE),
    ("2.0.0", "2.0.0-rc.1", VersionChange.DOWNGRADE),
    ("1.0.0-beta.11", "1.0.0-beta.2", VersionChange.DOWNGRADE),
    ("1.0.0", "v1.0.1", VersionChange.INCOMPARABLE),
    ("1.0", "1.1", VersionChange.INCOMPARABLE),
    ("banana", "1.0.0", VersionChange.INCOMPARABLE),
]


@pytest.mark.parametrize(("low", "high"), list(itertools.pairwise(SEMVER_ORG_CHAIN)))
def test_semver_org_example_chain_is_ascending(low: str, high: str) -> None:
    """Each version of semver.org's example chain ranks below the next one."""
    a, b = parse_semver(low), parse_semver(high)
    assert a is not None and b is not None
    assert compare(a, b) == -1
    assert compare(b, a) == 1


@pytest.mark.parametrize(("low", "high"), LOWER_THAN)
def test_precedence_rules(low: str, high: str) -> None:
    """Numeric, pre-release and identifier-length rules of §11 order these pairs."""
    a, b = parse_semver(low), parse_semver(high)
    assert a is not None and b is not None
    assert compare(a, b) == -1


@pytest.mark.parametrize(("left", "right"), EQUAL)
def test_build_metadata_does_not_count(left: str, right: str) -> None:
    """Versions that differ only in build metadata have equal precedence."""
    a, b = parse_semver(left), parse_semver(right)
    assert a is not None and b is not None
    assert compare(a, b) == 0


@pytest.mark.parametrize("text", NOT_SEMVER)
def test_what_is_not_semantic_versioning_does_not_parse(text: str) -> None:
    """Anything semver.org's grammar does not accept is not a version we can order."""
    assert parse_semver(text) is None


def test_parse_keeps_every_part() -> None:
    """A full version parses into its numbers, pre-release identifiers and build."""
    assert parse_semver("1.2.3-rc.1+build.7") == SemVer(
        major=1, minor=2, patch=3, pre=("rc", "1"), build="build.7"
    )


@pytest.mark.parametrize(("current", "candidate", "expected"), CHANGES)
def test_change_verdicts(current: str, candidate: str, expected: VersionChange) -> None:
    """A change is an upgrade, the same, a downgrade, or incomparable."""
    assert change(current, candidate) is expected


@pytest.mark.parametrize(
    ("found", "operator"),
    [
        (VersionChange.UPGRADE, False),
        (VersionChange.SAME, False),
        (VersionChange.DOWNGRADE, True),
        (VersionChange.INCOMPARABLE, True),
    ],
)
def test_only_downgrades_and_incomparable_changes_need_the_operator(
    found: VersionChange, operator: bool
) -> None:
    """The watcher may upgrade or re-import; lowering or losing the order needs the word."""
    assert needs_operator(found) is operator
