"""Format and parse the daemon's timestamps: RFC 3339, UTC, microseconds, a trailing `Z`."""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["parse_rfc3339", "rfc3339", "rfc3339_now", "utcnow"]

_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Format a UTC datetime as RFC 3339 with microseconds and a `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rfc3339_now() -> str:
    """Return `rfc3339(utcnow())`, cheaply: the date and time of day are formatted once a
    second (every event carries a timestamp)."""
    global _second
    now = time.time()
    whole = int(now)
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((now - whole) * 1_000_000):06d}Z"


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 time that names its zone; raise ValueError otherwise."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a time zone is required")
    return moment
