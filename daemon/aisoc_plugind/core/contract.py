"""State the plugin contract (INTERFACE §3) as Protocols: what a plugin's `Plugin` class is.

A plugin's entry module defines `class Plugin`, built as `Plugin()` or `Plugin(config)`;
`run(payload, context)` is sync or async and returns a dict (anything else is wrapped as
`{"result": value}`); `setup()` and `teardown()` are optional, sync or async. Plugin authors
do not import this module (plugins need nothing from the daemon); the hosts check instances
against it and type-check their calls with it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Plugin", "PluginWithSetup", "PluginWithTeardown"]

JsonObject = dict[str, Any]


@runtime_checkable
class Plugin(Protocol):
    """An instance of a plugin's `Plugin` class: it can run."""

    def run(self, payload: JsonObject, context: JsonObject) -> Any | Awaitable[Any]:
        """Handle one invocation; return a dict (or a value to wrap), maybe awaitable."""


@runtime_checkable
class PluginWithSetup(Protocol):
    """A plugin that wants a call after it is constructed and before it serves."""

    def setup(self) -> Awaitable[None] | None:
        """Prepare to serve (open clients, warm caches)."""


@runtime_checkable
class PluginWithTeardown(Protocol):
    """A plugin that wants a call before it is unloaded or replaced."""

    def teardown(self) -> Awaitable[None] | None:
        """Release what `setup` acquired."""
