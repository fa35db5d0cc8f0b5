"""service.consumer.policy: batch/retry presets and the dead-letter circuit breaker."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest

from service.consumer.policy import BatchPolicy, CircuitBreaker, DlqLimit, RetryPolicy
from service.errors import CircuitOpen, SyncError

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
    assert strict.max_invalid_ratio < default.max_invalid_ratio < 1 < disabled.max_invalid_ratio
    assert strict.max_consecutive_invalid < default.max_consecutive_invalid \
        < disabled.max_consecutive_invalid
    assert {f.name for f in dataclasses.fields(DlqLimit)} == {
        "max_invalid_ratio", "max_consecutive_invalid", "window", "min_samples"}


@pytest.mark.parametrize(("preset", "field", "value"), [
    (BatchPolicy.REALTIME, "max_events", 1),
    (BatchPolicy.MICRO_BATCH, "max_wait_ms", 0),
    (DlqLimit.STRICT, "max_invalid_ratio", 0.9),
    (DlqLimit.DEFAULT, "window", 1),
    (DlqLimit.DISABLED, "max_consecutive_invalid", 1),
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

LIMIT = DlqLimit(max_invalid_ratio=0.5, max_consecutive_invalid=1000, window=10, min_samples=4)


def test_healthy_traffic_never_trips() -> None:
    breaker = CircuitBreaker(DlqLimit.STRICT)
    for _ in range(50):
        breaker.record([OK] * 100)
    assert breaker.would_trip([OK] * 1000) is None


def test_occasional_invalid_messages_do_not_trip() -> None:
    breaker = CircuitBreaker(DlqLimit.DEFAULT)
    for _ in range(20):
        breaker.record([BAD] + [OK] * 9)  # 10% invalid, never two in a row
    assert breaker.would_trip([BAD, OK, OK]) is None


def test_ratio_is_not_judged_before_min_samples() -> None:
    breaker = CircuitBreaker(LIMIT)
    assert breaker.would_trip([BAD, BAD, BAD]) is None  # 100% but only 3 samples
    breaker.record([BAD, BAD, BAD])
    reason = breaker.would_trip([BAD])  # the 4th sample reaches min_samples
    assert reason is not None and "100%" in reason and "4" in reason


def test_ratio_over_the_limit_trips_and_exactly_at_it_does_not() -> None:
    breaker = CircuitBreaker(LIMIT)
    assert breaker.would_trip([BAD, OK, BAD, OK]) is None  # exactly 50%: not "more than"
    assert breaker.would_trip([BAD, OK, BAD, BAD]) is not None  # 75%
    with pytest.raises(CircuitOpen, match="75%"):
        breaker.record([BAD, OK, BAD, BAD])


def test_ratio_is_over_the_sliding_window_only() -> None:
    breaker = CircuitBreaker(LIMIT)  # window 10
    breaker.record([BAD, OK] * 2 + [OK] * 6)  # 2 invalid of 10
    breaker.record([OK] * 10)  # the old invalid ones slide out
    assert breaker.would_trip([BAD] * 5) is None  # 5 of the last 10: not over 50%
    breaker.record([BAD] * 5)
    reason = breaker.would_trip([BAD])  # 6 of the last 10
    assert reason is not None and "60%" in reason and "last 10" in reason


def test_ratio_counts_recorded_history_and_the_new_batch_together() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record([OK, OK, BAD, BAD, OK, BAD, OK, OK])  # 3 of 8
    assert breaker.would_trip([BAD, BAD]) is None  # 5 of 10: at the limit, not over
    assert breaker.would_trip([BAD, BAD, BAD]) is not None  # 6 of the last 10


def test_consecutive_invalid_trips_even_under_the_ratio() -> None:
    limit = DlqLimit.DEFAULT  # 50 in a row allowed, the 51st trips
    breaker = CircuitBreaker(limit)
    breaker.record([OK] * limit.window)  # a long healthy history keeps the ratio low
    breaker.record([BAD] * limit.max_consecutive_invalid)
    reason = breaker.would_trip([BAD])
    assert reason == f"{limit.max_consecutive_invalid + 1} invalid messages in a row"


def test_one_valid_message_resets_the_consecutive_count() -> None:
    limit = DlqLimit(max_invalid_ratio=1.01, max_consecutive_invalid=3, window=100,
                     min_samples=1)
    breaker = CircuitBreaker(limit)
    breaker.record([BAD, BAD, BAD, OK, BAD, BAD, BAD, OK])
    breaker.record([BAD, BAD, BAD])
    assert breaker.would_trip([BAD]) == "4 invalid messages in a row"
    assert breaker.would_trip([OK, BAD, BAD, BAD]) is None


def test_consecutive_count_spans_batches_within_one_check() -> None:
    limit = DlqLimit(max_invalid_ratio=1.01, max_consecutive_invalid=3, window=100,
                     min_samples=1)
    breaker = CircuitBreaker(limit)
    breaker.record([OK, BAD, BAD])
    assert breaker.would_trip([BAD, BAD]) == "4 invalid messages in a row"


def test_would_trip_does_not_mutate_state() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record([OK, BAD, OK])
    snapshot = (list(breaker._outcomes), breaker._consecutive)
    assert breaker.would_trip([BAD] * 20) is not None
    assert breaker.would_trip([OK] * 20) is None
    assert (list(breaker._outcomes), breaker._consecutive) == snapshot
    # ... and behaviour afterwards is as if the checks never happened.
    fresh = CircuitBreaker(LIMIT)
    fresh.record([OK, BAD, OK])
    for batch in ([BAD], [BAD, BAD], [OK, BAD, BAD, BAD]):
        assert breaker.would_trip(batch) == fresh.would_trip(batch)


def test_a_tripping_batch_is_not_recorded() -> None:
    breaker = CircuitBreaker(LIMIT)
    breaker.record([OK] * 4)
    with pytest.raises(CircuitOpen) as info:
        breaker.record([BAD] * 6)
    assert isinstance(info.value, SyncError)
    assert list(breaker._outcomes) == [OK] * 4 and breaker._consecutive == 0
    breaker.record([OK, BAD])  # the breaker keeps working on what was really recorded
    assert list(breaker._outcomes) == [OK] * 5 + [BAD]


def test_recorded_history_is_bounded_by_the_window() -> None:
    breaker = CircuitBreaker(LIMIT)
    for _ in range(7):
        breaker.record([OK, BAD, OK])
    assert len(breaker._outcomes) == LIMIT.window


def test_disabled_never_trips() -> None:
    breaker = CircuitBreaker(DlqLimit.DISABLED)
    for _ in range(5):
        breaker.record([BAD] * 1000)
    assert breaker.would_trip([BAD] * 10_000) is None


def test_strict_trips_sooner_than_default() -> None:
    batch = [OK] * 20 + [BAD] * 11 + [OK] * 9  # never over 35% invalid, 11 in a row
    assert CircuitBreaker(DlqLimit.STRICT).would_trip(batch) is not None
    assert CircuitBreaker(DlqLimit.DEFAULT).would_trip(batch) is None


def test_reconnect_preset_backs_off_exponentially_up_to_its_cap() -> None:
    delays = RetryPolicy.RECONNECT.delays()
    taken = [next(delays) for _ in range(8)]
    assert taken[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(taken) == RetryPolicy.RECONNECT.max_s == 15.0
    assert RetryPolicy() == RetryPolicy.DEFAULT
