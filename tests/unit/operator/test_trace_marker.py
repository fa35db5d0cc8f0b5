"""`trace KEY` shows a capture dead letter's marker on the event's topic as that letter, with
its reason, not as "DecodeError: not Avro single-object encoding" (which reads as a corrupt
topic)."""

from __future__ import annotations

import json

from service.cdc.dead_letters import MARKER
from service.operator.trace import _marker_row


def test_a_marker_is_named_as_the_capture_letter_it_stands_for() -> None:
    value = MARKER + json.dumps({
        "reason": "numeric NaN is not a finite number: no event carries it",
        "column": "unit_price", "dlq_partition": 0, "dlq_offset": 3,
        "error_class": "UnrepresentableValue", "table": "crm.order_lines",
        "primary_key": {"order_id": "9102", "line_no": "8"}}).encode()
    row = _marker_row("crm.sales", 0, 127, value)
    assert row["kind"] == "capture"
    assert row["error"] == ("capture dead letter (UnrepresentableValue): unit_price: numeric "
                            "NaN is not a finite number: no event carries it")
    assert "DecodeError" not in row["error"]


def test_a_malformed_marker_is_still_named_a_capture_letter() -> None:
    assert _marker_row("crm.sales", 0, 1, MARKER + b"{")["error"] == \
        "capture dead letter (marker unreadable)"
