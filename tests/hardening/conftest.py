"""Fixtures shared by the hardening tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from aisoc_plugind.service import signals


@pytest.fixture
def handlers() -> Iterator[None]:
    """Put the test process's own signal handlers back, whatever a test (or an in-process
    `run`) did to them, and leave no signal held."""
    saved = {int(s): signal.getsignal(s) for s in signals.HELD}
    try:
        yield
    finally:
        signals.restore(saved)  # the handlers, and "not held"
        signals.take()
