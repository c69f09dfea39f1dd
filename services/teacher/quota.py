"""Per-token quotas of one front-end: requests in flight, and prompt + completion tokens admitted per second.

Quotas are kept in the front-end's memory (no Redis round trip on the request path), so with N front-ends
behind a balancer a token may use up to N times its quota. A refusal is back-pressure, not an error: it is a
`QueueFull` (RESOURCE_EXHAUSTED / 429) with a retry-after hint, which the client honours.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.teacher.auth import Principal
from services.teacher.errors import QueueFull


@dataclass
class _Bucket:
    """A token bucket of `rate` per second holding at most one second's worth; it may go into debt so a
    request larger than a second's worth still passes when the bucket is full."""

    rate: float
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.rate

    def take(self, cost: int) -> float:
        """Takes `cost` and returns 0.0, or takes nothing and returns the seconds until it could."""
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(float(cost), self.rate)
        if self.level >= need:
            self.level -= cost
            return 0.0
        return (need - self.level) / self.rate


class Quotas:
    """The quota state of every principal seen by this front-end."""

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def pending(self, who: Principal) -> int:
        return self._pending.get(who.name, 0)

    @contextmanager
    def admit(self, who: Principal, tokens: int, nbytes: int = 0):
        """Holds one in-flight slot of `who` and `nbytes` of its queued bytes for the block; QueueFull with a
        retry-after hint when the pending, the queued-bytes or the tokens-per-second quota is spent."""
        if who.max_pending and self.pending(who) >= who.max_pending:
            raise QueueFull(
                f"this token already has {who.max_pending} requests in flight (its max_pending quota); "
                "retry when some are answered.",
                "authorization",
                retry_after_s=0.1,
            )
        held = self._bytes.get(who.name, 0)
        if who.max_queued_bytes and held + nbytes > who.max_queued_bytes:
            raise QueueFull(
                f"this token already holds {held} bytes of requests in the queue, and this one is {nbytes} bytes: "
                f"over its max_queued_bytes quota of {who.max_queued_bytes} (across all its jobs); retry when "
                "some are answered.",
                "authorization",
                retry_after_s=0.1,
            )
        if who.tokens_per_s:
            bucket = self._buckets.setdefault(who.name, _Bucket(who.tokens_per_s))
            wait = bucket.take(tokens)
            if wait:
                raise QueueFull(
                    f"this token's quota of {who.tokens_per_s:g} scored tokens per second is spent; "
                    f"retry in {wait:.2f}s.",
                    "authorization",
                    retry_after_s=wait,
                )
        self._pending[who.name] = self.pending(who) + 1
        if nbytes:
            self._bytes[who.name] = held + nbytes
        try:
            yield
        finally:
            left = self._pending[who.name] - 1
            if left:
                self._pending[who.name] = left
            else:
                del self._pending[who.name]
            held = self._bytes.pop(who.name, 0) - nbytes
            if held:
                self._bytes[who.name] = held
