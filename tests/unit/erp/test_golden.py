"""The golden table (tests/data/format_golden.csv) through the real transform functions.

Each row is also checked against its source, independently of the transform: a phone's
expected E.164 must be a valid number of the stated type in libphonenumber's metadata, an
address's expected code must be in the shipped division list under the expected name.
"""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import phonenumbers
import pytest

from service.erp import transform as tf
from service.erp.mappings import Mappings
from service.errors import MappingError

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "data" / "format_golden.csv"
DATA = ROOT / "service" / "erp" / "data"

with open(GOLDEN, encoding="utf-8", newline="") as _fh:
    ROWS = [(r["category"], r["input"], r["expected"], r["check"]) for r in csv.DictReader(_fh)]


@pytest.fixture(scope="module")
def m() -> Mappings:
    return Mappings.load()


def _codes() -> dict[str, set[str]]:
    """code -> names, straight from the source files (not through service.erp.divisions)."""
    out: dict[str, set[str]] = {}
    for name, width in (("provinces.csv", 4), ("cities.csv", 2), ("areas.csv", 0)):
        with open(DATA / name, encoding="utf-8", newline="") as fh:
            for r in csv.DictReader(fh):
                out.setdefault(r["code"] + "0" * width, set()).add(r["name"])
    for code, name in (("810000", "香港特别行政区"), ("820000", "澳门特别行政区"),
                       ("710000", "台湾省")):
        out.setdefault(code, set()).add(name)
    return out


CODES = _codes()


def _transform(category: str, value: str, m: Mappings) -> str:
    if category == "phone":
        phones = tf.parse_phones(value, m)
        if phones is None:
            return "None"
        first = phones.primary + (f";ext={phones.extension}" if phones.extension else "")
        return " | ".join((first, *phones.others))
    if category == "address":
        a = tf.parse_cn_address(value)
        return "|".join([a.province, a.city or "", a.district or "", a.street or "",
                         a.division_code])
    if category == "name":
        family, given, middle, order = value.split("|")
        return tf.full_name(family, given, middle or None, order)
    if category == "quantity":
        q = tf.parse_quantity(value, m)
        return f"{q.value} {q.unit}"
    if category == "status":
        return tf.order_status(value, m)
    if category == "gender":
        return tf.gender_code(value, m)
    if category == "order_no":
        return tf.order_number(value)
    raise AssertionError(f"unknown category {category}")


def test_the_table_is_large_and_covers_every_category() -> None:
    assert len(ROWS) >= 300
    assert {r[0] for r in ROWS} == {"phone", "address", "name", "quantity", "status", "gender",
                                    "order_no"}


@pytest.mark.parametrize(("category", "value", "expected", "check"), ROWS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_golden(m: Mappings, category: str, value: str, expected: str, check: str) -> None:
    if expected.startswith("!"):
        with pytest.raises(MappingError) as info:
            _transform(category, value, m)
        assert expected[1:] in info.value.reason
        return
    assert _transform(category, value, m) == expected


PHONES = [r for r in ROWS if r[0] == "phone" and r[3]]
ADDRESSES = [r for r in ROWS if r[0] == "address" and r[3] == "division"]


@pytest.mark.parametrize(("category", "value", "expected", "check"), PHONES)
def test_expected_phone_is_valid_in_libphonenumber_metadata(
        category: str, value: str, expected: str, check: str) -> None:
    number = phonenumbers.parse(expected.split(";")[0], None)
    assert phonenumbers.is_valid_number(number)
    assert phonenumbers.PhoneNumberType.to_string(phonenumbers.number_type(number)) == check


@pytest.mark.parametrize(("category", "value", "expected", "check"), ADDRESSES)
def test_expected_division_code_is_in_the_official_list(
        category: str, value: str, expected: str, check: str) -> None:
    province, city, district, _street, code = expected.split("|")
    names = CODES[code]
    most_specific = district if code[:2] not in ("81", "82", "71") and district else \
        city if code[2:] != "0000" else province
    assert most_specific in names or (city == province and province in names)
    assert province in CODES[code[:2] + "0000"]


def test_quantities_are_decimal(m: Mappings) -> None:
    assert tf.parse_quantity("十点五公斤", m).value == Decimal("10.5")
