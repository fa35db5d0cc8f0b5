"""A primary-key UPDATE becomes the delete of the old key and the create of the new one (as
Debezium does), each on its own key's partition; a TRUNCATE becomes one truncate event."""

from __future__ import annotations

from pathlib import Path

from service.avro import SchemaRegistry
from service.cdc.events import (
    CREATE,
    DELETE,
    NEW_KEY_HEADER,
    OLD_KEY_HEADER,
    UPDATE,
    RowChange,
    split_key_change,
    truncate_event,
)
from service.erp.changes import to_erp
from service.erp.mappings import Mappings
from tests.unit.cdc.test_events import (
    COMMIT,
    DEMO,
    LSN,
    XID,
    build,
    canonical_customer,
    customer,
    header,
    line,
)

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"


def test_customer_key_change_is_delete_of_old_then_create_of_new() -> None:
    change = RowChange("crm.customers", UPDATE, customer(1102), customer(1202))
    events = build([RowChange("crm.customers", CREATE, None, customer(7)), change])
    assert [(e.key, e.record["op"], e.record["key"]) for e in events] == [
        (b"7", CREATE, "7"), (b"1102", DELETE, "1102"), (b"1202", CREATE, "1202")]
    old, new = events[1], events[2]
    # the old key's delete carries the row it had; the new key's create the new row
    assert old.record["before"] == canonical_customer(1102) and old.record["after"] is None
    assert new.record["before"] is None and new.record["after"] == canonical_customer(1202)
    # one change, one position: two different ERP rows, told apart by their event ids
    assert old.record["source"] == new.record["source"]
    assert old.record["source"]["seq"] == 1
    assert (old.event_id, new.event_id) == (f"{LSN:X}/1/oldkey", f"{LSN:X}/1")
    assert old.headers == ((NEW_KEY_HEADER, b"1202"),)
    assert new.headers == ((OLD_KEY_HEADER, b"1102"),)
    registry = SchemaRegistry.load(SCHEMAS)
    for e in (old, new):
        assert registry.decode(registry.encode(e.kind, e.record))[1] == e.record


def test_update_without_key_change_is_one_event_without_headers() -> None:
    change = RowChange("crm.customers", UPDATE, customer(42), customer(42, notes="10台"))
    [event] = build([change])
    assert event.record["op"] == UPDATE and event.headers == ()
    assert split_key_change(DEMO.entities["customer"], change) == [change]


def test_order_key_change_deletes_the_old_order_on_its_customers_partition() -> None:
    change = RowChange("crm.sales_orders", UPDATE, header(9001, 42), header(9101, 42))
    old, new = build([change])
    assert (old.kind, old.key, old.record["op"], old.record["key"]) == (
        "order", b"42", DELETE, "9001")
    assert (new.kind, new.key, new.record["op"], new.record["key"]) == (
        "order", b"42", CREATE, "9101")
    assert old.headers == ((NEW_KEY_HEADER, b"9101"),)
    assert new.headers == ((OLD_KEY_HEADER, b"9001"),)
    assert old.event_id.endswith("/oldkey") and not new.event_id.endswith("/oldkey")


def test_order_key_and_customer_change_each_half_on_its_own_customer() -> None:
    change = RowChange("crm.sales_orders", UPDATE, header(9001, 42), header(9101, 43))
    old, new = build([change])
    assert (old.key, old.record["customer_key"]) == (b"42", "42")
    assert (new.key, new.record["customer_key"]) == (b"43", "43")


def test_line_key_change_is_a_line_delete_and_a_line_create_in_one_order_event() -> None:
    change = RowChange("crm.order_lines", UPDATE, line(1, product_code="P-PHONE-5G"),
                       line(3, product_code="P-PHONE-5G"))
    [event] = build([change])
    assert event.kind == "order" and event.key == b"42"
    assert [(ln["op"], (ln["before"] or ln["after"])["key"]) for ln in event.record["lines"]] \
        == [(DELETE, '["9001","1"]'), (CREATE, '["9001","3"]')]
    erp = to_erp("order", event.record, Mappings.load())
    assert [(i.crm_line_id, i.deleted) for i in erp.items] == [
        ('["9001","1"]', True), ('["9001","3"]', False)]


def test_line_moved_to_another_order_leaves_the_old_order_too() -> None:
    change = RowChange("crm.order_lines", UPDATE, line(1, order_id=9001, cid=42),
                       line(1, order_id=9002, cid=43))
    old_order, new_order = build([change])
    assert (old_order.key, old_order.record["key"]) == (b"42", "9001")
    assert old_order.record["lines"][0]["op"] == DELETE
    assert (new_order.key, new_order.record["key"]) == (b"43", "9002")
    assert new_order.record["lines"][0]["op"] == CREATE


def test_truncate_event_round_trips_and_maps_to_a_truncate_change() -> None:
    event = truncate_event(DEMO.entities["market_demand"], lsn=LSN, seq=3, xid=XID,
                           commit_time=COMMIT, profile="demo")
    assert event.kind == "truncate" and event.key == b"truncate/crm.market_demand"
    assert event.event_id == f"{LSN:X}/3"
    registry = SchemaRegistry.load(SCHEMAS)
    kind, record = registry.decode(registry.encode("truncate", event.record))
    assert kind == "truncate" and record == event.record
    change = to_erp(kind, record, Mappings.load())
    assert change.truncate is not None
    assert (change.truncate.entity, change.truncate.table) == ("market_demand",
                                                               "crm.market_demand")
    assert (change.truncate.pos.lsn, change.truncate.pos.seq) == (LSN, 3)
    assert change.needs_customer is None


def test_an_order_moving_to_another_customer_is_one_update_on_the_new_customer() -> None:
    """Not split (docs/DESIGN.md): a delete + create would lose the lines the event does not
    carry; the order's older events on the old customer's partition lose to its position."""
    change = RowChange("crm.sales_orders", UPDATE, header(9001, 42), header(9001, 43))
    [event] = build([change])
    assert (event.key, event.record["op"], event.record["customer_key"]) == (
        b"43", UPDATE, "43")
    assert event.headers == ()
