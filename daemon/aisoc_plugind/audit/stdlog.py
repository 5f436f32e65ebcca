"""Route library log records (aiohttp, asyncio, ...) into the event pipeline, stdout only.

Installed on the root logger while the daemon runs, so no library ever prints bare text:
each record becomes a `log.record` event of the same shape as the daemon's own (level,
logger, message, and where an exception came from). They are not audit events: no `seq`,
not in the audit file. Exception text is not copied (a library's message can quote a
request); its type and the place it was raised are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog

__all__ = ["EventLogHandler", "install"]

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


class EventLogHandler(logging.Handler):
    """A logging handler that writes each record as a `log.record` event."""

    def __init__(self, events: EventLog, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        """Turn one record into an event; never raise into the library that logged."""
        try:
            fields: dict[str, object] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_type"] = record.exc_info[0].__name__
                tb = record.exc_info[2]
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                if tb is not None:
                    fields["where"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
            level = _LEVELS.get(record.levelno, "error" if record.levelno > 40 else "info")
            self._events.emit_log(names.LOG_RECORD, level=level, **fields)
        except Exception:
            self.handleError(record)


def install(events: EventLog, level: str = "info") -> Callable[[], None]:
    """Send every library log record at `level` or above through `events`; return the undo."""
    root = logging.getLogger()
    handler = EventLogHandler(events, logging.getLevelName(level.upper()))
    saved = (list(root.handlers), root.level)
    root.handlers = [handler]
    root.setLevel(handler.level)

    def uninstall() -> None:
        root.handlers, level_before = saved
        root.setLevel(level_before)

    return uninstall
