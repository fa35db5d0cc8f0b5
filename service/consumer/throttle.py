"""Protecting the ERP: an apply window (only apply between, say, 22:00 and 06:00 in a time
zone) and an apply rate limit (changes per second). Both optional, both off by default.

Pure: the consumer's loop (service/consumer/pipeline.py) asks ``ApplyWindow.state(now)``
before each poll and pauses every partition it owns while the window is closed (it stays in
its group: the next poll keeps its membership); it asks ``RateLimit`` how many events it may
take and how long to wait for the next one.

Why a token bucket of our own: the consumer must keep polling (membership, heartbeats after a
rebalance) while it waits, and must take a *number* of events that fits the budget from one
poll; the rate-limiter libraries on PyPI (pyrate-limiter, limits, aiolimiter) block or
answer yes/no per call, which would sleep inside the loop or split a batch after the poll.
The bucket is a dozen lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


@dataclass(frozen=True)
class WindowState:
    """Whether changes may be applied now, and until when that holds: ``until`` is when the
    window closes (open) or opens (closed); aware, in the window's zone."""

    open: bool
    until: datetime


@dataclass(frozen=True)
class ApplyWindow:
    """A daily window [start, end) of local wall-clock time in ``zone``; end <= start wraps
    past midnight (22:00-06:00). Daylight-saving gaps and folds follow zoneinfo: a window
    edge inside a skipped hour opens at the first existing instant after it."""

    start: time
    end: time
    zone: tzinfo
    text: str

    @classmethod
    def parse(cls, text: str, zone_name: str) -> ApplyWindow:
        """"HH:MM-HH:MM" in the IANA zone ``zone_name`` ("Asia/Shanghai", "UTC").
        Raises ValueError naming what is wrong (an unknown zone, an empty window)."""
        m = _WINDOW.fullmatch(text)
        if m is None:
            raise ValueError(f"expected HH:MM-HH:MM (e.g. 22:00-06:00), got {text!r}")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"not a time of day in {text!r}")
        start, end = time(h1, m1), time(0, 0) if h2 == 24 else time(h2, m2)
        if start == end:
            raise ValueError(f"{text!r} is empty (leave the setting empty to always apply)")
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {zone_name!r} (an IANA name such as "
                             "Asia/Shanghai or UTC)") from exc
        return cls(start, end, zone, f"{start:%H:%M}-{end:%H:%M} {zone_name}")

    def _inside(self, t: time) -> bool:
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def state(self, now: datetime) -> WindowState:
        """Open or closed at ``now`` (aware), and until when. Raises ValueError for a naive
        ``now``."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        local = now.astimezone(self.zone)
        is_open = self._inside(local.time())
        edge = self.end if is_open else self.start
        # The next wall-clock occurrence of the edge after now (today or tomorrow).
        for days in (0, 1, 2):
            day = (local + timedelta(days=days)).date()
            candidate = datetime.combine(day, edge, tzinfo=self.zone)
            # A wall time in a DST gap does not exist: normalise through UTC.
            candidate = candidate.astimezone(self.zone)
            if candidate > local:
                return WindowState(is_open, candidate)
        raise AssertionError("unreachable: a daily edge occurs within two days")


class RateLimit:
    """A token bucket: ``rate`` events per second on average, bursts up to ``burst`` (at
    least one event, by default one second's worth). Times are monotonic seconds."""

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, rate if burst is None else burst)
        self._tokens = self.capacity
        self._at = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def available(self, now: float) -> int:
        """Whole events that may be taken now."""
        self._refill(now)
        return int(self._tokens)

    def wait_s(self, now: float) -> float:
        """Seconds until one event may be taken (0: now)."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def take(self, events: int, now: float) -> None:
        """Spend ``events`` (a poll may return fewer than allowed, never more)."""
        self._refill(now)
        self._tokens -= events
