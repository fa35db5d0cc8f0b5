"""Percentiles, targets and the comparison table of the benchmarks (pure parts)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.common import percentile
from bench.compare import Result, Target, cell, table, within


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(list(reversed(values)), 95) == pytest.approx(95.05)  # order-free


def test_percentile_of_nothing_is_nan_and_of_one_is_it() -> None:
    assert math.isnan(percentile([], 99))
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("pct", [0, 100, 99.5])
def test_percentiles_outside_1_to_99_are_refused(pct: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], pct)


def test_a_cell_shows_its_target_and_verdict() -> None:
    assert cell(0.31, ".2f", Target(0.3)) == ("0.31 (<=0.30 FAIL)", False)
    assert cell(9390, ",.0f", Target(9000, le=False), "rows/s") == \
        ("9,390 rows/s (>=9,000 PASS)", True)
    assert cell(12.0, ".0f") == ("12", None)


def test_after_the_burst_within_20_percent_of_before_or_two_ticks() -> None:
    assert within(0.23, 0.2)[1] is True
    assert within(0.5, 0.2)[1] is False
    assert within(0.03, 0.01)[1] is True   # 200% but only 2 ticks: /proc cannot tell
    assert within(2.0, 3.0)[1] is False    # less is a change too


def result(name: str, rate: float, p99: float, crm: float, erp: float = 0.5) -> Result:
    return Result(name, "changes/s", rate, 100, 10.0, [p99] * 10,
                  {"crm": crm, "erp": erp, "broker": 1.0, "ours": 2.0}, 200.0)


def test_the_table_passes_only_when_every_target_does() -> None:
    good = {
        "bulk": result("1 bulk load", 9500, 900, 2.0),
        "burst": result("2 burst", 6000, 900, 1.0),
        "low": result("3 steady 200/s", 200, 50, 0.1),
        "high": result("4 steady 1,000/s", 1000, 150, 0.5),
        "after": result("5 200/s after burst", 200, 60, 0.11),
    }
    printed, passed = table(good, [("baseline: raw COPY", "50,000 rows/s")])
    assert passed, printed
    assert "FAIL" not in printed and "baseline: raw COPY" in printed
    slow_after = {**good, "after": result("5 200/s after burst", 200, 60, 0.2)}
    printed, passed = table(slow_after, [])
    assert not passed
    assert "+100% vs before (<=20% FAIL)" in printed


def test_peak_pss_is_printed_beside_peak_rss_without_a_verdict() -> None:
    r = dataclasses.replace(result("3 steady 200/s", 200, 50, 0.1), rss_mib=280.0,
                            pss_mib=190.0)
    printed, passed = table({"low": r}, [])
    head, _, row = printed.splitlines()[:3]
    assert "peak RSS MiB (ours, vs target)" in head and "peak PSS MiB (ours, no target)" in head
    assert "280 (<=250 FAIL)" in row and row.rstrip().endswith("190")
    assert not passed  # RSS is what the target is checked against, PSS does not rescue it


def test_a_broker_not_found_on_this_machine_is_not_shown_as_zero() -> None:
    r = result("3 steady 200/s", 200, 50, 0.1)
    del r.cpu["broker"]
    printed, _ = table({"low": r}, [])
    assert "n/a" in printed.splitlines()[2]
