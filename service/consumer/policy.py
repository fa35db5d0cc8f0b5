"""Policies are frozen values with named presets, chosen by configuration, not by ``if``s."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from service.settings import Settings


@dataclass(frozen=True)
class BatchPolicy:
    """How many events one ERP transaction may take and how long to wait to fill it.

    The brief's question of sync frequency: near real time by default (what arrives within
    25 ms of a poll's start goes into one ERP transaction: at low rates a one-event
    transaction's fixed cost would be the ERP's main load; see Settings.batch_max_wait_ms);
    real time applies whatever one poll returned, at once; micro-batches trade a longer
    bounded delay for throughput.
    """

    max_events: int
    max_wait_ms: int

    REALTIME: ClassVar[BatchPolicy]
    NEAR_REALTIME: ClassVar[BatchPolicy]
    MICRO_BATCH: ClassVar[BatchPolicy]


BatchPolicy.REALTIME = BatchPolicy(max_events=500, max_wait_ms=0)
BatchPolicy.NEAR_REALTIME = BatchPolicy(max_events=500, max_wait_ms=25)
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
    """Circuit breaker limits (after arroyo's DlqLimit): pause a partition instead of draining
    it into the dead-letter topic.

    A partition trips when, among its messages of the last ``window_s`` seconds, there were at
    least ``min_messages`` and the share that would be dead-lettered reached
    ``max_ratio`` (0 < ratio <= 1; above 1 it never trips). Below ``min_messages`` the window
    is "cold" and is never judged: a lull, a restart or a small bulk import of bad rows must
    not trip it. There is deliberately no "N invalid in a row" rule: a run of bad messages
    long enough to matter is a high ratio over enough messages anyway.
    """

    max_ratio: float = 0.5
    min_messages: int = 100
    window_s: float = 60.0

    STRICT: ClassVar[DlqLimit]
    DEFAULT: ClassVar[DlqLimit]
    DISABLED: ClassVar[DlqLimit]

    @classmethod
    def from_settings(cls, settings: Settings) -> DlqLimit:
        """CRM_ERP_SYNC_BREAKER_MAX_RATIO / _MIN_MESSAGES / _WINDOW_S."""
        return cls(max_ratio=settings.breaker_max_ratio,
                   min_messages=settings.breaker_min_messages,
                   window_s=settings.breaker_window_s)


DlqLimit.STRICT = DlqLimit(max_ratio=0.1, min_messages=20)
DlqLimit.DEFAULT = DlqLimit()
DlqLimit.DISABLED = DlqLimit(max_ratio=math.inf)


def percent(ratio: float) -> str:
    """A ratio as a percentage, with a decimal only when the whole number would hide it
    (0.625 -> '62.5%', 0.5 -> '50%')."""
    whole = f"{ratio:.0%}"
    return whole if abs(round(ratio * 100) - ratio * 100) < 1e-9 else f"{ratio:.1%}"


@dataclass(frozen=True)
class Trip:
    """A partition that reached its dead-letter limit: what was measured, and the limit."""

    topic: str
    partition: int
    messages: int
    dead_letters: int
    limit: DlqLimit

    @property
    def ratio(self) -> float:
        return self.dead_letters / self.messages

    def message(self) -> str:
        return (f"tripped: {percent(self.ratio)} of the last {self.messages} messages on "
                f"{self.topic}[{self.partition}] were dead letters, limit "
                f"{percent(self.limit.max_ratio)} (window {self.limit.window_s:g}s, judged from "
                f"{self.limit.min_messages} messages on)")


Partition = tuple[str, int]


class _Window:
    """Counts per whole second over the last ``window_s``: memory is bounded by the window's
    length in seconds, not by the message rate (1,000 messages/s stay one bucket a second)."""

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, messages, dead letters]
        self.messages = 0
        self.dead_letters = 0

    def expire(self, now: float, window_s: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - window_s:
            _, n, bad = self.buckets.popleft()
            self.messages -= n
            self.dead_letters -= bad

    def add(self, now: float, messages: int, dead_letters: int) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += messages
            self.buckets[-1][2] += dead_letters
        else:
            self.buckets.append([second, messages, dead_letters])
        self.messages += messages
        self.dead_letters += dead_letters


@dataclass
class CircuitBreaker:
    """Per-partition dead-letter ratio over a time window (``now`` is a monotonic clock in
    seconds, passed in so that tests need no sleeping).

    Outcomes are (offset, invalid) pairs. ``would_trip`` judges a partition's slice of a
    batch before anything of it is dead-lettered; ``record`` adds it once the batch is
    committed (a batch retried after a transient failure is not counted twice).
    ``resumed(partition, through_offset)`` forgets a partition's window after an operator's
    resume, and ignores the offsets up to ``through_offset`` (the messages the operator looked
    at) so that they do not trip it again at once.
    """

    limit: DlqLimit
    _windows: dict[Partition, _Window] = field(default_factory=dict)
    _accepted_through: dict[Partition, int] = field(default_factory=dict)

    def _counted(self, partition: Partition, outcomes: list[tuple[int, bool]]
                 ) -> tuple[int, int]:
        through = self._accepted_through.get(partition, -1)
        counted = [invalid for offset, invalid in outcomes if offset > through]
        return len(counted), sum(counted)

    def would_trip(self, partition: Partition, outcomes: list[tuple[int, bool]],
                   now: float) -> Trip | None:
        window = self._windows.get(partition)
        if window is not None:
            window.expire(now, self.limit.window_s)
        messages, dead = self._counted(partition, outcomes)
        if window is not None:
            messages += window.messages
            dead += window.dead_letters
        if messages < self.limit.min_messages or messages == 0:
            return None  # a cold window is never judged
        if dead / messages < self.limit.max_ratio:
            return None
        return Trip(partition[0], partition[1], messages, dead, self.limit)

    def record(self, partition: Partition, outcomes: list[tuple[int, bool]],
               now: float) -> None:
        messages, dead = self._counted(partition, outcomes)
        if not messages:
            return
        window = self._windows.setdefault(partition, _Window())
        window.expire(now, self.limit.window_s)
        window.add(now, messages, dead)

    def resumed(self, partition: Partition, through_offset: int) -> None:
        """Idempotent: only a resume through a later offset than known forgets the window."""
        if through_offset <= self._accepted_through.get(partition, -1):
            return
        self._windows.pop(partition, None)
        self._accepted_through[partition] = through_offset

    def window_of(self, partition: Partition, now: float) -> tuple[int, int]:
        """(messages, dead letters) in the partition's current window."""
        window = self._windows.get(partition)
        if window is None:
            return 0, 0
        window.expire(now, self.limit.window_s)
        return window.messages, window.dead_letters
