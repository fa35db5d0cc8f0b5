"""service.cdc.events: a CRM transaction's row changes -> the canonical events the producer
sends, mapped by the demo source profile (the demo CRM's rows, as pgoutput gives them)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.avro import SchemaRegistry
from service.cdc.events import (
    CREATE,
    DELETE,
    READ,
    UPDATE,
    Outgoing,
    References,
    RowChange,
    build_events,
    canonical,
    converter_for,
    event_id,
)
from service.cdc.profile import SourceProfile, load_profile
from service.errors import PgOutputError, UnresolvedReference

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
LSN = 0x16B374D848
XID = 7001
COMMIT = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
T0 = COMMIT - timedelta(minutes=5)
DEMO = load_profile("demo")


def _without_line_customer(profile: SourceProfile) -> SourceProfile:
    """The demo profile as for a CRM whose lines do not carry their customer (BottleCRM):
    line-only changes must then be partitioned through their order."""
    lines = dataclasses.replace(profile.entities["order_line"], customer_column=None)
    entities = {**profile.entities, "order_line": lines}
    return dataclasses.replace(profile, entities=entities,
                               by_table={e.table: e for e in entities.values()})


LINES_WITHOUT_CUSTOMER = _without_line_customer(DEMO)


def customer(cid: int = 42, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "customer_id": cid, "family_name": "张", "given_name": "三", "middle_name": None,
        "name_order": "eastern", "gender": "男", "birth_date": date(1990, 5, 17),
        "phone": "13812345678", "email": None, "address": "北京市朝阳区建国路88号",
        "purchase_frequency": "每月1次", "purchase_amount": Decimal("5000.00"),
        "product_preference": "电子产品", "notes": None, "updated_at": T0,
    }
    row.update(overrides)
    return row


def header(order_id: int = 9001, cid: int = 42, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "order_id": order_id, "order_no": "20230101", "customer_id": cid,
        "order_date": date(2023, 1, 1), "status": "待付款", "currency": "元", "updated_at": T0,
    }
    row.update(overrides)
    return row


def line(line_no: int, order_id: int = 9001, cid: int = 42, price: str = "5000.00",
         **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "order_id": order_id, "line_no": line_no, "customer_id": cid,
        "product_code": f"P-{line_no:03d}", "product_name": "手机", "quantity": "10台",
        "unit_price": Decimal(price),
    }
    row.update(overrides)
    return row


def demand(did: int = 7) -> dict[str, Any]:
    return {"demand_id": did, "kind": "市场趋势", "product_category": "手机",
            "content": "5G手机市场增长迅速", "observed_at": T0}


# The canonical records (schemas/*/v2.avsc) the demo profile makes of those rows.
def canonical_customer(cid: int = 42, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": str(cid), "full_name": None, "family_name": "张", "given_name": "三",
        "middle_name": None, "name_order": "eastern", "gender": "男",
        "birth_date": date(1990, 5, 17), "phone": "13812345678", "email": None,
        "address": "北京市朝阳区建国路88号", "street": None, "city": None, "region": None,
        "postcode": None, "country": None, "currency": None, "purchase_frequency": "每月1次",
        "purchase_amount": "5000.00", "product_preference": "电子产品", "notes": None,
    }
    record.update(overrides)
    return record


def canonical_header(order_id: int = 9001, cid: int = 42, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": str(order_id), "order_no": "20230101", "order_date": date(2023, 1, 1),
        "status": "待付款", "currency": "元", "total_amount": None,
        "customer_key": str(cid),
    }
    record.update(overrides)
    return record


def canonical_line(line_no: int, order_id: int = 9001, price: str = "5000.00",
                   **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": f'["{order_id}","{line_no}"]', "product_code": f"P-{line_no:03d}",
        "product_name": "手机", "quantity": "10台", "unit": None, "unit_price": price,
        "order_key": str(order_id),
    }
    record.update(overrides)
    return record


def mixed_transaction() -> list[RowChange]:
    """customer insert, order header insert + 2 lines, customer update, market demand insert."""
    return [
        RowChange("crm.customers", CREATE, None, customer()),                       # seq 0
        RowChange("crm.sales_orders", CREATE, None, header()),                      # seq 1
        RowChange("crm.order_lines", CREATE, None, line(1)),                        # seq 2
        RowChange("crm.order_lines", CREATE, None, line(2, price="12345678901.23")),  # seq 3
        RowChange("crm.customers", UPDATE, customer(),
                  customer(phone="13912345678", updated_at=COMMIT)),                # seq 4
        RowChange("crm.market_demand", CREATE, None, demand()),                     # seq 5
    ]


class OrderBook:
    """The producer's order lookup for lines without their header: the CRM's current orders
    (a reference miss reads the CRM's row), counting what was asked."""

    def __init__(self, *orders: dict[str, Any]) -> None:
        self.rows = {str(o["order_id"]): o for o in orders}
        self.asked: list[tuple[str, str]] = []

    def __call__(self, entity: str, key: str) -> dict[str, Any] | None:
        self.asked.append((entity, key))
        row = self.rows.get(key) if entity == "order" else None
        return None if row is None else canonical(DEMO.entities["order"], row, References())


def build(changes: list[RowChange], refs: References | None = None, *,
          profile: SourceProfile = DEMO, **kw: Any) -> list[Outgoing]:
    if refs is None:
        refs = References(OrderBook(header(9001, 42), header(9002, 43)))
    kw.setdefault("lsn", LSN)
    kw.setdefault("xid", XID)
    kw.setdefault("commit_time", COMMIT)
    return build_events(changes, profile=profile, refs=refs, **kw)


def test_mixed_transaction_kinds_keys_and_order() -> None:
    events = build(mixed_transaction())
    assert [(e.kind, e.record["op"]) for e in events] == [
        ("customer", CREATE), ("order", CREATE), ("customer", UPDATE),
        ("market_demand", CREATE)]
    assert [e.key for e in events] == [b"42", b"42", b"42", b"7"]
    assert all(isinstance(e.key, bytes) for e in events)
    assert [e.record["key"] for e in events] == ["42", "9001", "42", "7"]
    seqs = [e.record["source"]["seq"] for e in events]
    assert seqs == [0, 1, 4, 5]  # the order takes the position of its first change
    assert seqs == sorted(seqs)


def test_event_ids_are_lsn_hex_and_seq() -> None:
    events = build(mixed_transaction())
    assert [e.event_id for e in events] == [
        "16B374D848/0", "16B374D848/1", "16B374D848/4", "16B374D848/5"]
    for e in events:
        assert e.record["event_id"] == e.event_id
        assert e.event_id == f"{LSN:X}/{e.record['source']['seq']}"


def test_building_twice_gives_identical_events() -> None:
    first, second = build(mixed_transaction()), build(mixed_transaction())
    assert first == second
    assert [e.event_id for e in first] == [e.event_id for e in second]
    # The same References already fed by the first build change nothing either.
    refs = References()
    assert build(mixed_transaction(), refs) == build(mixed_transaction(), refs) == first


def test_a_later_transaction_gets_different_ids() -> None:
    ids = {e.event_id for e in build(mixed_transaction())}
    later = build(mixed_transaction(), lsn=LSN + 1, xid=XID + 1)
    assert ids.isdisjoint(e.event_id for e in later)


def test_source_block() -> None:
    events = build(mixed_transaction())
    assert [e.record["source"]["table"] for e in events] == [
        "crm.customers", "crm.sales_orders", "crm.customers", "crm.market_demand"]
    for e in events:
        src = e.record["source"]
        assert (src["lsn"], src["txid"], src["commit_time"], src["snapshot"],
                src["profile"]) == (LSN, XID, COMMIT, False, "demo")


def test_customer_events_carry_before_and_after() -> None:
    _, _, update, _ = build(mixed_transaction())
    assert update.record["key"] == "42"
    assert update.record["before"] == canonical_customer()
    assert update.record["after"] == canonical_customer(phone="13912345678")
    # Only canonical fields travel: the demo CRM's bookkeeping column does not.
    assert "updated_at" not in update.record["after"]


def test_order_header_and_lines_become_one_event() -> None:
    order = build(mixed_transaction())[1]
    rec = order.record
    assert (rec["key"], rec["customer_key"], order.key) == ("9001", "42", b"42")
    assert rec["before"] is None and rec["after"] == canonical_header()
    assert [(ln["op"], ln["after"]["key"]) for ln in rec["lines"]] == [
        (CREATE, '["9001","1"]'), (CREATE, '["9001","2"]')]
    assert rec["lines"][0]["after"] == canonical_line(1)
    # Exact decimal text: no float, no lost digit.
    assert rec["lines"][1]["after"]["unit_price"] == "12345678901.23"
    assert all(ln["before"] is None for ln in rec["lines"])


def test_two_orders_of_two_customers_in_one_transaction() -> None:
    changes = [
        RowChange("crm.order_lines", UPDATE, line(1, 9002, 43), line(1, 9002, 43,
                                                                     quantity="5台")),
        RowChange("crm.sales_orders", CREATE, None, header(9001, 42)),
        RowChange("crm.order_lines", CREATE, None, line(1, 9001, 42)),
        RowChange("crm.order_lines", DELETE, line(2, 9002, 43), None),
    ]
    book = OrderBook(header(9002, 43))
    first, second = build(changes, References(book), profile=LINES_WITHOUT_CUSTOMER)
    assert (first.record["key"], first.key, first.event_id) == ("9002", b"43", f"{LSN:X}/0")
    assert (second.record["key"], second.key, second.event_id) == (
        "9001", b"42", f"{LSN:X}/1")
    assert [ln["op"] for ln in first.record["lines"]] == [UPDATE, DELETE]
    assert first.record["lines"][1]["after"] is None
    assert first.record["lines"][1]["before"] == canonical_line(2, 9002)
    assert len(second.record["lines"]) == 1
    # Only the order without its header in the transaction was looked up, once.
    assert book.asked == [("order", "9002")]
    # Where the lines carry their customer (the demo CRM), nothing is looked up.
    book = OrderBook(header(9002, 43))
    assert build(changes, References(book)) == [first, second]
    assert book.asked == []


def test_order_inserted_then_deleted_in_one_transaction_is_a_delete() -> None:
    changes = [
        RowChange("crm.sales_orders", CREATE, None, header()),
        RowChange("crm.order_lines", CREATE, None, line(1)),
        RowChange("crm.order_lines", DELETE, line(1), None),
        RowChange("crm.sales_orders", DELETE, header(), None),
    ]
    (event,) = build(changes)
    assert event.kind == "order"
    assert event.record["op"] == DELETE
    assert event.record["after"] is None
    assert event.record["key"] == "9001" and event.key == b"42"
    assert [ln["op"] for ln in event.record["lines"]] == [CREATE, DELETE]


def test_order_updated_then_deleted_keeps_the_first_before() -> None:
    paid = header(status="已付款")
    changes = [
        RowChange("crm.sales_orders", UPDATE, header(), paid),
        RowChange("crm.sales_orders", DELETE, paid, None),
    ]
    (event,) = build(changes)
    assert event.record["op"] == DELETE
    assert event.record["before"] == canonical_header()
    assert event.record["after"] is None


def test_order_inserted_then_updated_is_a_create_with_the_last_after() -> None:
    paid = header(status="已付款", updated_at=COMMIT)
    changes = [
        RowChange("crm.sales_orders", CREATE, None, header()),
        RowChange("crm.sales_orders", UPDATE, header(), paid),
    ]
    (event,) = build(changes)
    assert event.record["op"] == CREATE
    assert event.record["before"] is None
    assert event.record["after"] == canonical_header(status="已付款")


def test_lines_only_change_is_an_order_update_without_header() -> None:
    changes = [
        RowChange("crm.order_lines", UPDATE, line(1), line(1, quantity="12台")),
        RowChange("crm.order_lines", CREATE, None, line(3)),
    ]
    (event,) = build(changes)
    rec = event.record
    assert event.kind == "order" and event.key == b"42"
    assert rec["op"] == UPDATE
    assert rec["before"] is None and rec["after"] is None
    assert (rec["key"], rec["customer_key"]) == ("9001", "42")
    assert rec["source"]["table"] == "crm.order_lines"
    assert [ln["op"] for ln in rec["lines"]] == [UPDATE, CREATE]
    assert rec["lines"][0]["after"]["quantity"] == "12台"


def test_an_order_seen_before_partitions_its_later_lines_without_a_lookup() -> None:
    book = OrderBook()  # the CRM would not find it: the remembered order must be used
    refs = References(book)
    build([RowChange("crm.sales_orders", CREATE, None, header(9005, 77))], refs,
          profile=LINES_WITHOUT_CUSTOMER)
    (event,) = build([RowChange("crm.order_lines", CREATE, None, line(1, 9005, 77))], refs,
                     lsn=LSN + 1, profile=LINES_WITHOUT_CUSTOMER)
    assert (event.key, event.record["customer_key"]) == (b"77", "77")
    assert book.asked == []


def test_an_order_is_remembered_as_its_customer_key_alone() -> None:
    refs = References(OrderBook())
    build([RowChange("crm.sales_orders", CREATE, None, header(9005, 77))], refs,
          profile=LINES_WITHOUT_CUSTOMER)
    assert refs.lookup("order", "9005") == {"customer_key": "77"}
    # a later change of the order moves it to another customer: the newer key wins
    build([RowChange("crm.sales_orders", UPDATE, header(9005, 77), header(9005, 78))], refs,
          lsn=LSN + 1, profile=LINES_WITHOUT_CUSTOMER)
    assert refs.lookup("order", "9005") == {"customer_key": "78"}


def test_orders_are_not_remembered_when_every_line_carries_its_customer() -> None:
    book = OrderBook(header(9005, 77))
    refs = References(book)
    assert not DEMO.lines_need_orders and LINES_WITHOUT_CUSTOMER.lines_need_orders
    build([RowChange("crm.sales_orders", CREATE, None, header(9005, 77))], refs)
    (event,) = build([RowChange("crm.order_lines", CREATE, None, line(1, 9005, 77))], refs,
                     lsn=LSN + 1)
    assert (event.key, book.asked) == (b"77", [])  # the line named its customer itself
    assert refs.lookup("order", "9005") == {"customer_key": "77"}
    assert book.asked == [("order", "9005")]  # not remembered: a lookup reads the CRM


def test_references_forget_the_oldest_past_capacity_per_entity() -> None:
    book = OrderBook(header(1, 10), header(2, 20), header(3, 30))
    refs = References(book, capacity=2)
    for order_id in (1, 2, 3):
        refs.remember("order", str(order_id), canonical_header(order_id, order_id * 10))
    refs.remember("product", "P", {"key": "P", "product_code": "SKU-P"})
    assert refs.lookup("order", "3") == {"customer_key": "30"}
    assert refs.lookup("order", "2") == {"customer_key": "20"}
    assert book.asked == []
    assert refs.lookup("order", "1") == {"customer_key": "10"}  # forgotten: read again
    assert book.asked == [("order", "1")]
    assert refs.lookup("product", "P") == {"key": "P", "product_code": "SKU-P"}


def test_lines_of_an_order_the_crm_does_not_have_are_refused() -> None:
    with pytest.raises(UnresolvedReference) as info:
        build([RowChange("crm.order_lines", CREATE, None, line(1, 9999, 42))],
              References(OrderBook()), profile=LINES_WITHOUT_CUSTOMER)
    assert (info.value.table, info.value.column, info.value.entity) == (
        "crm.order_lines", "order_id", "order")


def test_customer_delete_is_keyed_by_the_before_row() -> None:
    (event,) = build([RowChange("crm.customers", DELETE, customer(77), None)])
    assert event.key == b"77" and event.record["key"] == "77"
    assert event.record["op"] == DELETE and event.record["after"] is None
    assert event.record["before"] == canonical_customer(77)


def test_market_demand_is_keyed_by_demand_id() -> None:
    (event,) = build([RowChange("crm.market_demand", UPDATE, demand(123), demand(123))])
    assert event.kind == "market_demand" and event.key == b"123"
    assert event.record["after"] == {
        "key": "123", "kind": "市场趋势", "product_category": "手机",
        "content": "5G手机市场增长迅速", "observed_at": T0}


def test_snapshot_reads() -> None:
    reads = [
        RowChange("crm.customers", READ, None, customer(1)),
        RowChange("crm.customers", READ, None, customer(2)),
        RowChange("crm.sales_orders", READ, None, header(9001, 2)),
        RowChange("crm.market_demand", READ, None, demand(5)),
    ]
    events = build(reads, xid=0, snapshot=True, first_seq=10)
    assert [e.event_id for e in events] == [f"snap/{LSN:X}/{s}" for s in (10, 11, 12, 13)]
    assert all(e.event_id.startswith("snap/") for e in events)
    assert [e.record["op"] for e in events] == [READ] * 4
    assert all(e.record["source"]["snapshot"] is True for e in events)
    assert all(e.record["source"]["txid"] == 0 for e in events)
    assert [e.key for e in events] == [b"1", b"2", b"2", b"5"]
    # Snapshot ids never collide with the ids of the change that carried the watermark.
    changes = {e.event_id for e in build(mixed_transaction())}
    assert changes.isdisjoint(e.event_id for e in events)


def test_snapshot_of_an_order_with_its_lines_is_one_read() -> None:
    reads = [RowChange("crm.sales_orders", READ, None, header()),
             RowChange("crm.order_lines", READ, None, line(1)),
             RowChange("crm.order_lines", READ, None, line(2))]
    (event,) = build(reads, xid=0, snapshot=True)
    assert event.record["op"] == READ
    assert [ln["op"] for ln in event.record["lines"]] == [READ, READ]
    assert [ln["after"]["key"] for ln in event.record["lines"]] == [
        '["9001","1"]', '["9001","2"]']


def test_event_id_format() -> None:
    assert event_id(0x16B374D848, 3, False) == "16B374D848/3"
    assert event_id(0x16B374D848, 3, True) == "snap/16B374D848/3"
    assert event_id(0, 0, False) == "0/0"


def test_change_without_row_data_is_refused() -> None:
    with pytest.raises(PgOutputError, match=r"crm\.customers"):
        build([RowChange("crm.customers", DELETE, None, None)])


def test_entity_key_text() -> None:
    assert DEMO.entities["customer"].key_text(customer(42)) == "42"
    assert DEMO.entities["order_line"].key_text(line(2, 9001)) == '["9001","2"]'


def test_every_event_encodes_with_the_schemas() -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    changes = [*mixed_transaction(),
               RowChange("crm.order_lines", UPDATE, line(1, 9002, 43),
                         line(1, 9002, 43, price="1.50"))]
    events = build(changes)
    assert [e.kind for e in events] == ["customer", "order", "customer", "market_demand",
                                        "order"]
    for event in events:
        kind, decoded = registry.decode(registry.encode(event.kind, event.record))
        assert kind == event.kind
        assert decoded == event.record


# ---- text values from pgoutput -> Python ----------------------------------------------------

def test_numeric_is_an_exact_decimal() -> None:
    value = converter_for(1700)("5000.00")
    assert isinstance(value, Decimal)
    assert value == Decimal("5000.00") and str(value) == "5000.00"
    assert converter_for(1700)("12345678901.23") == Decimal("12345678901.23")


def test_timestamptz_is_aware_utc() -> None:
    value = converter_for(1184)("2026-11-28 12:00:00.123456+00")
    assert value == datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
    assert value.utcoffset() == timedelta(0)


def test_timestamptz_with_an_offset_keeps_its_instant() -> None:
    value = converter_for(1184)("2026-11-28 20:00:00.5+08")
    assert value.tzinfo is not None
    assert value == datetime(2026, 11, 28, 12, 0, 0, 500000, tzinfo=UTC)
    assert value.utcoffset() == timedelta(hours=8)
    assert value.astimezone(UTC).hour == 12


def test_timestamp_without_zone_is_taken_as_utc() -> None:
    value = converter_for(1114)("2026-11-28 12:00:00")
    assert value == datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_timestamp_without_zone_is_read_in_the_crm_sessions_zone() -> None:
    value = converter_for(1114, ZoneInfo("Asia/Shanghai"))("2026-11-28 09:00:00")
    assert value == datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
    assert value.utcoffset() == timedelta(0)  # carried as UTC, the same instant


def test_a_naive_time_in_a_dst_gap_or_fold_takes_the_earlier_offset() -> None:
    berlin = converter_for(1114, ZoneInfo("Europe/Berlin"))
    # 2026-10-25 02:30 happens twice in Berlin (CEST +02, then CET +01): the first one
    assert berlin("2026-10-25 02:30:00") == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert berlin("2026-01-15 09:00:00") == datetime(2026, 1, 15, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(("oid", "text", "expected"), [
    (16, "t", True), (16, "f", False),
    (20, "9007199254740993", 9007199254740993), (21, "-7", -7), (23, "42", 42),
    (1082, "2023-01-01", date(2023, 1, 1)),
    (25, "北京市朝阳区建国路88号", "北京市朝阳区建国路88号"),  # text
    (1043, "10台", "10台"),  # varchar
    (2950, "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a",
     "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a"),  # uuid stays its text
    (99999, "anything", "anything"),  # unknown types stay text
])
def test_converters(oid: int, text: str, expected: Any) -> None:
    value = converter_for(oid)(text)
    assert value == expected
    assert type(value) is type(expected)
