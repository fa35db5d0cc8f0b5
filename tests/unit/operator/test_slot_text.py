"""commands.slot_text: the slot's part of status's ``Producer:`` line."""

from __future__ import annotations

from service.operator.commands import slot_text

GIB = 1024 ** 3


def _slot(**kw: object) -> dict[str, object]:
    return {"active": True, "retained_wal_bytes": 20824, "unconfirmed_bytes": 0,
            "wal_status": "reserved", "safe_wal_bytes": None, "keep_size_bytes": -1, **kw}


def test_safe_wal_size_is_named_as_what_it_is_not_as_the_warning_threshold() -> None:
    # safe_wal_size counts down to the slot being LOST; status's own warning ("in danger",
    # crm_erp_sync_slot_wal_in_danger) fires when it is under 20% of the budget, long
    # before. Calling these bytes "before it is in danger" overstated the room left by 80%.
    text = slot_text(_slot(safe_wal_bytes=GIB, keep_size_bytes=GIB))
    assert "before it is in danger" not in text
    assert f"{GIB} bytes more before the CRM removes WAL it needs (safe_wal_size" in text
    assert "warns under 20% of max_slot_wal_keep_size" in text


def test_unlimited_keep_size_prints_no_safe_size() -> None:
    text = slot_text(_slot())
    assert text == ("reading, retains 20824 bytes of WAL, 0 bytes not yet confirmed, "
                    "WAL reserved")


def test_missing_and_lost() -> None:
    assert slot_text(None) == "MISSING"
    assert slot_text(_slot(wal_status="lost")) == "LOST (its WAL was removed)"


def test_a_slot_being_created_says_so_not_none_bytes() -> None:
    # confirmed_flush_lsn is NULL until PostgreSQL has waited for the transactions open when
    # the creation began: no "None bytes not yet confirmed".
    text = slot_text(_slot(unconfirmed_bytes=None, creating_s=25.0,
                           creating_waits="Lock/transactionid"))
    assert "None" not in text
    assert text.startswith("being created for 25.0s: waiting for the transactions open when "
                           "its creation began to end")
    assert "nothing is captured until then" in text
    assert "being created:" in slot_text(_slot(unconfirmed_bytes=None, creating_s=None))
