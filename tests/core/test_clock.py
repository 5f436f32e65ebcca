"""Timestamps: RFC 3339, UTC, microseconds, `Z`; the fast path agrees with the plain one."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from aisoc_plugind.core.clock import parse_rfc3339, rfc3339, rfc3339_now, utcnow

SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def test_now_has_the_shape_and_agrees_with_the_plain_formatter() -> None:
    for _ in range(2000):  # crosses whole seconds now and then: the cached part is redone
        before = utcnow()
        text = rfc3339_now()
        after = utcnow()
        assert SHAPE.fullmatch(text), text
        moment = parse_rfc3339(text)
        # time.time() and datetime.now() read the same clock: a microsecond of rounding.
        assert before - timedelta(microseconds=1) <= moment <= after + timedelta(microseconds=1)


def test_the_cached_second_changes_with_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.25)
    assert rfc3339_now() == "2001-09-09T01:46:40.250000Z"
    monkeypatch.setattr(time, "time", lambda: 1_000_000_001.999999)
    assert rfc3339_now() == "2001-09-09T01:46:41.999999Z"
    assert rfc3339(datetime(2001, 9, 9, 1, 46, 41, 999999, tzinfo=UTC)) == rfc3339_now()


def test_parse_needs_a_zone() -> None:
    with pytest.raises(ValueError, match="time zone"):
        parse_rfc3339("2026-01-01T00:00:00")
    assert parse_rfc3339("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)
