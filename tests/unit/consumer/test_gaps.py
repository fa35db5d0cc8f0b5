"""service/consumer/gaps.py: which positions mean events were lost, and the status line."""

from __future__ import annotations

from datetime import UTC, datetime

from service.consumer.gaps import OffsetGap, attention_line, lost_range


def test_a_position_below_the_log_start_loses_the_offsets_in_between() -> None:
    gap = lost_range("crm.market-demand", 2, 56, 64)
    assert gap == OffsetGap("crm.market-demand", 2, 56, 64)
    assert gap is not None and gap.count == 8


def test_a_new_partition_whose_log_start_moved_lost_everything_before_it() -> None:
    assert lost_range("crm.sales", 0, 0, 126) == OffsetGap("crm.sales", 0, 0, 126)


def test_a_position_at_or_past_the_log_start_loses_nothing() -> None:
    assert lost_range("crm.sales", 0, 64, 64) is None
    assert lost_range("crm.sales", 0, 0, 0) is None
    assert lost_range("crm.sales", 0, 900, 64) is None  # beyond the end: not a loss here
    assert lost_range("crm.sales", 0, -1, 64) is None  # kafka-python's "no position"


def test_the_status_line_names_topic_partition_range_count_and_fix() -> None:
    line = attention_line({"topic": "crm.market-demand", "partition": 1, "first_lost": 94,
                           "next_kept": 97, "count": 3,
                           "detected_at": datetime(2026, 11, 30, 6, 1, 2, tzinfo=UTC)})
    assert "crm.market-demand[1] offsets 94..96 (3 offset(s)" in line
    assert "detected 2026-11-30 06:01:02 UTC" in line
    assert "`crm-erp-sync reconcile --repair`" in line
    assert "moved the log start past the group's position" in line
    assert "are missing in the ERP" in line


def test_a_gap_from_offset_0_says_the_group_had_no_position_there() -> None:
    """newcomer10: a new group over an ERP another group keeps complete was told the
    changes are missing; its line says why it may not be so."""
    line = attention_line({"topic": "crm.sales", "partition": 0, "first_lost": 0,
                           "next_kept": 475, "count": 475,
                           "detected_at": datetime(2026, 11, 30, 6, 1, 2, tzinfo=UTC)})
    assert "the group had no position there (a new group" in line
    assert "unless another consumer group fed this ERP" in line
    assert "`crm-erp-sync reconcile --repair`" in line


def test_offsets_deleted_below_the_groups_position_before_a_consumer_reached_them() -> None:
    from service.operator.status import unreached_gap_line
    from service.ops import PartitionLag

    assert PartitionLag("crm.sales", 0, 10, 50, start=10).deleted_unapplied == 0
    assert PartitionLag("crm.sales", 0, 50, 50, start=40).deleted_unapplied == 0
    behind = PartitionLag("crm.sales", 1, 10, 50, start=25)
    assert behind.deleted_unapplied == 15
    line = unreached_gap_line(behind, "g")
    assert "crm.sales[1] offsets 10..24 (15 offset(s); the log starts at 25" in line
    assert "its committed offset 10" in line and "`crm-erp-sync reconcile --repair`" in line
    fresh = PartitionLag("crm.sales", 2, None, 50, start=7)
    assert fresh.deleted_unapplied == 7
    assert "no position (a new group" in unreached_gap_line(fresh, "g")
