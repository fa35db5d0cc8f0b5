"""The edge-value property (test_capture_edge_values.py) for the captured column types that file
does not reach: the demo's orders and order lines (date, integer, numeric(14,2)) and every
BottleCRM table (uuid keys, boolean soft-delete flag, char(3), unconstrained numeric,
timestamp without time zone, a line naming its product by reference). Through the producer's
path (text -> converter -> event -> Avro encoding and size check), each row comes out as an
event that decodes to the values built from the CRM's row, or as a capture dead letter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.cdc.dead_letters import CaptureLetter
from service.cdc.events import CREATE, RowChange, build_events, converter_for
from service.cdc.producer import CdcProducer
from service.cdc.profile import load_profile
from service.errors import CaptureRejected, UnresolvedReference
from service.settings import Settings
from tests.unit.cdc.test_capture_edge_values import (
    DATE,
    INT8,
    NUMERIC,
    REGISTRY,
    TEXT,
    TIMESTAMPTZ,
    date_text,
    nullable,
    numeric_text,
    pg_text,
)

BOOL, INT2, INT4, BPCHAR, VARCHAR, TIMESTAMP, UUID = 16, 21, 23, 1042, 1043, 1114, 2950
COMMIT = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
PHONE = "d1e2f3a4-b5c6-4d7e-8f90-a1b2c3d4e5f6"

uuid_text = st.uuids().map(str)
int4_text = st.integers(-(2**31), 2**31 - 1).map(str)
bool_text = st.sampled_from(["t", "f"])
naive_timestamp_text = st.one_of(
    st.datetimes().map(lambda t: t.isoformat(sep=" ")),
    st.sampled_from(["infinity", "-infinity", "0044-03-15 00:00:00 BC",
                     "12000-06-01 00:00:00", "9999-12-31 23:59:59.999999",
                     "0001-01-01 00:00:00"]))
currency_text = st.sampled_from(["CNY", "USD", "元  "])

DEMO_ORDER: dict[str, tuple[int, Any]] = {
    "order_id": (INT8, st.integers(1, 2**62).map(str)), "order_no": (TEXT, pg_text),
    "customer_id": (INT8, st.integers(1, 2**62).map(str)), "order_date": (DATE, date_text),
    "status": (TEXT, pg_text), "currency": (TEXT, pg_text),
    "updated_at": (TIMESTAMPTZ, st.just("2026-11-29 09:00:00+00")),
}
DEMO_LINE: dict[str, tuple[int, Any]] = {
    "order_id": (INT8, st.integers(1, 2**62).map(str)), "line_no": (INT4, int4_text),
    "customer_id": (INT8, st.integers(1, 2**62).map(str)), "product_code": (TEXT, pg_text),
    "product_name": (TEXT, pg_text), "quantity": (TEXT, pg_text),
    "unit_price": (NUMERIC, numeric_text),
}
BOTTLE_ACCOUNT: dict[str, tuple[int, Any]] = {
    "id": (UUID, uuid_text), "org_id": (UUID, uuid_text), "name": (TEXT, pg_text),
    "email": (TEXT, nullable(pg_text)), "phone": (TEXT, nullable(pg_text)),
    "address_line": (TEXT, nullable(pg_text)), "city": (TEXT, nullable(pg_text)),
    "state": (TEXT, nullable(pg_text)), "postcode": (VARCHAR, nullable(pg_text)),
    "country": (VARCHAR, nullable(pg_text)), "currency": (BPCHAR, nullable(currency_text)),
    "is_active": (BOOL, bool_text), "created_at": (TIMESTAMP, naive_timestamp_text),
}
BOTTLE_ORDER: dict[str, tuple[int, Any]] = {
    "id": (UUID, uuid_text), "org_id": (UUID, uuid_text), "account_id": (UUID, uuid_text),
    "order_number": (TEXT, nullable(pg_text)), "order_date": (TIMESTAMP, naive_timestamp_text),
    "status": (TEXT, st.sampled_from(["DRAFT", "ACTIVATED", "COMPLETED", "CANCELLED"])),
    "currency": (BPCHAR, nullable(currency_text)),
    "total_amount": (NUMERIC, nullable(numeric_text)),
}
BOTTLE_LINE: dict[str, tuple[int, Any]] = {
    "id": (UUID, uuid_text), "org_id": (UUID, uuid_text), "order_id": (UUID, uuid_text),
    "product_id": (UUID, st.just(PHONE)), "name": (TEXT, pg_text),
    "quantity": (NUMERIC, numeric_text), "unit_price": (NUMERIC, numeric_text),
    "sort_order": (INT2, st.integers(-(2**15), 2**15 - 1).map(str)),
}


def producer_for(profile: str) -> CdcProducer:
    producer = CdcProducer(Settings(), REGISTRY, kafka_producer=object(),
                           profile=load_profile(profile))
    # a line names its product (BottleCRM) and its order: known from earlier events
    producer.refs.remember("product", PHONE, {"key": PHONE, "code": "P-PHONE-5G",
                                              "name": "5G手机"})
    return producer


DEMO, BOTTLE = producer_for("demo"), producer_for("bottlecrm")


def outcome(producer: CdcProducer, table: str, columns: dict[str, tuple[int, Any]],
            text_row: dict[str, str | None]) -> str:
    """'event' or 'dead letter'; any other outcome raises."""
    try:
        row = {name: None if text is None else converter_for(columns[name][0])(text)
               for name, text in text_row.items()}
    except CaptureRejected:
        return "dead letter"
    ent = producer.profile.table(table)
    assert ent is not None
    if ent.order_column and not ent.customer_column:  # BottleCRM: the order is known
        order_key = row[ent.order_column]
        producer.refs.remember("order", str(order_key), {"key": str(order_key),
                                                         "customer_key": "c-1"})
    try:
        events = build_events([RowChange(table, CREATE, None, row)], profile=producer.profile,
                              refs=producer.refs, lsn=0x16B374D848, xid=7, commit_time=COMMIT)
    except (CaptureRejected, UnresolvedReference):
        return "dead letter"
    (event,) = events
    encoded = producer._encoded(event)
    if isinstance(encoded, CaptureLetter):
        assert encoded.error.stage == "capture" and encoded.table == table
        return "dead letter"
    kind, decoded = REGISTRY.decode(encoded)
    assert kind == event.kind
    assert decoded["after"] == event.record["after"]
    assert decoded.get("lines") == event.record.get("lines")
    return "event"


def rows(columns: dict[str, tuple[int, Any]]) -> Any:
    return st.fixed_dictionaries({name: strategy for name, (_, strategy) in columns.items()})


CASES = {"demo order": (DEMO, "crm.sales_orders", DEMO_ORDER),
         "demo line": (DEMO, "crm.order_lines", DEMO_LINE),
         "bottlecrm account": (BOTTLE, "public.accounts", BOTTLE_ACCOUNT),
         "bottlecrm order": (BOTTLE, "public.orders", BOTTLE_ORDER),
         "bottlecrm line": (BOTTLE, "public.order_line_item", BOTTLE_LINE)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CASES)).flatmap(
    lambda case: st.tuples(st.just(case), rows(CASES[case][2]))))
def test_every_captured_column_type_becomes_an_event_or_a_capture_dead_letter(
        case_row: tuple[str, dict[str, str | None]]) -> None:
    case, text_row = case_row
    producer, table, columns = CASES[case]
    assert outcome(producer, table, columns, text_row) in ("event", "dead letter")


def test_the_special_values_of_these_types_take_the_dead_letter_path() -> None:
    line = {"order_id": "1", "line_no": "1", "customer_id": "1", "product_code": "P-100011",
            "product_name": "手机", "quantity": "10台", "unit_price": "5000.00"}
    assert outcome(DEMO, "crm.order_lines", DEMO_LINE, line) == "event"
    assert outcome(DEMO, "crm.order_lines", DEMO_LINE, {**line, "unit_price": "NaN"}) \
        == "dead letter"
    order = {"id": PHONE.replace("d1", "0d"), "org_id": PHONE, "account_id": PHONE,
             "order_number": "ORD-1", "order_date": "2026-11-29 09:00:00",
             "status": "ACTIVATED", "currency": "CNY", "total_amount": "50000"}
    assert outcome(BOTTLE, "public.orders", BOTTLE_ORDER, order) == "event"
    for column, text in [("order_date", "infinity"), ("order_date", "0044-03-15 00:00:00 BC"),
                         ("order_date", "12000-06-01 00:00:00"), ("total_amount", "NaN"),
                         ("total_amount", "-Infinity")]:
        assert outcome(BOTTLE, "public.orders", BOTTLE_ORDER, {**order, column: text}) \
            == "dead letter", (column, text)
