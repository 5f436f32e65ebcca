"""Name who asks the engine for something and what each operation gives back (typed values)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisoc_plugind.errors import PluginDError

__all__ = [
    "SYSTEM",
    "Caller",
    "Deferred",
    "DiscoverResult",
    "InstallResult",
    "LoadOutcome",
    "Loaded",
    "Rejected",
    "RunResult",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who asked for an operation, for the audit trail."""

    actor: str | None = None
    request_id: str | None = None

    def fields(self) -> dict[str, str]:
        """Return the audit fields that are set."""
        return {k: v for k, v in (("actor", self.actor), ("request_id", self.request_id)) if v}


SYSTEM = Caller(actor="system")


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """A directory was loaded and its plugin now serves under `plugin_id`."""

    plugin_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A directory failed to load; `error` keeps its class and code."""

    path: Path
    error: PluginDError
    plugin_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the `failed[]` entry of `POST /discover`."""
        return {
            "path": str(self.path),
            "error": self.error.message,
            "code": self.error.code,
            "plugin_id": self.plugin_id,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Deferred:
    """A directory holds the id of a serving plugin whose own directory vanished: the plugin
    moved, and its next reload switches to this directory."""

    path: Path
    plugin_id: str


LoadOutcome = Loaded | Rejected | Deferred


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoverResult:
    """What one discovery pass did (`POST /discover`'s body)."""

    discovered: list[str]
    failed: list[Rejected]

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"discovered": self.discovered, "failed": [f.to_json() for f in self.failed]}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """The outcome of one successful run."""

    plugin_id: str
    result: dict[str, Any]
    duration_ms: float
    result_json: str  # `result` as compact JSON, encoded (and checked) once by the host

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"plugin_id": self.plugin_id, "result": self.result, "duration_ms": self.duration_ms}

    def encoded(self) -> str:
        """Return `to_json()` as compact JSON, reusing the host's encoding of the result."""
        return (
            f'{{"plugin_id":{json.dumps(self.plugin_id)},"result":{self.result_json},'
            f'"duration_ms":{self.duration_ms!r}}}'  # a finite float: repr is JSON
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallResult:
    """The outcome of one OCI install (`POST /install_from_oci`'s body)."""

    plugin_id: str
    oci_ref: str
    digest: str

    def to_json(self) -> dict[str, Any]:
        """Return the API shape."""
        return {"plugin_id": self.plugin_id, "oci_ref": self.oci_ref, "digest": self.digest}
