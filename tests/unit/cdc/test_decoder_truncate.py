"""The producer's decoder: a pgoutput Truncate becomes one change without rows per truncated
table, at its place in the transaction; a primary-key Update keeps its old tuple ('O', sent
with REPLICA IDENTITY FULL), from which the old key's delete is built."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.cdc.events import TRUNCATE, UPDATE, References, RowChange, build_events
from service.cdc.producer import ChangeDecoder
from service.cdc.profile import load_profile
from service.errors import PgOutputError
from service.settings import Settings
from tests.unit.cdc.test_pgoutput import begin, commit, insert, relation, truncate, update

TS = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
COLS = [(1, "customer_id", 20, -1), (0, "given_name", 25, -1)]


def _decoded(*messages: bytes) -> list[RowChange]:
    decoder = ChangeDecoder()
    out = None
    for data in (begin(500, TS, 9), *messages, commit(490, 500, TS)):
        out = decoder.feed(data)
    assert out is not None
    return out.changes


def test_truncate_is_one_change_per_table_in_its_place() -> None:
    changes = _decoded(
        relation(1, "crm", "customers", "f", COLS),
        relation(2, "crm", "market_demand", "f", [(1, "demand_id", 20, -1)]),
        insert(1, "7", "三"),
        truncate(1, 1, 2),  # TRUNCATE ... CASCADE of both
        insert(1, "8", "娜"))
    assert [(c.table, c.op) for c in changes] == [
        ("crm.customers", "CREATE"), ("crm.customers", TRUNCATE),
        ("crm.market_demand", TRUNCATE), ("crm.customers", "CREATE")]
    assert changes[1].before is None and changes[1].after is None


def test_truncate_of_an_unknown_relation_is_an_error() -> None:
    with pytest.raises(PgOutputError, match="unknown relation id 5"):
        _decoded(truncate(0, 5))


def test_key_update_carries_the_old_tuple_and_becomes_delete_then_create() -> None:
    [change] = _decoded(relation(1, "crm", "customers", "f", COLS),
                        update(1, ("1202", "三"), old=("1102", "三")))
    assert change.op == UPDATE
    assert (change.before, change.after) == ({"customer_id": 1102, "given_name": "三"},
                                             {"customer_id": 1202, "given_name": "三"})
    profile = load_profile("demo")
    full = {c: None for c in profile.entities["customer"].columns}
    events = build_events(
        [RowChange(change.table, change.op, {**full, **(change.before or {})},
                   {**full, **(change.after or {})})],
        profile=profile, refs=References(), lsn=490, xid=9, commit_time=TS)
    assert [(e.key, e.record["op"]) for e in events] == [(b"1102", "DELETE"),
                                                          (b"1202", "CREATE")]


def test_on_truncate_setting_is_checked() -> None:
    from service.errors import ConfigError

    assert Settings().on_truncate == "stop"
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_ON_TRUNCATE"):
        Settings(on_truncate="ignore").validate()
