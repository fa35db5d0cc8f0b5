"""The capture dead letter's record and marker (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from service.cdc.dead_letters import (
    MARKER,
    MAX_VALUE_CHARS,
    CaptureDeadLetter,
    CaptureLetter,
    as_text,
    is_marker,
    read_marker,
)
from service.consumer import dlq
from service.errors import UnrepresentableValue


def letter(**after: str | None) -> CaptureLetter:
    return CaptureLetter(
        topic="crm.sales", key=b"1102", table="crm.customers", op="CREATE",
        primary_key={"customer_id": "1102"}, commit_lsn=(1 << 32) + 0xABC, xid=777,
        commit_time=datetime(2023, 1, 1, tzinfo=UTC), event_id="100000ABC/0",
        error=UnrepresentableValue("numeric NaN has no counterpart in an Avro decimal",
                                   "purchase_amount"),
        before=None, after={"customer_id": "1102", "family_name": "张", **after},
        kind="customer")


def test_the_letter_carries_identity_reason_and_the_values_as_text() -> None:
    doc = json.loads(letter(purchase_amount="NaN", phone="138xxxx5678").value())
    assert doc == {
        "table": "crm.customers", "op": "CREATE", "primary_key": {"customer_id": "1102"},
        "commit_lsn": "1/ABC", "xid": 777, "event_id": "100000ABC/0",
        "column": "purchase_amount", "error_class": "UnrepresentableValue",
        "reason": "numeric NaN has no counterpart in an Avro decimal", "kind": "customer",
        "before": None,
        "after": {"customer_id": "1102", "family_name": "张", "purchase_amount": "NaN",
                  "phone": "138xxxx5678"}}


def test_headers_follow_the_dlq_conventions_and_carry_no_values() -> None:
    headers = dlq.decode_headers(letter(phone="138xxxx5678").headers())
    assert headers[dlq.STAGE] == "capture"
    assert headers[dlq.ORIGINAL_TOPIC] == "crm.sales"
    assert headers[dlq.ORIGINAL_PARTITION] == headers[dlq.ORIGINAL_OFFSET] == "-1"
    assert headers[dlq.EXCEPTION_FQCN] == "service.errors.UnrepresentableValue"
    assert headers["crm_erp_sync-column"] == "purchase_amount"
    assert headers["crm_erp_sync-commit-lsn"] == "1/ABC"
    assert "138xxxx5678" not in json.dumps(headers) and "张" not in json.dumps(headers)


def test_long_values_are_cut_in_the_letter() -> None:
    doc = json.loads(letter(notes="x" * (MAX_VALUE_CHARS * 3)).value())
    assert len(doc["after"]["notes"]) < MAX_VALUE_CHARS + 100
    assert doc["after"]["notes"].endswith(f"[cut: {MAX_VALUE_CHARS * 3} characters in the CRM row]")


def test_the_marker_names_the_letter_without_values() -> None:
    marker = letter(phone="138xxxx5678").marker(2, 41)
    assert is_marker(marker) and not is_marker(b"\xc3\x01avro")
    assert b"138xxxx5678" not in marker and "张".encode() not in marker
    read = read_marker(marker)
    assert isinstance(read, CaptureDeadLetter)
    assert (read.dlq_partition, read.dlq_offset, read.column) == (2, 41, "purchase_amount")
    assert read.stage == "capture" and read.error_class == "UnrepresentableValue"
    # the event id the change would have had: the consumer knows a re-sent letter by it
    assert read.event_id == "100000ABC/0"
    # the kind its event would have been: a later event of that kind can supersede it
    assert read.kind == "customer"


def test_a_marker_written_before_kinds_reads_without_one() -> None:
    doc = json.loads(letter().marker(0, 1)[len(MARKER):])
    del doc["kind"]
    assert read_marker(MARKER + json.dumps(doc).encode()).kind == ""


def test_values_as_text() -> None:
    assert as_text(None) is None and as_text(True) == "t" and as_text(b"\xe5\xbc\xa0") == "张"
    assert as_text(datetime(2023, 1, 1, tzinfo=UTC)) == "2023-01-01T00:00:00+00:00"
