"""Policies are frozen values with named presets, chosen by configuration, not by ``if``s."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from service.errors import CircuitOpen


@dataclass(frozen=True)
class BatchPolicy:
    """How many events one ERP transaction may take and how long to wait to fill it.

    The brief's question of sync frequency: real time by default (apply whatever one poll
    returned, at once); micro-batches trade a bounded delay for throughput.
    """

    max_events: int
    max_wait_ms: int

    REALTIME: ClassVar[BatchPolicy]
    MICRO_BATCH: ClassVar[BatchPolicy]


BatchPolicy.REALTIME = BatchPolicy(max_events=500, max_wait_ms=0)
BatchPolicy.MICRO_BATCH = BatchPolicy(max_events=5000, max_wait_ms=1000)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures; there is no attempt limit: transient means retry.

    ``DEFAULT`` retries a batch (ERP conflicts, a refused dead-letter send); ``RECONNECT``
    paces reconnection to a broker or database that went away (restart, kill, failover):
    the first attempt comes quickly (a fast restart is over in about a second), later ones
    at most every 15 s so that a long outage costs the peer almost nothing.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    multiplier: float = 2.0

    DEFAULT: ClassVar[RetryPolicy]
    RECONNECT: ClassVar[RetryPolicy]

    def delays(self) -> DelayIter:
        return DelayIter(self)


RetryPolicy.DEFAULT = RetryPolicy()
RetryPolicy.RECONNECT = RetryPolicy(initial_s=0.5, max_s=15.0, multiplier=2.0)


class DelayIter:
    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._next = policy.initial_s
        self.attempts = 0

    def __iter__(self) -> DelayIter:
        return self

    def __next__(self) -> float:
        delay = self._next
        self._next = min(self._next * self._policy.multiplier, self._policy.max_s)
        self.attempts += 1
        return delay


@dataclass(frozen=True)
class DlqLimit:
    """Circuit breaker (arroyo's DlqLimit): stop instead of draining a topic into the DLQ.

    Trips when, over the last ``window`` messages (once at least ``min_samples`` were seen),
    more than ``max_invalid_ratio`` were invalid, or when ``max_consecutive_invalid`` invalid
    messages came in a row.
    """

    max_invalid_ratio: float = 0.5
    max_consecutive_invalid: int = 50
    window: int = 200
    min_samples: int = 20

    STRICT: ClassVar[DlqLimit]
    DEFAULT: ClassVar[DlqLimit]
    DISABLED: ClassVar[DlqLimit]


DlqLimit.STRICT = DlqLimit(max_invalid_ratio=0.1, max_consecutive_invalid=10)
DlqLimit.DEFAULT = DlqLimit()
DlqLimit.DISABLED = DlqLimit(max_invalid_ratio=1.01, max_consecutive_invalid=2**62)


@dataclass
class CircuitBreaker:
    limit: DlqLimit
    _outcomes: deque[bool] = field(default_factory=deque)
    _consecutive: int = 0

    def would_trip(self, outcomes: list[bool]) -> str | None:
        """Check a batch's outcomes (True = invalid) before anything is dead-lettered."""
        window = deque(self._outcomes, maxlen=self.limit.window)
        consecutive = self._consecutive
        for invalid in outcomes:
            window.append(invalid)
            consecutive = consecutive + 1 if invalid else 0
            if consecutive > self.limit.max_consecutive_invalid:
                return f"{consecutive} invalid messages in a row"
            if len(window) >= self.limit.min_samples:
                ratio = sum(window) / len(window)
                if ratio > self.limit.max_invalid_ratio:
                    return (f"{ratio:.0%} of the last {len(window)} messages were invalid "
                            f"(limit {self.limit.max_invalid_ratio:.0%})")
        return None

    def record(self, outcomes: list[bool]) -> None:
        reason = self.would_trip(outcomes)
        if reason:
            raise CircuitOpen(reason)
        for invalid in outcomes:
            self._outcomes.append(invalid)
            if len(self._outcomes) > self.limit.window:
                self._outcomes.popleft()
            self._consecutive = self._consecutive + 1 if invalid else 0
