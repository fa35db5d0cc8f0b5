"""PostgreSQL's special values through the value converters: a typed error, never a guess
or a library exception quoting the value (docs/DESIGN.md, "Special values")."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from service.cdc.events import converter_for
from service.errors import CaptureRejected, UnrepresentableValue

NUMERIC, DATE, TIMESTAMP, TIMESTAMPTZ = 1700, 1082, 1114, 1184


@pytest.mark.parametrize(("oid", "text", "reason"), [
    (NUMERIC, "NaN", "numeric NaN"),
    (NUMERIC, "Infinity", "numeric Infinity"),
    (NUMERIC, "-Infinity", "numeric -Infinity"),
    (DATE, "infinity", "infinity date"),
    (DATE, "-infinity", "-infinity date"),
    (DATE, "0044-03-15 BC", "BC date"),
    (DATE, "10000-01-01", "date past year 9999"),
    (DATE, "294276-12-31", "date past year 9999"),
    (TIMESTAMP, "infinity", "infinity timestamp"),
    (TIMESTAMPTZ, "-infinity", "-infinity timestamp"),
    (TIMESTAMPTZ, "0001-01-01 00:00:00+00 BC", "BC timestamp"),
    (TIMESTAMPTZ, "12000-06-01 00:00:00+00", "timestamp past year 9999"),
])
def test_special_values_raise_a_typed_error_without_the_value(oid: int, text: str,
                                                              reason: str) -> None:
    with pytest.raises(UnrepresentableValue) as caught:
        converter_for(oid)(text)
    assert isinstance(caught.value, CaptureRejected)
    assert caught.value.stage == "capture"
    assert caught.value.detail.startswith(reason)
    if not text[0].isalpha() and not text.startswith("-"):
        assert text not in str(caught.value)  # a date as typed is not in the reason


@pytest.mark.parametrize(("oid", "text", "value"), [
    (NUMERIC, "-0.00", Decimal("-0.00")),
    (NUMERIC, "99999999999999.99", Decimal("99999999999999.99")),
    (DATE, "0001-01-01", date(1, 1, 1)),
    (DATE, "9999-12-31", date(9999, 12, 31)),
    (TIMESTAMPTZ, "9999-12-31 23:59:59.999999+00",
     datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    (TIMESTAMPTZ, "0001-01-01 00:00:00+00", datetime(1, 1, 1, tzinfo=UTC)),
])
def test_the_edges_that_fit_are_values(oid: int, text: str, value: object) -> None:
    assert converter_for(oid)(text) == value
