"""service.consumer.policy: batch/retry presets and the dead-letter circuit breaker."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest

from service.consumer.policy import (
    BatchPolicy,
    CircuitBreaker,
    DlqLimit,
    RetryPolicy,
    Trip,
    percent,
)
from service.settings import Settings

OK, BAD = False, True  # outcomes: True = invalid


# ---- presets -------------------------------------------------------------------------------

def test_batch_presets() -> None:
    assert BatchPolicy(max_events=500, max_wait_ms=0) == BatchPolicy.REALTIME
    assert BatchPolicy.MICRO_BATCH.max_wait_ms > 0
    assert BatchPolicy.MICRO_BATCH.max_events > BatchPolicy.REALTIME.max_events
    # Presets are class attributes, not dataclass fields.
    assert [f.name for f in dataclasses.fields(BatchPolicy)] == ["max_events", "max_wait_ms"]


def test_dlq_presets_are_ordered_by_strictness() -> None:
    strict, default, disabled = DlqLimit.STRICT, DlqLimit.DEFAULT, DlqLimit.DISABLED
    assert default == DlqLimit()
    assert strict.max_ratio < default.max_ratio < 1 < disabled.max_ratio
    assert strict.min_messages < default.min_messages
    assert {f.name for f in dataclasses.fields(DlqLimit)} == {
        "max_ratio", "min_messages", "window_s"}


def test_the_limit_comes_from_settings() -> None:
    assert DlqLimit.from_settings(Settings()) == DlqLimit.DEFAULT
    env = {"CRM_ERP_SYNC_BREAKER_MAX_RATIO": "0.2", "CRM_ERP_SYNC_BREAKER_MIN_MESSAGES": "30",
           "CRM_ERP_SYNC_BREAKER_WINDOW_S": "600"}
    assert DlqLimit.from_settings(Settings.from_env(env)) == DlqLimit(0.2, 30, 600.0)


@pytest.mark.parametrize(("preset", "field", "value"), [
    (BatchPolicy.REALTIME, "max_events", 1),
    (BatchPolicy.MICRO_BATCH, "max_wait_ms", 0),
    (DlqLimit.STRICT, "max_ratio", 0.9),
    (DlqLimit.DEFAULT, "window_s", 1),
    (DlqLimit.DISABLED, "min_messages", 1),
    (RetryPolicy(), "max_s", 0.0),
])
def test_presets_are_frozen(preset: object, field: str, value: object) -> None:
    before = copy.copy(preset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(preset, field, value)
    assert preset == before


# ---- retry ---------------------------------------------------------------------------------

def test_retry_delays_grow_then_cap() -> None:
    delays = RetryPolicy().delays()
    got = [next(delays) for _ in range(10)]
    assert got[:6] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
    assert got[6:] == [10.0] * 4
    assert all(a <= b for a, b in itertools.pairwise(got))
    assert delays.attempts == 10


def test_retry_custom_policy_and_independent_iterators() -> None:
    policy = RetryPolicy(initial_s=1.0, max_s=5.0, multiplier=3.0)
    first = policy.delays()
    assert [next(first) for _ in range(4)] == [1.0, 3.0, 5.0, 5.0]
    second = policy.delays()  # a new failure starts again from the initial delay
    assert next(second) == 1.0
    assert second.attempts == 1


def test_retry_never_exceeds_cap_even_if_initial_is_above_it() -> None:
    delays = RetryPolicy(initial_s=0.5, max_s=0.5).delays()
    assert {next(delays) for _ in range(5)} == {0.5}


# ---- circuit breaker -----------------------------------------------------------------------

LIMIT = DlqLimit(max_ratio=0.5, min_messages=10, window_s=60.0)
P1, P2 = ("crm.sales", 1), ("crm.sales", 2)


def outcomes(flags: list[bool], start: int = 0) -> list[tuple[int, bool]]:
    return [(start + i, bad) for i, bad in enumerate(flags)]


def test_healthy_traffic_never_trips() -> None:
    breaker = CircuitBreaker(DlqLimit.STRICT)
    for n in range(50):
        breaker.record(P1, outcomes([OK] * 100, n * 100), now=float(n))
    assert breaker.would_trip(P1, outcomes([OK] * 1000, 5000), now=50.0) is None


def test_a_cold_window_is_never_judged() -> None:
    breaker = CircuitBreaker(LIMIT)
    assert breaker.would_trip(P1, outcomes([BAD] * 9), now=0.0) is None  # 100%, 9 < 10
    breaker.record(P1, outcomes([BAD] * 9), now=0.0)
    trip = breaker.would_trip(P1, outcomes([BAD], 9), now=1.0)  # the 10th message
    assert trip == Trip("crm.sales", 1, 10, 10, LIMIT)


def test_a_lull_lets_the_window_go_cold_again() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record(P1, outcomes([BAD] * 9), now=0.0)
    # 61 s later the nine are out of the window: nine more bad ones are a cold window again.
    assert breaker.would_trip(P1, outcomes([BAD] * 9, 9), now=61.0) is None
    assert breaker.window_of(P1, now=61.0) == (0, 0)


def test_ratio_at_the_limit_trips_and_below_it_does_not() -> None:
    breaker = CircuitBreaker(LIMIT)
    assert breaker.would_trip(P1, outcomes([BAD, OK] * 5), now=0.0) is not None  # 50%
    assert breaker.would_trip(P1, outcomes([BAD] * 4 + [OK] * 6), now=0.0) is None  # 40%


def test_partitions_are_judged_separately() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record(P2, outcomes([OK] * 1000), now=0.0)  # a healthy neighbour dilutes nothing
    trip = breaker.would_trip(P1, outcomes([BAD] * 8 + [OK] * 4), now=0.0)
    assert trip is not None and (trip.topic, trip.partition) == P1
    assert trip.messages == 12 and trip.dead_letters == 8
    assert breaker.would_trip(P2, outcomes([BAD] * 8, 1000), now=0.0) is None


def test_history_and_the_new_slice_count_together() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record(P1, outcomes([OK] * 6 + [BAD] * 2), now=0.0)  # 2 of 8
    assert breaker.would_trip(P1, outcomes([BAD] * 2, 8), now=1.0) is None  # 4 of 10
    trip = breaker.would_trip(P1, outcomes([BAD] * 4, 8), now=1.0)  # 6 of 12
    assert trip is not None and (trip.messages, trip.dead_letters) == (12, 6)


def test_would_trip_does_not_record() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record(P1, outcomes([OK, BAD, OK]), now=0.0)
    assert breaker.would_trip(P1, outcomes([BAD] * 20, 3), now=0.0) is not None
    assert breaker.window_of(P1, now=0.0) == (3, 1)


def test_memory_is_per_second_not_per_message() -> None:
    breaker = CircuitBreaker(DlqLimit.DEFAULT)
    for n in range(10_000):
        breaker.record(P1, [(n, False)], now=100.0 + n / 1000)  # 1,000 a second for 10 s
    assert len(breaker._windows[P1].buckets) == 10
    assert breaker.window_of(P1, now=109.9) == (10_000, 0)


def test_a_resume_forgets_the_window_and_accepts_what_was_seen() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record(P1, outcomes([BAD] * 5), now=0.0)
    burst = outcomes([BAD] * 300, 5)
    assert breaker.would_trip(P1, burst, now=1.0) is not None
    breaker.resumed(P1, through_offset=304)
    assert breaker.window_of(P1, now=1.0) == (0, 0)
    assert breaker.would_trip(P1, burst, now=2.0) is None  # the operator looked at these
    breaker.record(P1, burst, now=2.0)
    assert breaker.window_of(P1, now=2.0) == (0, 0)
    later = outcomes([BAD] * 10, 305)  # new bad messages are judged again
    assert breaker.would_trip(P1, later, now=3.0) is not None


def test_resumed_is_idempotent() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.resumed(P1, 10)
    breaker.record(P1, outcomes([BAD] * 5, 11), now=0.0)
    breaker.resumed(P1, 10)  # the consumer re-reads the same resumed row every poll
    assert breaker.window_of(P1, now=0.0) == (5, 5)


def test_disabled_never_trips() -> None:
    breaker = CircuitBreaker(DlqLimit.DISABLED)
    for n in range(5):
        breaker.record(P1, outcomes([BAD] * 1000, n * 1000), now=float(n))
    assert breaker.would_trip(P1, outcomes([BAD] * 10_000, 5000), now=5.0) is None


def test_strict_trips_sooner_than_default() -> None:
    slice_ = outcomes([OK] * 60 + [BAD] * 20 + [OK] * 20)  # 20% of 100
    assert CircuitBreaker(DlqLimit.STRICT).would_trip(P1, slice_, now=0.0) is not None
    assert CircuitBreaker(DlqLimit.DEFAULT).would_trip(P1, slice_, now=0.0) is None


def test_the_message_says_the_measured_ratio_and_the_limit_plainly() -> None:
    trip = Trip("crm.sales", 1, 200, 124, DlqLimit(0.5, 100, 60.0))
    assert trip.message().startswith(
        "tripped: 62% of the last 200 messages on crm.sales[1] were dead letters, limit 50%")
    assert percent(0.625) == "62.5%" and percent(0.5) == "50%" and percent(1.0) == "100%"
    # Rounding never makes a tripped ratio look like it is within the limit.
    assert percent(0.5004) != percent(0.5)


def test_reconnect_preset_backs_off_exponentially_up_to_its_cap() -> None:
    delays = RetryPolicy.RECONNECT.delays()
    taken = [next(delays) for _ in range(8)]
    assert taken[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(taken) == RetryPolicy.RECONNECT.max_s == 15.0
    assert RetryPolicy() == RetryPolicy.DEFAULT


def test_the_default_settings_are_the_near_realtime_preset() -> None:
    from service.settings import Settings

    settings = Settings()
    assert (BatchPolicy(settings.batch_max_events, settings.batch_max_wait_ms)
            == BatchPolicy.NEAR_REALTIME)
    assert 0 < BatchPolicy.NEAR_REALTIME.max_wait_ms < BatchPolicy.MICRO_BATCH.max_wait_ms
