"""Property: PostgreSQL's edge values for every captured column type, through the producer's
path (text -> converter -> event -> Avro encoding and size check), come out as an event that
decodes to the same values or as a capture dead letter; nothing else (no exception escapes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.avro import SchemaRegistry
from service.cdc.dead_letters import CaptureLetter
from service.cdc.events import CREATE, RowChange, build_events, converter_for
from service.cdc.producer import CdcProducer
from service.errors import CaptureRejected
from service.settings import Settings

INT8, TEXT, NUMERIC, DATE, TIMESTAMPTZ = 20, 25, 1700, 1082, 1184
REGISTRY = SchemaRegistry.load(Settings().schemas_dir)
PRODUCER = CdcProducer(Settings(), REGISTRY, kafka_producer=object())
COMMIT = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

# Text as PostgreSQL can hold it: no NUL, no lone surrogates.
pg_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                         blacklist_characters="\x00"), max_size=40)
numeric_text = st.one_of(
    st.decimals(min_value=Decimal("-999999999999.99"), max_value=Decimal("999999999999.99"),
                places=2, allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0.00", "0.001", "1.5",
                     "123456789012345678.12", "1e3"]))
date_text = st.one_of(
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["infinity", "-infinity", "0044-03-15 BC", "4713-01-01 BC",
                     "10000-01-01", "294276-12-31", "0001-01-01", "9999-12-31"]))
timestamp_text = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(
        lambda t: t.isoformat(sep=" ").replace("+00:00", "+00")),
    st.sampled_from(["infinity", "-infinity", "0001-01-01 00:00:00+00 BC",
                     "12000-06-01 00:00:00+00", "9999-12-31 23:59:59.999999+00",
                     "2026-11-28 20:00:00.5+08"]))
nullable = lambda s: st.one_of(st.none(), s)  # noqa: E731

CUSTOMER_COLUMNS: dict[str, tuple[int, Any]] = {
    "customer_id": (INT8, st.integers(1, 2**62).map(str)),
    "family_name": (TEXT, pg_text), "given_name": (TEXT, pg_text),
    "middle_name": (TEXT, nullable(pg_text)), "name_order": (TEXT, st.just("eastern")),
    "gender": (TEXT, pg_text), "birth_date": (DATE, nullable(date_text)),
    "phone": (TEXT, nullable(pg_text)), "email": (TEXT, nullable(pg_text)),
    "address": (TEXT, nullable(pg_text)), "purchase_frequency": (TEXT, nullable(pg_text)),
    "purchase_amount": (NUMERIC, nullable(numeric_text)),
    "product_preference": (TEXT, nullable(pg_text)), "notes": (TEXT, nullable(pg_text)),
    "updated_at": (TIMESTAMPTZ, timestamp_text),
}
DEMAND_COLUMNS: dict[str, tuple[int, Any]] = {
    "demand_id": (INT8, st.integers(1, 2**62).map(str)),
    "kind": (TEXT, st.just("市场趋势")), "product_category": (TEXT, pg_text),
    "content": (TEXT, pg_text), "observed_at": (TIMESTAMPTZ, timestamp_text),
}


def rows(columns: dict[str, tuple[int, Any]]) -> Any:
    return st.fixed_dictionaries({name: strategy for name, (_, strategy) in columns.items()})


def through_the_producer(table: str, columns: dict[str, tuple[int, Any]],
                         text_row: dict[str, str | None]) -> str:
    """'event' or 'dead letter'; any other outcome raises."""
    try:
        row = {name: None if text is None else converter_for(columns[name][0])(text)
               for name, text in text_row.items()}
    except CaptureRejected:
        return "dead letter"  # the decoder's path: UnrepresentableValue, a letter
    try:
        (event,) = build_events([RowChange(table, CREATE, None, row)],
                                profile=PRODUCER.profile, refs=PRODUCER.refs,
                                lsn=0x16B374D848, xid=7, commit_time=COMMIT)
    except CaptureRejected:
        return "dead letter"
    encoded = PRODUCER._encoded(event)
    if isinstance(encoded, CaptureLetter):
        assert encoded.error.stage == "capture" and encoded.table == table
        return "dead letter"
    kind, decoded = REGISTRY.decode(encoded)
    assert kind == event.kind
    assert decoded["after"] == event.record["after"]  # sent as built from the CRM's row
    return "event"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows(CUSTOMER_COLUMNS))
def test_customer_edge_values_become_events_or_capture_dead_letters(
        text_row: dict[str, str | None]) -> None:
    assert through_the_producer("crm.customers", CUSTOMER_COLUMNS, text_row) in (
        "event", "dead letter")


@settings(max_examples=200, deadline=None)
@given(rows(DEMAND_COLUMNS))
def test_market_demand_edge_values_become_events_or_capture_dead_letters(
        text_row: dict[str, str | None]) -> None:
    assert through_the_producer("crm.market_demand", DEMAND_COLUMNS, text_row) in (
        "event", "dead letter")


def test_the_special_values_take_the_dead_letter_path() -> None:
    base = {name: None for name in CUSTOMER_COLUMNS} | {
        "customer_id": "1", "family_name": "李", "given_name": "娜", "gender": "女",
        "name_order": "eastern", "updated_at": "2026-11-28 12:00:00+00"}
    assert through_the_producer("crm.customers", CUSTOMER_COLUMNS, base) == "event"
    for column, text in [("purchase_amount", "NaN"), ("purchase_amount", "Infinity"),
                         ("birth_date", "0044-03-15 BC"), ("birth_date", "infinity"),
                         ("birth_date", "10000-01-01"), ("updated_at", "-infinity")]:
        assert through_the_producer("crm.customers", CUSTOMER_COLUMNS,
                                    {**base, column: text}) == "dead letter", (column, text)
