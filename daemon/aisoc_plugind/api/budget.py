"""Bound the memory request bodies take together: a byte budget shared by all requests."""

from __future__ import annotations

__all__ = ["BodyBudget"]


class BodyBudget:
    """Count the bytes of request bodies held at once (`api.max_body_bytes_total`).

    A request reserves its body's size (its Content-Length, or `api.max_body_bytes` when it
    does not say) before the body is read, and keeps it until its handler is done: the
    bytes, and what they decode to, live that long. A reservation that would go past the
    total is refused while others are held; one body alone always fits, so a total below
    `api.max_body_bytes` cannot refuse every request.
    """

    __slots__ = ("held", "holders", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self.holders = 0

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; return False (nothing reserved) when they do not fit."""
        if self.holders and self.held + size > self.total:
            return False
        self.held += size
        self.holders += 1
        return True

    def give(self, size: int) -> None:
        """Release a reservation made with `take`."""
        self.held -= size
        self.holders -= 1
