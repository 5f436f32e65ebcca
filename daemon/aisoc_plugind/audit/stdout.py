"""Print events on stdout for journald or a terminal: one line each, written by the writer.

With `log.format = "json"` the line is the audit line itself (the chosen schema, with the
chain field); `console` renders it for people. Under systemd (`JOURNAL_STREAM` naming our
stdout) each line starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info,
`<7>` debug) so journald files it at the right level. A broken stdout never stops the writer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

__all__ = ["LEVELS", "StdoutSink", "journald_stream"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_PRIORITY = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>"}


def journald_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Return True when `$JOURNAL_STREAM` names `stream`'s file (systemd sd_journal_stream)."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class StdoutSink:
    """Collect one batch of stdout lines and write them with one call."""

    def __init__(self, stream: TextIO, *, console: bool = False, journald: bool = False) -> None:
        self._stream = stream
        self._journald = journald
        self._console = structlog.dev.ConsoleRenderer(colors=False) if console else None
        self._lines: list[str] = []
        self.errors = 0

    def add(self, level: str, line: bytes, event: Mapping[str, Any]) -> None:
        """Queue one event's line (the audit line, or the event for console rendering)."""
        text = line.decode("ascii") if self._console is None else self._render(event)
        if self._journald:
            text = _PRIORITY.get(level, "<6>") + text
        self._lines.append(text)

    def _render(self, event: Mapping[str, Any]) -> str:
        assert self._console is not None
        fields = dict(event)
        name = str(fields.pop("event", ""))
        text = str(self._console(None, "", {"event": name, **fields}))
        # A path from a non-UTF-8 file name must not make printing the event fail.
        return " ".join(text.encode("utf-8", "backslashreplace").decode("utf-8").splitlines())

    def flush(self) -> None:
        """Write the queued lines; on a broken stdout count the loss and go on."""
        if not self._lines:
            return
        text, self._lines = "\n".join(self._lines) + "\n", []
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self.errors += 1
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()
