"""Define plugin records and the lifecycle state machine (pure; no I/O).

    on disk ─discover─▶ discovered ─▶ loaded ─▶ enabled ◀──▶ disabled
                            │                      │            │
                            ▼                      └──unload──▶ unloaded ─discover─▶ ...
                          failed ─(dir changed / reload / discover)─▶ discovered

`reload` replaces the code of an `enabled`/`disabled` plugin without a state change; the
record's `error` shows a failed reload while the old version keeps serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from aisoc_plugind.core.clock import rfc3339
from aisoc_plugind.errors import PluginStateConflict

__all__ = ["SERVING", "TRANSITIONS", "PluginRecord", "State", "can_transition", "check_transition"]


class State(StrEnum):
    """Lifecycle states of INTERFACE §5."""

    DISCOVERED = "discovered"
    LOADED = "loaded"
    ENABLED = "enabled"
    DISABLED = "disabled"
    UNLOADED = "unloaded"
    FAILED = "failed"


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.DISCOVERED: frozenset({State.LOADED, State.FAILED}),
    State.LOADED: frozenset({State.ENABLED, State.DISABLED, State.FAILED}),
    # -> FAILED from a serving state: its host process crashed too often (INTERFACE §8).
    State.ENABLED: frozenset({State.DISABLED, State.UNLOADED, State.FAILED}),
    State.DISABLED: frozenset({State.ENABLED, State.UNLOADED, State.FAILED}),
    State.FAILED: frozenset({State.DISCOVERED, State.UNLOADED}),
    State.UNLOADED: frozenset({State.DISCOVERED}),
}
# States in which the plugin's code is in memory and can serve.
SERVING = frozenset({State.ENABLED, State.DISABLED})


def can_transition(from_state: State, to_state: State) -> bool:
    """Return True when the lifecycle allows moving from one state to the other."""
    return to_state in TRANSITIONS[from_state]


def check_transition(plugin_id: str, from_state: State, to_state: State) -> None:
    """Raise PluginStateConflict when the move is not allowed."""
    if can_transition(from_state, to_state):
        return
    code = {State.FAILED: "plugin_failed", State.UNLOADED: "plugin_unloaded"}.get(
        from_state, "plugin_state_conflict"
    )
    raise PluginStateConflict(
        f"plugin {plugin_id!r} is {from_state.value}; cannot become {to_state.value}", code=code
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginRecord:
    """What the daemon knows about one plugin; the API's record shape (INTERFACE §6)."""

    id: str
    name: str
    version: str
    plugin_type: str
    state: State
    signature_status: str | None
    signing_key_id: str | None
    error: Mapping[str, str] | None
    path: str
    loaded_at: datetime | None
    manifest: Mapping[str, Any] = field(default_factory=dict)
    digest: str | None = None
    path_missing: bool = False

    @property
    def enabled(self) -> bool:
        """Return True when run calls are accepted."""
        return self.state is State.ENABLED

    def moved_to(self, state: State) -> PluginRecord:
        """Return a copy in `state`, enforcing the lifecycle."""
        check_transition(self.id, self.state, state)
        return dataclasses.replace(self, state=state)

    def with_(self, **changes: Any) -> PluginRecord:
        """Return a copy with fields changed (no lifecycle check)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Return the record as the API and CLI show it."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "plugin_type": self.plugin_type,
            "state": self.state.value,
            "enabled": self.enabled,
            "signature_status": self.signature_status,
            "signing_key_id": self.signing_key_id,
            "error": dict(self.error) if self.error else None,
            "path": self.path,
            "loaded_at": rfc3339(self.loaded_at) if self.loaded_at else None,
            "manifest": dict(self.manifest),
            "digest": self.digest,
            "path_missing": self.path_missing,
        }
