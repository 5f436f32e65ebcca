"""Fixtures for the host tests: a daemon-like file layout outside every allowed path."""

from __future__ import annotations

import pytest

from aisoc_plugind.engine.hosts import landlock
from tests.engine.hosts.children import Layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A plugin dir, state dirs, a private temp dir, a tokens, an audit and a shadow file."""
    return Layout.create(tmp_path_factory.mktemp("daemon"))


@pytest.fixture(scope="session")
def landlock_abi() -> int:
    """The kernel's Landlock ABI; skips the test on a kernel without Landlock."""
    support = landlock.probe()
    if isinstance(support, landlock.Unavailable):
        pytest.skip(f"this kernel has no Landlock: {support.reason} ({support.detail})")
    return support.abi
