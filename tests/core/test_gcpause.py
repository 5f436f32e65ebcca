"""The collector's pause around bulk loads: counted, restored as it was, never left off."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from aisoc_plugind.core.gcpause import GcPause


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_a_pause_turns_the_collector_off_and_back_on() -> None:
    gc.enable()
    pause = GcPause()
    with pause:
        assert not gc.isenabled() and pause.active
    assert gc.isenabled() and not pause.active


def test_overlapping_holders_keep_it_off_until_the_last_one_leaves() -> None:
    gc.enable()
    pause = GcPause()
    pause.__enter__()
    pause.__enter__()
    pause.__exit__(None, None, None)  # not nested: the first holder leaves first
    assert not gc.isenabled()
    pause.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with GcPause():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_error_inside_still_turns_it_back_on() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), GcPause():
        raise RuntimeError("a load failed")
    assert gc.isenabled()


async def test_async_holders_across_awaits() -> None:
    gc.enable()
    pause = GcPause()
    async with pause:
        assert not gc.isenabled()
        async with pause:
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
