"""Run plugin code: the `PluginHost` seam, the one way the engine calls into a plugin.

The engine hands a host the verified bytes of one plugin version (`LoadRequest`) and gets back
a `LoadedPlugin` handle: `run()` and `teardown()` are the only other calls into plugin code.
Nothing outside this package imports, constructs or calls plugin code (an import contract
checks it). `inprocess` runs plugins inside the daemon; a host process implementation plugs
in behind the same Protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any, Protocol

from aisoc_plugind.errors import PluginDError

__all__ = ["HostInfo", "LoadRequest", "LoadedPlugin", "PluginHost", "RunOutput"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadRequest:
    """One verified plugin version to load: its bytes, entry point, configuration and group.

    `root` only names where the bytes were read from (for tracebacks); a host never reads it.
    `group` says which plugins may share a host (`signer:<key id>`, `plugin:<id>`).
    """

    plugin_id: str
    version: str
    root: Path
    sources: Mapping[str, bytes]
    entry_point: str
    config: Mapping[str, Any]
    group: str
    # In-process only: code the scan compiled from `sources` (never sent to a host process).
    code: Mapping[str, CodeType] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInfo:
    """Where a loaded plugin runs: the host process and its group (shown on the record)."""

    pid: int
    group: str
    isolated: bool

    def to_json(self) -> dict[str, Any]:
        """Return the record's `host` shape."""
        return {"pid": self.pid, "group": self.group, "isolated": self.isolated}


@dataclass(frozen=True, slots=True)
class RunOutput:
    """A run's result: the JSON object, and its compact encoding (checked once, in the host,
    and reused as the response body)."""

    value: dict[str, Any]
    text: str


class LoadedPlugin(Protocol):
    """One plugin version loaded in a host: constructed and set up, ready to run."""

    @property
    def host(self) -> HostInfo:
        """Return where this plugin runs."""

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> RunOutput:
        """Run the plugin once; return its result (a JSON object) and its encoding.

        Raises PluginRunError, PluginTimeout or PluginResultInvalid (with their codes).
        """

    async def teardown(self) -> None:
        """Call the plugin's `teardown()` and release it; raises PluginLoadError
        (`plugin_teardown_failed`) after releasing when the hook failed."""


class PluginHost(Protocol):
    """Something that can load plugin versions and run them."""

    @property
    def wants_code(self) -> bool:
        """Return True when `LoadRequest.code` helps (code is compiled in this process)."""

    @property
    def loads_together(self) -> bool:
        """Return True when one `load_many` of a whole discovery beats one per scan chunk."""

    @property
    def state_root(self) -> Path | None:
        """Return where each admitted plugin's state directory (`<root>/<id>/`) must exist
        before the plugin loads, for the scan to make them ahead (None: not needed)."""

    def warm_up(self) -> None:
        """Start, in the background, what the first load will need (call on the event loop;
        a failure shows at that load)."""

    async def load(self, request: LoadRequest) -> LoadedPlugin:
        """Import the request's bytes, construct `Plugin` and call `setup()`.

        Raises PluginLoadError with a code naming the step that failed.
        """

    async def load_many(self, requests: Sequence[LoadRequest]) -> list[LoadedPlugin | PluginDError]:
        """Load several versions (a discovery); one outcome per request, in order. A failure
        of one (a PluginDError in its place) does not stop the others."""

    def set_on_failed(self, callback: Callable[[list[str], PluginDError], None]) -> None:
        """Register how to tell the engine that plugins were lost for good (their host
        crashed too often): it moves them to `failed`."""

    async def aclose(self) -> None:
        """Release everything this host holds (after every plugin was torn down)."""
