"""capture.typed_or_rejected: one row typed, or why not (column named, value never quoted),
so reconcile and resync isolate an unreadable row instead of failing its chunk."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.cdc.capture import Column, TableInfo, typed_or_rejected
from service.cdc.dead_letters import text_row
from service.cdc.producer import _typed
from service.cdc.profile import load_profile
from service.errors import CaptureRejected, UnrepresentableValue

TEXT, NUMERIC, DATE = 25, 1700, 1082


def customers() -> TableInfo:
    ent = load_profile("demo").entities["customer"]
    return TableInfo(ent, {"customer_id": Column("customer_id", TEXT, "text"),
                           "purchase_amount": Column("purchase_amount", NUMERIC, "numeric"),
                           "birth_date": Column("birth_date", DATE, "date")})


def test_a_readable_row_is_typed() -> None:
    row = typed_or_rejected(customers(), {"customer_id": "7", "purchase_amount": "5000.00",
                                          "birth_date": None})
    assert row == {"customer_id": "7", "purchase_amount": Decimal("5000.00"),
                   "birth_date": None}


@pytest.mark.parametrize(("column", "text", "reason"), [
    ("purchase_amount", "NaN", "numeric NaN is not a finite number"),
    ("birth_date", "infinity", "infinity date has no counterpart"),
    ("birth_date", "0044-03-15 BC", "BC date"),
    ("purchase_amount", "12,5", "cannot be read ("),
])
def test_an_unreadable_row_names_its_column_and_reason(column: str, text: str,
                                                       reason: str) -> None:
    raw = {"customer_id": "7", "purchase_amount": "1.00", "birth_date": "2000-01-01",
           column: text}
    error = typed_or_rejected(customers(), raw)
    assert isinstance(error, UnrepresentableValue)
    assert error.column == column
    assert error.detail.startswith(reason)
    if text[0].isdigit():
        assert text not in str(error)


def flaky_customers(first_error: Exception) -> TableInfo:
    """customers() whose amount converter fails on its first call only: the whole row fails,
    no single column does when converted one by one."""
    info = customers()
    calls = []
    real = info.converters["purchase_amount"]

    def once(text: str) -> object:
        calls.append(text)
        if len(calls) == 1:
            raise first_error
        return real(text)

    info.__dict__["converters"] = {**info.converters, "purchase_amount": once}
    return info


@pytest.mark.parametrize(("first_error", "detail"), [
    (CaptureRejected("event over the size limit"), "event over the size limit"),
    (ValueError("12,5 is not a number"), "cannot be read (ValueError)"),
])
def test_no_single_failing_column_gives_the_first_error(first_error: Exception,
                                                        detail: str) -> None:
    raw = {"customer_id": "7", "purchase_amount": "12.50", "birth_date": None}
    error = typed_or_rejected(flaky_customers(first_error), raw)
    assert isinstance(error, CaptureRejected)
    assert error.column is None
    assert error.detail == detail
    assert "12,5" not in str(error)


def test_the_producer_letters_the_same_error_with_the_row_as_text() -> None:
    raw = {"customer_id": "7", "purchase_amount": "NaN", "birth_date": None}
    typed, rejection = _typed(customers(), raw)
    assert typed == {}
    assert rejection is not None
    expected = typed_or_rejected(customers(), raw)
    assert isinstance(expected, CaptureRejected)
    assert (type(rejection.error), rejection.error.column, rejection.error.detail) == (
        type(expected), "purchase_amount", expected.detail)
    assert rejection.before is None
    assert rejection.after == text_row(raw)
    # the no-single-column fallback too: the first error, as reconcile reports it
    _, rejection = _typed(flaky_customers(ValueError("x")), {**raw, "purchase_amount": "1"})
    assert rejection is not None
    assert (rejection.error.column, rejection.error.detail) == (None,
                                                                "cannot be read (ValueError)")


def test_a_readable_row_has_no_rejection() -> None:
    typed, rejection = _typed(customers(), {"customer_id": "7", "purchase_amount": "1.00",
                                            "birth_date": "2000-01-01"})
    assert rejection is None
    assert typed["purchase_amount"] == Decimal("1.00")
