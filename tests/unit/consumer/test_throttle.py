"""The apply window and the rate limit (service/consumer/throttle.py): pure, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.consumer.throttle import ApplyWindow, RateLimit
from service.errors import ConfigError
from service.settings import Settings

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(hour: int, minute: int = 0, day: int = 29, zone: ZoneInfo = SHANGHAI) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=zone)


def test_a_window_over_midnight_is_open_at_night_and_says_when_it_closes() -> None:
    w = ApplyWindow.parse("22:00-06:00", "Asia/Shanghai")
    for t in (at(22), at(23, 59), at(0), at(5, 59)):
        assert w.state(t).open, t
    for t in (at(6), at(12), at(21, 59)):
        assert not w.state(t).open, t
    assert w.state(at(23)).until == at(6, day=30)
    assert w.state(at(3)).until == at(6)
    assert w.state(at(12)).until == at(22)
    assert w.state(at(6)).until == at(22)  # the end is excluded: closed from 06:00


def test_the_window_is_read_in_its_own_zone_whatever_the_clock_says() -> None:
    w = ApplyWindow.parse("22:00-06:00", "Asia/Shanghai")
    # 15:00 UTC is 23:00 in Shanghai (UTC+8): open; 23:00 UTC is 07:00 there: closed.
    assert w.state(datetime(2026, 11, 29, 15, 0, tzinfo=UTC)).open
    state = w.state(datetime(2026, 11, 29, 23, 0, tzinfo=UTC))
    assert not state.open
    assert state.until == at(22, day=30)
    assert state.until.utcoffset() == timedelta(hours=8)


def test_a_daytime_window_and_24_00() -> None:
    w = ApplyWindow.parse("09:30-24:00", "UTC")
    assert w.state(at(9, 30, zone=ZoneInfo("UTC"))).open
    assert not w.state(at(9, 29, zone=ZoneInfo("UTC"))).open
    assert w.state(at(23, 59, zone=ZoneInfo("UTC"))).until == at(0, day=30, zone=ZoneInfo("UTC"))


def test_a_window_edge_in_a_daylight_saving_gap_opens_after_it() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    w = ApplyWindow.parse("02:30-05:00", "Europe/Berlin")
    # 2026-03-29: clocks jump from 02:00 to 03:00; 02:30 does not exist that night.
    before = datetime(2026, 3, 29, 0, 30, tzinfo=berlin)
    until = w.state(before).until
    assert until > before
    assert until.astimezone(UTC) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST


@pytest.mark.parametrize(("text", "zone", "problem"), [
    ("22-6", "UTC", "expected HH:MM-HH:MM"),
    ("25:00-06:00", "UTC", "not a time of day"),
    ("06:00-06:00", "UTC", "is empty"),
    ("22:00-06:00", "Asia/Shanghia", "unknown time zone"),
])
def test_bad_windows_are_refused_naming_the_problem(text: str, zone: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ApplyWindow.parse(text, zone)


def test_settings_validate_the_window_the_zone_and_the_rate() -> None:
    ok = Settings.from_env({"CRM_ERP_SYNC_APPLY_WINDOW": "22:00-06:00",
                            "CRM_ERP_SYNC_APPLY_WINDOW_TZ": "Asia/Shanghai",
                            "CRM_ERP_SYNC_APPLY_MAX_RATE": "50"})
    window = ok.apply_window_parsed()
    assert window is not None and window.text == "22:00-06:00 Asia/Shanghai"
    assert Settings.from_env({}).apply_window_parsed() is None
    with pytest.raises(ConfigError) as bad_zone:
        Settings.from_env({"CRM_ERP_SYNC_APPLY_WINDOW": "22:00-06:00",
                           "CRM_ERP_SYNC_APPLY_WINDOW_TZ": "Mars/Olympus"})
    assert bad_zone.value.variable == "CRM_ERP_SYNC_APPLY_WINDOW_TZ"
    with pytest.raises(ConfigError) as bad_window:
        Settings.from_env({"CRM_ERP_SYNC_APPLY_WINDOW": "nightly"})
    assert bad_window.value.variable == "CRM_ERP_SYNC_APPLY_WINDOW"
    for rate in ("-1", "nan"):
        with pytest.raises(ConfigError) as bad_rate:
            Settings.from_env({"CRM_ERP_SYNC_APPLY_MAX_RATE": rate})
        assert bad_rate.value.variable == "CRM_ERP_SYNC_APPLY_MAX_RATE"


def test_the_rate_limit_allows_a_second_of_burst_then_the_rate() -> None:
    bucket = RateLimit(10, now=0.0)
    assert bucket.available(0.0) == 10
    bucket.take(10, 0.0)
    assert bucket.available(0.0) == 0
    assert bucket.wait_s(0.0) == pytest.approx(0.1)
    assert bucket.available(0.55) == 5
    bucket.take(5, 0.55)
    # Over any stretch, at most burst + rate * elapsed events.
    taken, now = 15, 0.55
    while now < 10.0:
        now += 0.05
        n = bucket.available(now)
        bucket.take(n, now)
        taken += n
    assert taken <= 10 + 10 * now


def test_a_slow_rate_still_lets_one_event_through() -> None:
    bucket = RateLimit(0.5, now=0.0)
    assert bucket.available(0.0) == 1
    bucket.take(1, 0.0)
    assert bucket.wait_s(0.0) == pytest.approx(2.0)
    assert bucket.available(1.0) == 0
    assert bucket.available(2.0) == 1
