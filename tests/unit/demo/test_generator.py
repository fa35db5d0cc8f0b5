"""The demo CRM data generator (pure): deterministic, realistic, and inside what the ERP
mapping (mappings.toml) understands."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from datetime import UTC, date
from decimal import Decimal
from pathlib import Path

import pytest

from service.demo.generator import (
    DEMAND_KINDS,
    ORDER_STATUSES,
    PLACES,
    PRODUCTS,
    Customer,
    CustomerDelete,
    CustomerUpdate,
    DemoGenerator,
    LineQuantityChange,
    MarketDemandInsert,
    Order,
    OrderDelete,
    OrderStatusChange,
    format_cn_mobile,
)

MAPPINGS = tomllib.loads(
    (Path(__file__).resolve().parents[3] / "service" / "erp" / "mappings.toml").read_text("utf-8"))
CN_MOBILE = re.compile(r"1[3-9]\d{9}")
QUANTITY = re.compile(r"([1-9]\d*)(\D+)")
N_CUSTOMERS, N_ORDERS = 2000, 4000


def make(seed: int = 42) -> tuple[list[Customer], list[Order], DemoGenerator]:
    gen = DemoGenerator(seed)
    customers = [gen.customer(cid) for cid in range(1, N_CUSTOMERS + 1)]
    orders = list(gen.orders(list(range(1, N_ORDERS + 1)), [c.customer_id for c in customers]))
    return customers, orders, gen


@pytest.fixture(scope="module")
def data() -> tuple[list[Customer], list[Order], DemoGenerator]:
    return make()


def mobile_digits(phone: str) -> str:
    """The 11-digit mobile inside a Chinese number however it was typed, else ''."""
    if phone.startswith("+") and not phone.startswith("+86"):
        return ""  # another country's E.164 number (+1 415 ... also has 11 digits)
    digits = re.sub(r"\D", "", phone)
    for prefix in ("0086", "86"):
        if len(digits) == 11 + len(prefix) and digits.startswith(prefix):
            digits = digits[len(prefix):]
    return digits if CN_MOBILE.fullmatch(digits) else ""


def is_two_decimal(value: object) -> bool:
    return isinstance(value, Decimal) and value.as_tuple().exponent == -2 and value > 0


def test_same_seed_same_data_and_other_seed_other_data() -> None:
    customers, orders, gen = make(7)
    again_customers, again_orders, again_gen = make(7)
    assert customers == again_customers
    assert orders == again_orders
    assert [gen.market_demand() for _ in range(50)] == [
        again_gen.market_demand() for _ in range(50)]
    plans = []
    for g, cs, os in ((gen, customers, orders), (again_gen, again_customers, again_orders)):
        planner = g.change_planner()
        for c in cs:
            planner.add_customer(c)
        for o in os:
            planner.add_order(o)
        plans.append(list(planner.plan(1000)))
    assert plans[0] == plans[1] and len(plans[0]) == 1000
    other_customers, other_orders, _ = make(8)
    assert other_customers != customers and other_orders != orders


def test_phones_are_chinese_mobiles_typed_in_several_ways_or_e164(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    customers, _, _ = data
    phones = [c.phone for c in customers if c.phone is not None]
    assert len(phones) > 0.9 * len(customers)
    for phone in phones:
        if phone.startswith("+") and not phone.startswith("+86"):
            assert re.fullmatch(r"\+[1-9]\d{7,14}", phone), phone  # strict E.164
        else:
            assert mobile_digits(phone), phone
    cn = [p for p in phones if mobile_digits(p)]
    assert len(cn) > 0.9 * len(phones)
    shapes = {re.sub(r"1[3-9]\d([- ]?)\d{4}([- ]?)\d{4}$", r"1XX\g<1>XXXX\g<2>XXXX", p)
              for p in cn}
    assert {"1XXXXXXXXXX", "1XX XXXX XXXX", "+86 1XX-XXXX-XXXX", "0086 1XXXXXXXXXX",
            "+861XXXXXXXXXX"} == shapes


def test_format_cn_mobile() -> None:
    assert [format_cn_mobile("13812345678", s) for s in range(5)] == [
        "13812345678", "138 1234 5678", "+86 138-1234-5678", "0086 13812345678",
        "+8613812345678"]


def test_customers_look_like_the_crm(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    customers, _, _ = data
    western = [c for c in customers if c.name_order == "western"]
    eastern = [c for c in customers if c.name_order == "eastern"]
    assert 0.05 < len(western) / len(customers) < 0.15
    assert all(c.middle_name is None and 1 <= len(c.given_name) <= 2 for c in eastern)
    assert any(c.middle_name for c in western)
    assert all(c.given_name.isascii() for c in western)
    for c in customers:
        assert c.gender in MAPPINGS["gender"]
        assert c.birth_date is None or date(1950, 1, 1) <= c.birth_date <= date(2006, 12, 31)
        assert c.purchase_amount is None or is_two_decimal(c.purchase_amount)
    assert Counter(c.gender for c in eastern).keys() == {"男", "女", "未知"}
    emails = [c.email for c in customers if c.email]
    assert all(re.fullmatch(r"[\w.+-]+@[\w-]+(\.[\w-]+)+", e.strip().lower()) for e in emails)
    assert any(e != e.strip() for e in emails)  # stray spaces, as typed
    assert any(e != e.lower() for e in emails)  # capitals, as typed
    long_notes = [c for c in customers if c.notes and len(c.notes.encode("utf-8")) > 4096]
    assert long_notes  # TOASTed out of line
    assert any(c.purchase_frequency == "每月1次" for c in customers)


def test_addresses_are_province_city_district_street_number(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    customers, _, _ = data
    addresses = [c.address for c in customers if c.address]
    heads = {(p if p == city else p + city) + district for p, city, district, _ in PLACES}
    for address in addresses:
        assert any(address.startswith(h) for h in heads), address
        assert re.search(r"\d+号", address), address
    assert len({a[:8] for a in addresses}) > 20


def test_order_lines_belong_to_the_order_and_its_customer(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    customers, orders, _ = data
    ids = {c.customer_id for c in customers}
    names = {p.code: p.name for p in PRODUCTS}
    for order in orders:
        h = order.header
        assert h.customer_id in ids
        assert h.status in ORDER_STATUSES and h.currency == "元"
        assert h.order_no.startswith(f"{h.order_date:%Y%m%d}")
        assert 1 <= len(order.lines) <= 4
        assert [line.line_no for line in order.lines] == list(range(1, len(order.lines) + 1))
        assert len({line.product_code for line in order.lines}) == len(order.lines)
        for line in order.lines:
            assert line.order_id == h.order_id
            assert line.customer_id == h.customer_id
            assert names[line.product_code] == line.product_name
    assert len({o.header.order_no for o in orders}) == len(orders)
    assert len({o.header.customer_id for o in orders}) > 500  # spread over customers
    assert Counter(o.header.status for o in orders).keys() == set(ORDER_STATUSES)


def test_money_is_decimal_with_two_places_and_quantities_have_a_unit(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    _, orders, _ = data
    for line in (line for o in orders for line in o.lines):
        assert is_two_decimal(line.unit_price), line.unit_price
        m = QUANTITY.fullmatch(line.quantity)
        assert m, line.quantity
        assert m.group(2) in MAPPINGS["units"]


def test_every_code_is_known_to_the_erp_mapping(
    data: tuple[list[Customer], list[Order], DemoGenerator],
) -> None:
    _, orders, _ = data
    assert {p.code for p in PRODUCTS} <= MAPPINGS["products"].keys()
    assert set(ORDER_STATUSES) <= MAPPINGS["order_status"].keys()
    assert "元" in MAPPINGS["currencies"]
    assert set(DEMAND_KINDS) <= MAPPINGS["demand_kind"].keys()
    assert {line.product_code for o in orders for line in o.lines} == {p.code for p in PRODUCTS}


def test_market_demand_rows() -> None:
    gen = DemoGenerator(3)
    rows = [gen.market_demand() for _ in range(300)]
    assert {r.kind for r in rows} == set(DEMAND_KINDS)
    assert any("5G手机市场增长迅速" in r.content for r in rows)
    for r in rows:
        assert r.observed_at.tzinfo is UTC and r.product_category and r.content


def test_planned_changes_apply_to_rows_that_exist_in_order() -> None:
    customers, orders, gen = make(5)
    planner = gen.change_planner()
    for c in customers:
        planner.add_customer(c)
    for o in orders:
        planner.add_order(o)
    alive_customers = {c.customer_id for c in customers}
    status = {o.header.order_id: o.header.status for o in orders}
    owner = {o.header.order_id: o.header.customer_id for o in orders}
    lines = {o.header.order_id: o.lines for o in orders}
    allowed = {("待付款", "已付款"), ("待付款", "已取消"), ("已付款", "已发货"),
               ("已付款", "已取消"), ("已发货", "已完成")}
    changes = list(planner.plan(3000))
    assert len(changes) == 3000
    for ch in changes:
        if isinstance(ch, CustomerUpdate):
            assert ch.customer_id in alive_customers and ch.values
            for column, value in ch.values:
                if column == "phone":
                    assert isinstance(value, str)
                    assert mobile_digits(value) or re.fullmatch(r"\+[1-9]\d{7,14}", value)
                if column == "purchase_amount":
                    assert is_two_decimal(value)
        elif isinstance(ch, OrderStatusChange):
            assert status[ch.order_id] == ch.old_status
            assert (ch.old_status, ch.status) in allowed
            assert owner[ch.order_id] == ch.customer_id
            status[ch.order_id] = ch.status
        elif isinstance(ch, LineQuantityChange):
            assert status[ch.order_id] in ("待付款", "已付款")
            old = lines[ch.order_id][ch.line_no - 1].quantity
            new = QUANTITY.fullmatch(ch.quantity)
            assert new and new.group(2) == QUANTITY.fullmatch(old).group(2)  # type: ignore[union-attr]
        elif isinstance(ch, OrderDelete):
            assert ch.lines == len(lines.pop(ch.order_id))
            del status[ch.order_id], owner[ch.order_id]
        elif isinstance(ch, CustomerDelete):
            alive_customers.remove(ch.customer_id)
            gone = [oid for oid, cid in owner.items() if cid == ch.customer_id]
            assert ch.orders == len(gone)
            assert ch.lines == sum(len(lines[oid]) for oid in gone)
            for oid in gone:
                del status[oid], owner[oid], lines[oid]
        else:
            assert isinstance(ch, MarketDemandInsert)
    kinds = Counter(type(ch).__name__ for ch in changes)
    assert kinds.keys() == {"CustomerUpdate", "OrderStatusChange", "LineQuantityChange",
                            "OrderDelete", "CustomerDelete", "MarketDemandInsert"}
    assert kinds["CustomerDelete"] < kinds["OrderDelete"] < kinds["CustomerUpdate"]


def test_without_rows_only_market_demand_is_planned_and_orders_need_customers() -> None:
    gen = DemoGenerator(1)
    planned = list(gen.change_planner().plan(5))
    assert len(planned) == 5 and all(isinstance(ch, MarketDemandInsert) for ch in planned)
    with pytest.raises(ValueError):
        list(gen.orders([1], []))
