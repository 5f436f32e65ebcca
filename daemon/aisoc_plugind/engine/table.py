"""Hold what the daemon knows about plugins: one slot per id, and directories that failed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.core.records import SERVING, PluginRecord
from aisoc_plugind.engine.hosts import LoadedPlugin
from aisoc_plugind.engine.results import Rejected
from aisoc_plugind.errors import PluginDError, PluginNotFound

__all__ = ["Live", "PluginTable", "Slot"]


@dataclass(slots=True, kw_only=True)
class Live:
    """One version of a plugin's code, loaded in a host, with its in-flight run count."""

    plugin: LoadedPlugin
    inflight: int = 0
    retired: bool = False
    torn_down: bool = False


@dataclass(slots=True, kw_only=True)
class Slot:
    """The daemon's place for one plugin id: its record and its live code."""

    record: PluginRecord
    live: Live | None = None
    signature: bytes | None = None  # the raw signature that verified the live version
    signature_file: bytes | None = None  # plugin.sig as read for the live version
    trust_disabled: bool = False  # disabled because its key went (enabled again when it returns)


class PluginTable:
    """Slots by plugin id, and the directories that failed without owning an id."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self._rejected: dict[Path, Rejected] = {}
        self._failed_records: dict[Path, PluginRecord] = {}

    def get(self, plugin_id: str) -> Slot:
        """Return the slot of a plugin id, or raise PluginNotFound."""
        slot = self.slots.get(plugin_id)
        if slot is None:
            raise PluginNotFound(f"no plugin with id {plugin_id!r}")
        return slot

    def records(
        self, *, plugin_type: str | None = None, state: str | None = None
    ) -> list[PluginRecord]:
        """Return every record (loaded ids and failed directories), filtered and sorted."""
        found = [s.record for s in self.slots.values()] + list(self._failed_records.values())
        return sorted(
            (
                r
                for r in found
                if (plugin_type is None or r.plugin_type == plugin_type)
                and (state is None or r.state.value == state)
            ),
            key=lambda r: (r.id, r.path),
        )

    def slot_at(self, path: Path) -> Slot | None:
        """Return the slot whose record was loaded from `path`."""
        return next((s for s in self.slots.values() if Path(s.record.path) == path), None)

    def serving_dirs(self) -> list[Path]:
        """Return the directories the serving plugins were loaded from, sorted."""
        return sorted(Path(s.record.path) for s in self.slots.values() if s.record.state in SERVING)

    def rejected_dirs(self) -> list[Path]:
        """Return the directories that failed without owning an id, sorted."""
        return sorted(self._rejected)

    def reject(
        self,
        path: Path,
        error: PluginDError,
        *,
        plugin_id: str | None = None,
        record: PluginRecord | None = None,
    ) -> Rejected:
        """Note that `path` failed; `record` (a duplicate's) is listed among the records."""
        rejected = Rejected(
            path=path, error=error, plugin_id=plugin_id or (record.id if record else None)
        )
        self._rejected[path] = rejected
        if record is not None:
            self._failed_records[path] = record
        else:
            self._failed_records.pop(path, None)
        return rejected

    def clear(self, path: Path) -> None:
        """Forget a failure of `path` (it loaded, or it is gone)."""
        self._rejected.pop(path, None)
        self._failed_records.pop(path, None)
