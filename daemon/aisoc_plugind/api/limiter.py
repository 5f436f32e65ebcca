"""Budget denied requests per peer with token buckets, so denials cannot flood the audit file."""

from __future__ import annotations

import time

__all__ = ["DenialLimiter"]


class DenialLimiter:
    """Per-peer token buckets for requests that are denied anyway (research item 20).

    Only denials spend from a bucket, so a client with a valid token is never slowed down by
    a noisy neighbour on the same address (everything on loopback shares one). Past the
    budget a would-be 401/403/413/421 is answered 429 and is not written to the audit file
    one line each: the peer's first limited request is audited (`reason: rate_limited`), the
    rest are counted in metrics and reported as `suppressed` on the peer's next audited
    denial. This bounds how many audit lines (and fsyncs) an unauthenticated caller can cause.
    """

    __slots__ = ("_buckets", "_burst", "_rate", "_suppressed")

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst, self._rate = float(burst), per_second
        self._buckets: dict[str, tuple[float, float]] = {}
        # Peers in the limited state -> denials answered 429 without an audit line so far.
        self._suppressed: dict[str, int] = {}

    def take(self, peer: str) -> bool:
        """Spend one denial for `peer`; return False when its budget is exhausted."""
        now = time.monotonic()
        tokens, last = self._buckets.get(peer, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if len(self._buckets) > 10_000:  # bounded memory under many peers
            self._buckets.clear()
        allowed = tokens >= 1
        self._buckets[peer] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def suppress(self, peer: str) -> bool:
        """Record a limited denial; return True when it is the first one (to be audited)."""
        if peer in self._suppressed:
            self._suppressed[peer] += 1
            return False
        self._suppressed[peer] = 0
        return True

    def pending(self, peer: str) -> int:
        """Leave the limited state; return how many denials went unaudited in it."""
        return self._suppressed.pop(peer, 0)
