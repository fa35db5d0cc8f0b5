"""Snapshot reads' event ids name the read, not its position (a redone chunk keeps them)."""

from __future__ import annotations

from service.cdc.producer import snapshot_event_id


def test_the_id_names_snapshot_chunk_kind_and_key() -> None:
    assert snapshot_event_id(7, 3, "customer", "1102") == "snap/7/3/customer/1102"


def test_keys_with_slashes_do_not_collide() -> None:
    ids = {snapshot_event_id(1, 0, "order", k) for k in ("a/b", "a", "b", '["a","b"]')}
    assert len(ids) == 4
    assert snapshot_event_id(1, 0, "order", "1") != snapshot_event_id(1, 0, "customer", "1")
