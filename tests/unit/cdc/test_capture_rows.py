"""capture.typed_or_rejected: one row typed, or why not (column named, value never quoted),
so reconcile and resync isolate an unreadable row instead of failing its chunk."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.cdc.capture import Column, TableInfo, typed_or_rejected
from service.cdc.profile import load_profile
from service.errors import UnrepresentableValue

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
