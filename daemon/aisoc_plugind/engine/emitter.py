"""Write the engine's record-shaped events: state transitions and load failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.core.records import PluginRecord, State
from aisoc_plugind.core.redact import NO_REDACTION, Redactor
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import AuditUnavailable, PluginDError

__all__ = ["EngineEvents"]


class EngineEvents:
    """The engine's view of the event log: plain events plus record-shaped helpers."""

    def __init__(self, log: EventLog, redactor: Redactor = NO_REDACTION) -> None:
        self.log = log
        self.redactor = redactor

    def redacted(self, exc: PluginDError) -> PluginDError:
        """Take plugin configuration values out of `exc`'s message (in place) and return it.

        Call this where an error from plugin code, a host or a configuration check enters
        the engine, before its text reaches a record, an event or the caller.
        """
        message = self.redactor(exc.message)
        if message != exc.message:
            exc.message = message
            exc.args = (message,)
        return exc

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> int:
        """Write one event (see `EventLog.emit`); return its `seq`."""
        return self.log.emit(event, level=level, **fields)

    async def commit(self, seq: int | None = None, *, durable: bool = True) -> None:
        """Return once the events up to `seq` (default: the last) are written (and durable);
        raise AuditUnavailable when they cannot be."""
        await self.log.commit(seq, durable=durable)

    async def require(self, seq: int, *, plugin_id: str, event: str, caller: Caller) -> None:
        """Commit the event of a change before the change is applied.

        When its line cannot be made durable, write `plugin.change.aborted` (kept until the
        file works again) and raise AuditUnavailable: the caller then does not apply it.
        """
        try:
            await self.log.commit(seq)
        except AuditUnavailable as exc:
            self.log.emit(
                names.PLUGIN_CHANGE_ABORTED,
                level="error",
                plugin_id=plugin_id,
                aborted_event=event,
                aborted_seq=seq,
                error_code=exc.code,
                **caller.fields(),
            )
            raise

    def state(self, event: str, record: PluginRecord, before: State | None, caller: Caller) -> int:
        """Write a lifecycle transition of `record` (from `before` to its current state)."""
        return self.log.emit(
            event,
            plugin_id=record.id,
            path=record.path,
            version=record.version,
            from_state=before.value if before else None,
            to_state=record.state.value,
            signature_status=record.signature_status,
            signing_key_id=record.signing_key_id,
            **caller.fields(),
        )

    def load_failed(
        self, record: PluginRecord | None, path: Path, exc: PluginDError, caller: Caller
    ) -> None:
        """Write `plugin.load.failed` for a directory (and its record, once one exists)."""
        self.log.emit(
            names.PLUGIN_LOAD_FAILED,
            level="error",
            plugin_id=record.id if record else None,
            path=str(path),
            version=record.version if record else None,
            from_state=State.DISCOVERED.value if record else None,
            to_state=State.FAILED.value,
            signature_status=record.signature_status if record else None,
            error_code=exc.code,
            error=exc.message,
            **caller.fields(),
        )
