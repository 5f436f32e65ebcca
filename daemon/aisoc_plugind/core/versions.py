"""Order plugin versions by semantic-versioning precedence, and judge a version change (pure).

Precedence is that of semver.org 2.0.0 §11: major, minor and patch compare numerically; a
pre-release ranks below its release; pre-release identifiers compare one by one (numeric ones
numerically and below alphanumeric ones, which compare in ASCII order; a shorter list of equal
identifiers ranks lower); build metadata is ignored. A version that is not semantic versioning
(`1.0`, `v2`, `latest`) has no order: a change to or from one is `INCOMPARABLE`, which, like a
`DOWNGRADE`, only the operator may make (INTERFACE §10). The same string is always `SAME`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["SemVer", "VersionChange", "change", "compare", "needs_operator", "parse_semver"]

# semver.org's regular expression (numeric identifiers without leading zeros).
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,  # `\d` is 0-9 only: no other script's digits
)
_MAX_LENGTH = 256  # longer is not a version anyone means; refuse before the regex runs


class VersionChange(StrEnum):
    """How a candidate version relates to the one serving."""

    UPGRADE = "upgrade"
    SAME = "same"  # equal precedence (build metadata may differ) or the very same string
    DOWNGRADE = "downgrade"
    INCOMPARABLE = "incomparable"  # either side is not semantic versioning


@dataclass(frozen=True, slots=True, kw_only=True)
class SemVer:
    """A parsed semantic version; `build` is kept for display, never for ordering."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    build: str = ""


def parse_semver(text: str) -> SemVer | None:
    """Return the semantic version `text` spells, or None when it is not one."""
    match = _SEMVER_RE.fullmatch(text) if len(text) <= _MAX_LENGTH else None
    if match is None:
        return None
    major, minor, patch, pre, build = match.groups()
    return SemVer(
        major=int(major),
        minor=int(minor),
        patch=int(patch),
        pre=tuple(pre.split(".")) if pre else (),
        build=build or "",
    )


def _identifier_key(identifier: str) -> tuple[int, int, str]:
    """Numeric identifiers rank below alphanumeric ones; each kind in its own order."""
    if identifier.isdigit():
        return (0, int(identifier), "")
    return (1, 0, identifier)


def _pre_key(pre: tuple[str, ...]) -> tuple[int, tuple[tuple[int, int, str], ...]]:
    """A release (no pre-release) ranks above every pre-release of the same triple."""
    return (1, ()) if not pre else (0, tuple(_identifier_key(i) for i in pre))


def compare(a: SemVer, b: SemVer) -> int:
    """Return -1, 0 or 1 as `a` has lower, equal or higher precedence than `b`."""
    left = (a.major, a.minor, a.patch, _pre_key(a.pre))
    right = (b.major, b.minor, b.patch, _pre_key(b.pre))
    return (left > right) - (left < right)


def change(current: str, candidate: str) -> VersionChange:
    """Return how `candidate` relates to `current` (the version serving now)."""
    if current == candidate:
        return VersionChange.SAME
    old, new = parse_semver(current), parse_semver(candidate)
    if old is None or new is None:
        return VersionChange.INCOMPARABLE
    order = compare(new, old)
    if order > 0:
        return VersionChange.UPGRADE
    return VersionChange.SAME if order == 0 else VersionChange.DOWNGRADE


def needs_operator(found: VersionChange) -> bool:
    """Return True for the changes that need the operator's explicit word."""
    return found in (VersionChange.DOWNGRADE, VersionChange.INCOMPARABLE)
