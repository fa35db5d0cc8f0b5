"""service/ops.py's pure parts: when the replication slot is about to lose WAL."""

from __future__ import annotations

import pytest

from service.ops import SAFE_WAL_MIN_SHARE, slot_wal_danger

GIB = 1024**3


def test_an_unreserved_slot_needs_attention_naming_it_and_what_to_do() -> None:
    said = slot_wal_danger("crm_erp_sync", "unreserved", -12345, GIB)
    assert said is not None
    assert "crm_erp_sync" in said and "UNRESERVED" in said and "next checkpoint" in said
    assert "raise max_slot_wal_keep_size" in said and "start it" in said
    assert "catch up" in said


@pytest.mark.parametrize(("wal_status", "safe"), [
    ("reserved", int(GIB * 0.1)), ("extended", int(GIB * 0.1)), ("extended", 0),
    ("extended", int(GIB * SAFE_WAL_MIN_SHARE) - 1)])
def test_little_safe_wal_left_is_a_warning(wal_status: str, safe: int) -> None:
    said = slot_wal_danger("s1", wal_status, safe, GIB)
    assert said is not None
    assert "s1" in said and f"{safe:,} more bytes" in said and f"{GIB:,}" in said
    assert "raise max_slot_wal_keep_size" in said


@pytest.mark.parametrize(("wal_status", "safe", "keep"), [
    ("reserved", GIB, GIB),  # nothing retained yet
    ("reserved", int(GIB * SAFE_WAL_MIN_SHARE) + 1, GIB),  # just above the share
    ("extended", GIB // 2, GIB),
    ("reserved", None, -1),  # max_slot_wal_keep_size = -1: PostgreSQL keeps all WAL
    ("extended", None, -1),
    ("lost", None, GIB),  # status reports a lost slot with its own recovery (resync)
    (None, None, None),  # a slot PostgreSQL reports no status for (being created)
])
def test_room_left_unlimited_or_already_lost_says_nothing(
        wal_status: str | None, safe: int | None, keep: int | None) -> None:
    assert slot_wal_danger("s1", wal_status, safe, keep) is None
