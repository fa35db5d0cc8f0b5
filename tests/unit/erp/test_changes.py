"""service.erp.changes: canonical event records (schemas/*/v2.avsc) -> ERP rows."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from service.erp.changes import to_erp
from service.erp.mappings import Mappings
from service.errors import MappingError

COMMIT = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
ACCOUNT = "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a"


@pytest.fixture(scope="module")
def mappings() -> Mappings:
    return Mappings.load()


def source(table: str, profile: str = "demo") -> dict[str, Any]:
    return {"lsn": 0x5A, "seq": 3, "txid": 9, "commit_time": COMMIT, "table": table,
            "snapshot": False, "profile": profile}


def customer(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": "42", "full_name": None, "family_name": "张", "given_name": "三",
        "middle_name": None, "name_order": "eastern", "gender": "男",
        "birth_date": date(1990, 5, 17), "phone": "138 1234 5678", "email": None,
        "address": "北京市朝阳区建国路88号", "street": None, "city": None, "region": None,
        "postcode": None, "country": None, "currency": None, "purchase_frequency": "每月1次",
        "purchase_amount": "5000.00", "product_preference": "电子产品", "notes": None,
    }
    record.update(overrides)
    return record


def company(**overrides: Any) -> dict[str, Any]:
    """A BottleCRM account: one name field, a structured address, no person's details."""
    return customer(**{
        "key": ACCOUNT, "full_name": "  北京星辰科技 有限公司 ", "family_name": None,
        "given_name": None, "name_order": None, "gender": None, "birth_date": None,
        "email": " Info@Xingchen.CN ", "address": None, "street": "建国路88号",
        "city": "北京市", "region": "北京", "postcode": "100022", "country": "CN",
        "currency": "CNY", "purchase_frequency": None, "purchase_amount": None,
        "product_preference": None, **overrides})


def customer_event(after: dict[str, Any] | None, before: dict[str, Any] | None = None,
                   op: str = "CREATE") -> dict[str, Any]:
    key = (after or before or {})["key"]
    return {"event_id": "5A/3", "op": op, "source": source("crm.customers"), "key": key,
            "before": before, "after": after}


def line(line_no: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": f'["9001","{line_no}"]', "order_key": "9001", "product_code": "P-PHONE-5G",
        "product_name": "手机", "quantity": "10台", "unit": None, "unit_price": "5000.00"}
    record.update(overrides)
    return record


def order_event(lines: list[dict[str, Any]], after: dict[str, Any] | None = None,
                before: dict[str, Any] | None = None, op: str = "CREATE") -> dict[str, Any]:
    return {"event_id": "5A/3", "op": op, "source": source("crm.sales_orders"), "key": "9001",
            "customer_key": "42", "before": before, "after": after, "lines": lines}


def header(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"key": "9001", "customer_key": "42", "order_no": "20230101",
                              "order_date": date(2023, 1, 1), "status": "已发货",
                              "currency": "元", "total_amount": None}
    record.update(overrides)
    return record


def test_person_from_name_parts_and_free_text_address(mappings: Mappings) -> None:
    change = to_erp("customer", customer_event(customer()), mappings)
    partner = change.partner
    assert partner is not None and change.customer_id == "42"
    assert (partner.crm_customer_id, partner.full_name, partner.gender_code) == ("42", "张三", "M")
    assert partner.phone_e164 == "+8613812345678"
    assert (partner.province, partner.city, partner.district, partner.street) == (
        "北京市", "北京市", "朝阳区", "建国路88号")
    assert partner.purchase_amount == Decimal("5000.00")
    assert partner.amount_currency == "CNY"  # an amount without a currency is in yuan
    assert (partner.pos.lsn, partner.pos.seq, partner.pos.event_id) == (0x5A, 3, "5A/3")


def test_company_from_full_name_and_structured_address(mappings: Mappings) -> None:
    partner = to_erp("customer", customer_event(company()), mappings).partner
    assert partner is not None
    assert partner.crm_customer_id == ACCOUNT
    assert partner.full_name == "北京星辰科技 有限公司"  # white space runs collapsed
    assert partner.gender_code == "U" and partner.birth_date is None and partner.age is None
    assert partner.email == "info@xingchen.cn"
    assert (partner.city, partner.street, partner.district) == ("北京市", "建国路88号", None)
    # Read against the division list like free text: the official name and its code.
    assert (partner.province, partner.division_code) == ("北京市", "110000")
    assert partner.purchase_amount is None and partner.amount_currency is None


def test_name_parts_win_over_full_name(mappings: Mappings) -> None:
    partner = to_erp("customer", customer_event(customer(full_name="Zhang San")),
                     mappings).partner
    assert partner is not None and partner.full_name == "张三"


@pytest.mark.parametrize("name", [None, "", "   "])
def test_customer_without_any_name_is_refused(mappings: Mappings, name: str | None) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("customer", customer_event(company(full_name=name)), mappings)
    assert info.value.field == "full_name"


def test_customer_delete_is_a_tombstone(mappings: Mappings) -> None:
    partner = to_erp("customer", customer_event(None, company(), op="DELETE"), mappings).partner
    assert partner is not None
    assert (partner.crm_customer_id, partner.deleted) == (ACCOUNT, True)


@pytest.mark.parametrize(("text", "value"), [("5000.00", Decimal("5000.00")),
                                             (" 0.10 ", Decimal("0.10")),
                                             ("1.500", Decimal("1.5")),
                                             ("999999999999.99", Decimal("999999999999.99"))])
def test_amount_text_becomes_an_exact_decimal(mappings: Mappings, text: str,
                                              value: Decimal) -> None:
    partner = to_erp("customer", customer_event(customer(purchase_amount=text)),
                     mappings).partner
    assert partner is not None and partner.purchase_amount == value


@pytest.mark.parametrize("text", ["NaN", "-Infinity", "12,50", "五千", "1e400",
                                  "1000000000000", "-1000000000000.00", "1E-8", "12.345"])
def test_amount_that_is_not_a_finite_number_is_refused(mappings: Mappings, text: str) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("customer", customer_event(customer(purchase_amount=text)), mappings)
    assert info.value.field == "purchase_amount"


def test_order_lines_are_keyed_by_the_crm_line_key(mappings: Mappings) -> None:
    change = to_erp("order", order_event(
        [{"op": "CREATE", "before": None, "after": line(1)},
         {"op": "CREATE", "before": None, "after": line(2, quantity="2.50", unit="kg",
                                                       unit_price="0.10",
                                                       product_code="P-SOLDER")},
         {"op": "DELETE", "before": line(3), "after": None}],
        after=header()), mappings)
    assert change.header is not None and change.header.status_code == "SHIPPED"
    assert (change.order_id, change.needs_customer) == ("9001", "42")
    assert [(i.crm_order_id, i.crm_line_id, i.deleted) for i in change.items] == [
        ("9001", '["9001","1"]', False), ("9001", '["9001","2"]', False),
        ("9001", '["9001","3"]', True)]
    first, second, _ = change.items
    assert (first.sku, first.quantity, first.unit_code, first.unit_price) == (
        "SKU-100001", Decimal(10), "UNIT", Decimal("5000.00"))
    # A unit kept apart from the quantity (BottleCRM: a constant) counts as written after it;
    # the numeric column's scale is not the count's precision (2.50 -> 2.5).
    assert (second.quantity, second.unit_code, second.unit_price) == (
        Decimal("2.5"), "KGM", Decimal("0.10"))


@pytest.mark.parametrize(("quantity", "expected"), [("10.00", Decimal(10)), ("3", Decimal(3))])
def test_a_whole_count_in_a_numeric_column_is_whole(mappings: Mappings, quantity: str,
                                                     expected: Decimal) -> None:
    record = order_event(lines=[{"op": "CREATE", "before": None,
                                 "after": line(1, quantity=quantity, unit="个",
                                               product_code="P-CHARGER")}])
    (item,) = to_erp("order", record, mappings).items
    assert (item.quantity, item.unit_code) == (expected, "PCE")


def test_a_fraction_of_a_countable_unit_is_refused(mappings: Mappings) -> None:
    record = order_event(lines=[{"op": "CREATE", "before": None,
                                 "after": line(1, quantity="2.50", unit="个",
                                               product_code="P-CHARGER")}])
    with pytest.raises(MappingError) as info:
        to_erp("order", record, mappings)
    assert info.value.field == "lines.quantity"


@pytest.mark.parametrize("price", ["NaN", "-1.00", None, "0.125", "1000000000000"])
def test_line_price_that_is_not_a_finite_non_negative_number_is_refused(
        mappings: Mappings, price: str | None) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("order", order_event([{"op": "CREATE", "before": None,
                                      "after": line(1, unit_price=price)}]), mappings)
    assert info.value.field == "lines.unit_price"


@pytest.mark.parametrize(("changed", "field"), [
    ({"quantity": "台十"}, "lines.quantity"),
    ({"unit_price": "-1.00"}, "lines.unit_price"),
    ({"product_code": "P-HOVERBOARD"}, "lines.product_code"),
])
def test_a_line_error_names_the_line_and_a_lines_field(
        mappings: Mappings, changed: dict[str, str], field: str) -> None:
    record = order_event([{"op": "CREATE", "before": None, "after": line(1)},
                          {"op": "CREATE", "before": None, "after": line(2, **changed)}])
    with pytest.raises(MappingError) as info:
        to_erp("order", record, mappings)
    assert (info.value.field, info.value.line) == (field, '["9001","2"]')
    # `dlq list --field` matches the "<field>: " prefix of the letter's message
    assert info.value.reason.startswith(f'{field}: line ["9001","2"]: ')
    assert info.value.detail and info.value.detail in info.value.reason


def test_lines_only_event_has_no_header(mappings: Mappings) -> None:
    change = to_erp("order", order_event([{"op": "UPDATE", "before": line(1),
                                           "after": line(1, quantity="12台")}], op="UPDATE"),
                    mappings)
    assert change.header is None and change.needs_customer is None
    assert change.order_id == "9001" and change.customer_id == "42"
    assert change.items[0].quantity == Decimal(12)


def test_order_delete_is_a_tombstone_with_its_lines(mappings: Mappings) -> None:
    change = to_erp("order", order_event([{"op": "DELETE", "before": line(1), "after": None}],
                                         before=header(), op="DELETE"), mappings)
    assert change.header is not None and change.header.deleted
    assert change.header.crm_order_id == "9001" and change.needs_customer is None
    assert [(i.crm_line_id, i.deleted) for i in change.items] == [('["9001","1"]', True)]


def test_order_without_a_date_is_refused(mappings: Mappings) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("order", order_event([], after=header(order_date=None)), mappings)
    assert info.value.field == "order_date"


def test_market_demand(mappings: Mappings) -> None:
    record = {"event_id": "5A/3", "op": "CREATE", "source": source("crm.market_demand"),
              "key": "7", "before": None,
              "after": {"key": "7", "kind": "市场趋势", "product_category": "手机",
                        "content": "5G手机市场增长迅速", "observed_at": COMMIT}}
    demand = to_erp("market_demand", record, mappings).demand
    assert demand is not None
    assert (demand.crm_demand_id, demand.signal_type, demand.deleted) == (
        "7", "MARKET_TREND", False)


def test_an_amount_the_erp_would_round_is_refused_saying_so(mappings: Mappings) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("customer", customer_event(customer(purchase_amount="12.345")), mappings)
    assert "more than two decimal places" in str(info.value)
    with pytest.raises(MappingError) as info:
        to_erp("order", order_event([{"op": "CREATE", "before": None,
                                      "after": line(1, unit_price="0.125")}]), mappings)
    assert (info.value.field, "more than two decimal places" in str(info.value)) == (
        "lines.unit_price", True)


@pytest.mark.parametrize(("text", "kept"), [("50000.00", Decimal("50000.00")),
                                            ("5000", Decimal("5000.00")),
                                            ("12.340", Decimal("12.34")),
                                            (None, None)])
def test_an_order_total_is_kept_exact_to_the_cent(mappings: Mappings, text: str | None,
                                                 kept: Decimal | None) -> None:
    change = to_erp("order", order_event([], after=header(total_amount=text)), mappings)
    assert change.header is not None
    assert change.header.total_amount == kept
    assert str(change.header.total_amount) == str(kept)


@pytest.mark.parametrize(("text", "why"), [
    ("50000.125", "more than two decimal places"),
    ("1000000000000", "too large"),
    ("-1.00", "negative"),
    ("NaN", "not an amount"),
])
def test_an_order_total_the_erp_cannot_keep_is_refused_naming_total_amount(
        mappings: Mappings, text: str, why: str) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("order", order_event([], after=header(total_amount=text)), mappings)
    assert info.value.field == "total_amount"
    assert why in str(info.value)


# --- money written as text (finding N12): read like an order's total -----------------------

@pytest.mark.parametrize(("text", "currency", "amount", "code"), [
    ("5000元", None, Decimal("5000.00"), "CNY"),
    ("¥5,000.00", None, Decimal("5000.00"), "CNY"),
    ("５０００元", None, Decimal("5000.00"), "CNY"),
    ("5000 人民币", "CNY", Decimal("5000.00"), "CNY"),
    ("USD 99.90", None, Decimal("99.90"), "USD"),
    ("99.90", "美元", Decimal("99.90"), "USD"),
    ("5000.00", None, Decimal("5000.00"), "CNY"),   # no currency anywhere: the default
])
def test_purchase_amount_text_is_read_like_an_order_total(
        mappings: Mappings, text: str, currency: str | None, amount: Decimal,
        code: str) -> None:
    partner = to_erp("customer", customer_event(customer(purchase_amount=text,
                                                         currency=currency)), mappings).partner
    assert partner is not None
    assert (partner.purchase_amount, partner.amount_currency) == (amount, code)


@pytest.mark.parametrize(("text", "currency", "field", "reason"), [
    ("5000美元", "元", "purchase_amount", "(USD) differs from the currency field (CNY)"),
    ("5000日元", None, "purchase_amount", "unknown currency 日元 written with the amount"),
    ("5000", "日元", "currency", "unknown currency 日元"),
    ("五千元", None, "purchase_amount", "not an amount"),
    ("-5000元", None, "purchase_amount", "negative"),
    ("5000.001元", None, "purchase_amount", "more than two decimal places"),
])
def test_purchase_amount_that_is_not_money_is_refused_saying_why(
        mappings: Mappings, text: str, currency: str | None, field: str, reason: str) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("customer", customer_event(customer(purchase_amount=text, currency=currency)),
               mappings)
    assert info.value.field == field
    assert reason in str(info.value)


@pytest.mark.parametrize("text", ["", "   "])
def test_a_blank_purchase_amount_is_no_amount(mappings: Mappings, text: str) -> None:
    partner = to_erp("customer", customer_event(customer(purchase_amount=text)),
                     mappings).partner
    assert partner is not None
    assert (partner.purchase_amount, partner.amount_currency) == (None, None)


def test_purchase_amount_without_a_currency_takes_the_configured_default(
        mappings: Mappings) -> None:
    usd = Mappings.parse(_shipped_with('[money]\ndefault_currency = "USD"\n'), "m.toml")
    partner = to_erp("customer", customer_event(customer(purchase_amount="5000.00")),
                     usd).partner
    assert partner is not None and partner.amount_currency == "USD"
    # a currency written or in the currency column still wins
    partner = to_erp("customer", customer_event(customer(purchase_amount="5000元")),
                     usd).partner
    assert partner is not None and partner.amount_currency == "CNY"


def _shipped_with(extra: str) -> bytes:
    from service.erp.mappings import DEFAULT_PATH
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    start = text.find("[money]")
    if start >= 0:  # replace the shipped section
        end = text.find("\n[", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    return (text + "\n" + extra).encode()


@pytest.mark.parametrize(("price", "expected"), [
    ("5000元", Decimal("5000.00")), ("¥5,000.00", Decimal("5000.00")),
    ("5000.00", Decimal("5000.00")), ("0.10 人民币", Decimal("0.10"))])
def test_line_price_text_is_read_like_an_order_total(mappings: Mappings, price: str,
                                                      expected: Decimal) -> None:
    for after in (header(), None):  # with the order's header, and a lines-only event
        (item,) = to_erp("order", order_event([{"op": "CREATE", "before": None,
                                                 "after": line(1, unit_price=price)}],
                                               after=after), mappings).items
        assert item.unit_price == expected


@pytest.mark.parametrize(("price", "after", "reason"), [
    ("100美元", header(), "(USD) differs from the currency field (CNY)"),
    ("100欧元", None, "unknown currency 欧元 written with the amount"),
    ("一百元", None, "not an amount"),
    ("", None, "no unit price"),
])
def test_line_price_that_is_not_the_orders_money_is_refused(
        mappings: Mappings, price: str, after: dict[str, Any] | None, reason: str) -> None:
    with pytest.raises(MappingError) as info:
        to_erp("order", order_event([{"op": "CREATE", "before": None,
                                      "after": line(1, unit_price=price)}], after=after),
               mappings)
    assert (info.value.field, info.value.line) == ("lines.unit_price", '["9001","1"]')
    assert reason in str(info.value)
