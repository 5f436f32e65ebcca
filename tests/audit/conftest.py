"""The audit writer's unit tests emit made-up events (`a.one`, partial shapes) on purpose:
their files are exempt from the session's event-schema check (tests/eventcheck.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eventcheck import opt_out


@pytest.fixture(autouse=True)
def _made_up_events_are_not_checked(tmp_path: Path) -> None:
    opt_out(tmp_path)
