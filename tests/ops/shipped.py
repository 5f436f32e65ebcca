"""The operator files the repository ships, and rendering them with a test's own values."""

from __future__ import annotations

from collections.abc import Mapping

from tests.conftest import REPO

__all__ = [
    "CONTAINERFILE",
    "HEALTHCHECK",
    "KUBERNETES",
    "LOGROTATE",
    "RSYSLOG",
    "SIEM",
    "render",
]

LOGROTATE = REPO / "systemd" / "aisoc-plugind.logrotate"
SIEM = REPO / "docs" / "siem"
RSYSLOG = SIEM / "rsyslog.conf"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
KUBERNETES = REPO / "deploy" / "kubernetes"


def render(text: str, values: Mapping[str, str]) -> str:
    """Replace each shipped value by a test value; each must occur exactly once.

    The tests run the shipped file with nothing changed but these values, so a value that
    moved or was duplicated fails loudly instead of leaving a production path in the test.
    """
    for old, new in values.items():
        count = text.count(old)
        assert count == 1, f"{old!r} occurs {count} times in the shipped file, expected once"
        text = text.replace(old, new)
    return text
