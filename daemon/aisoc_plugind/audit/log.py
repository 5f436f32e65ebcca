"""Write each event to stdout (structlog) and the JSONL audit file, numbered by `seq`.

One event = one JSON object, serialised once; the same line goes to the audit file (one
`write()` on an O_APPEND descriptor, so a line is never split or interleaved) and, with
`log.format = "json"`, to stdout. `seq` is monotonic per daemon run and matches file order.
Keys that could carry secrets (tokens, payloads) are dropped before anything is written.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from aisoc_plugind.audit.names import AUDIT_WRITE_FAILED, PLUGIN_RUN_COMPLETED, PLUGIN_RUN_FAILED
from aisoc_plugind.audit.sink import AuditSink
from aisoc_plugind.core.clock import rfc3339, utcnow

__all__ = ["SECRET_KEYS", "EventLog"]

# High-volume events that are written but not fsync'ed under `audit.fsync = "mutations"`.
_VOLUME_EVENTS = frozenset({PLUGIN_RUN_COMPLETED, PLUGIN_RUN_FAILED})
# Keys whose values may be secrets; they never reach stdout or the audit file.
SECRET_KEYS = frozenset(
    {"token", "authorization", "payload", "context", "result", "password", "secret", "config"}
)
_FIRST_KEYS = ("timestamp", "event", "level", "seq")


Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


class EventLog:
    """Emit structured events to stdout and the audit sink, numbered by `seq`."""

    def __init__(
        self,
        *,
        audit: AuditSink | None,
        log_format: str = "json",
        stream: TextIO | None = None,
    ) -> None:
        self.audit = audit
        self._listeners: list[Callable[[Mapping[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._logger = structlog.wrap_logger(
            structlog.PrintLogger(stream if stream is not None else sys.stdout),
            processors=[self._scrub_and_order, self._write_audit, self._renderer(log_format)],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )

    @staticmethod
    def _renderer(log_format: str) -> Processor:
        if log_format == "console":
            console = structlog.dev.ConsoleRenderer(colors=False)

            def render_console(logger: Any, name: str, ev: MutableMapping[str, Any]) -> Any:
                ev.pop("_line", None)
                text = str(console(logger, name, ev))
                # A path from a non-UTF-8 file name must not make printing the event fail.
                return text.encode("utf-8", "backslashreplace").decode("utf-8")

            return render_console

        def render_json(logger: Any, name: str, ev: MutableMapping[str, Any]) -> Any:
            return ev["_line"]

        return render_json

    def subscribe(self, listener: Callable[[Mapping[str, Any]], None]) -> None:
        """Call `listener` with every event as written (for metrics); it must not raise."""
        self._listeners.append(listener)

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> dict[str, Any]:
        """Write one event; returns the event as written (without secrets)."""
        with self._lock:
            self._seq += 1
            out: dict[str, Any] = {}
            self._logger.msg(event, _level=level, _seq=self._seq, _out=out, **fields)
        for listener in self._listeners:
            listener(out)
        return out

    @staticmethod
    def _scrub_and_order(logger: Any, name: str, ev: MutableMapping[str, Any]) -> Any:
        out_ref = ev.pop("_out")
        ordered: dict[str, Any] = {
            "timestamp": rfc3339(utcnow()),
            "event": ev.pop("event"),
            "level": ev.pop("_level"),
            "seq": ev.pop("_seq"),
        }
        for key, value in ev.items():
            if key not in SECRET_KEYS and key not in _FIRST_KEYS and value is not None:
                ordered[key] = value
        out_ref.update(ordered)
        ordered["_line"] = json.dumps(ordered, separators=(",", ":"), default=str)
        return ordered

    def _write_audit(self, logger: Any, name: str, ev: MutableMapping[str, Any]) -> Any:
        if self.audit is None:
            return ev
        try:
            self.audit.write(ev["_line"], durable=ev["event"] not in _VOLUME_EVENTS)
        except OSError as exc:
            self._audit_failed(exc)
        else:
            self.audit.failure = None
        return ev

    def _audit_failed(self, exc: OSError) -> None:
        assert self.audit is not None
        first = self.audit.failure is None
        self.audit.failure = f"{self.audit.path}: {exc}"
        if first:  # stdout still carries the event; say loudly that the file does not
            line = json.dumps(
                {
                    "timestamp": rfc3339(utcnow()),
                    "event": AUDIT_WRITE_FAILED,
                    "level": "error",
                    "path": str(self.audit.path),
                    "error": str(exc),
                }
            )
            print(line, file=sys.stderr, flush=True)
