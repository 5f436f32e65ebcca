"""Name the daemon's events and write each one to stdout (structlog) and the JSONL audit file.

One event = one JSON object, serialised once; the same line goes to the audit file (one
`write()` on an O_APPEND descriptor, so a line is never split or interleaved) and, with
`log.format = "json"`, to stdout. `seq` is monotonic per daemon run and matches file order.
Keys that could carry secrets (tokens, payloads) are dropped before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import structlog

from aisoc_plugind.core.records import rfc3339, utcnow

DAEMON_STARTED = "daemon.started"
DAEMON_READY = "daemon.ready"
DAEMON_RELOADING = "daemon.reloading"
DAEMON_STOPPING = "daemon.stopping"
DAEMON_STOPPED = "daemon.stopped"
CONFIG_WARNING = "config.warning"
KEY_SKIPPED = "trust.key.skipped"
KEYS_CHANGED = "trust.keys.changed"
AUDIT_REOPENED = "audit.reopened"
AUDIT_WRITE_FAILED = "audit.write_failed"
PLUGIN_DISCOVERED = "plugin.discovered"
PLUGIN_LOADED = "plugin.loaded"
PLUGIN_ENABLED = "plugin.enabled"
PLUGIN_DISABLED = "plugin.disabled"
PLUGIN_UNLOADED = "plugin.unloaded"
PLUGIN_LOAD_FAILED = "plugin.load.failed"
PLUGIN_SIGNATURE_VERIFIED = "plugin.signature.verified"
PLUGIN_SIGNATURE_INVALID = "plugin.signature.invalid"
PLUGIN_SIGNATURE_UNSIGNED = "plugin.signature.unsigned"
PLUGIN_SIGNATURE_SKIPPED = "plugin.signature.skipped"
PLUGIN_DUPLICATE_ID = "plugin.duplicate_id"
PLUGIN_PATH_MISSING = "plugin.path.missing"
PLUGIN_RELOAD_COMPLETED = "plugin.reload.completed"
PLUGIN_RELOAD_FAILED = "plugin.reload.failed"
PLUGIN_RUN_COMPLETED = "plugin.run.completed"
PLUGIN_RUN_FAILED = "plugin.run.failed"
PLUGIN_TEARDOWN_FAILED = "plugin.teardown.failed"
PLUGIN_INSTALL_COMPLETED = "plugin.install.completed"
PLUGIN_INSTALL_FAILED = "plugin.install.failed"
API_DENIED = "api.denied"

# High-volume events that are written but not fsync'ed under `audit.fsync = "mutations"`.
_VOLUME_EVENTS = frozenset({PLUGIN_RUN_COMPLETED, PLUGIN_RUN_FAILED})
# Keys whose values may be secrets; they never reach stdout or the audit file.
SECRET_KEYS = frozenset({"token", "authorization", "payload", "context", "result", "password",
                         "secret", "config"})
_FIRST_KEYS = ("timestamp", "event", "level", "seq")


class FsyncPolicy(StrEnum):
    """When audit lines are forced to stable storage."""

    ALWAYS = "always"
    MUTATIONS = "mutations"
    NEVER = "never"


class AuditSink:
    """Append whole JSON lines to the audit file; reopen it after rotation."""

    def __init__(self, path: Path, fsync: FsyncPolicy = FsyncPolicy.MUTATIONS) -> None:
        self.path = path
        self.fsync = fsync
        self.failure: str | None = None
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def open(self) -> None:
        """Open (creating 0600, and the parent dir 0750) for append."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        old, self._fd, self._ident = self._fd, fd, (st.st_dev, st.st_ino)
        if old is not None:
            os.close(old)

    def reopen(self) -> None:
        """Open the path again (after logrotate's `create` moved the old file away)."""
        self.open()

    def close(self) -> None:
        """Flush to disk and close."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def write(self, line: str, *, durable: bool) -> None:
        """Append one line in a single write; raises OSError on failure."""
        if self._fd is None or self._rotated():
            self.open()
        assert self._fd is not None
        data = (line + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to audit file ({written} of {len(data)} bytes)")
        if self.fsync is FsyncPolicy.ALWAYS or (durable and self.fsync is FsyncPolicy.MUTATIONS):
            os.fsync(self._fd)

    def probe(self) -> str | None:
        """Check (one stat) that the path still names an open, writable file; return the failure.

        A moved or vanished file is reopened here, so a gone directory is noticed before a
        change is made rather than after. A full disk shows only on the next write.
        """
        if self._fd is None or self._rotated():
            try:
                self.open()
            except OSError as exc:
                self.failure = f"{self.path}: {exc}"
                return self.failure
            self.failure = None  # reopened: the next write says whether it really works
        return self.failure

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:  # gone, or a path component is no longer a directory
            return True
        return (st.st_dev, st.st_ino) != self._ident


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
            "timestamp": rfc3339(utcnow()), "event": ev.pop("event"),
            "level": ev.pop("_level"), "seq": ev.pop("_seq"),
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
            line = json.dumps({"timestamp": rfc3339(utcnow()), "event": AUDIT_WRITE_FAILED,
                               "level": "error", "path": str(self.audit.path),
                               "error": str(exc)})
            print(line, file=sys.stderr, flush=True)

