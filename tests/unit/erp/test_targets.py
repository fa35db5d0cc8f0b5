"""The tryton target's adapter: outcomes mapped back to changes, isolation of a refused order
among several events of it, and reconcile's view of mapped values (no server: a fake
TrytonTarget records the calls)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast

from service.erp.changes import (
    DemandRow,
    ErpChange,
    OrderHeaderRow,
    OrderItemRow,
    PartnerRow,
    Position,
)
from service.erp.target import Outcome, Status
from service.erp.tryton_target import TrytonErpTarget


def pos(lsn: int) -> Position:
    return Position(lsn, 0, f"{lsn}", datetime(2026, 11, 29, tzinfo=UTC))


def customer(key: str, lsn: int) -> ErpChange:
    row = PartnerRow(key, False, "张三", "M", None, None, None, None, "北京市", "北京市",
                     "朝阳区", "建国路88号", None, None, None, None, None, pos(lsn))
    return ErpChange("customer", key, partner=row)


def order(key: str, cust: str, lsn: int, status: str = "PAID") -> ErpChange:
    header = OrderHeaderRow(key, f"SO-{key}", cust, date(2026, 11, 29), status, "CNY", False,
                            pos(lsn))
    item = OrderItemRow(key, f'["{key}","1"]', "SKU-100001", "5G手机", Decimal(10), "UNIT",
                        Decimal(5000), False, pos(lsn))
    return ErpChange("order", cust, header=header, items=[item])


class FakeTryton:
    code_prefix = "CRM-"

    def __init__(self, refuse_lsn: int | None = None) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.refuse_lsn = refuse_lsn

    def apply_customers(self, rows: list[PartnerRow]) -> list[Outcome]:
        self.calls.append(("customers", [r.pos.lsn for r in rows]))
        return [Outcome("customer", r.crm_customer_id, Status.APPLIED) for r in rows]

    def apply_orders(self, headers: list[OrderHeaderRow], items: list[OrderItemRow]
                     ) -> list[Outcome]:
        self.calls.append(("orders", [h.pos.lsn for h in headers]))
        out: dict[str, Outcome] = {}
        for h in headers:
            refused = self.refuse_lsn is not None and h.pos.lsn == self.refuse_lsn
            out[h.crm_order_id] = (
                Outcome("order", h.crm_order_id, Status.REFUSED, "cancel: Tryton action")
                if refused or out.get(h.crm_order_id, Outcome("", "", Status.APPLIED)).status
                is Status.REFUSED else Outcome("order", h.crm_order_id, Status.APPLIED))
        return list(out.values())


def test_customers_go_first_and_every_change_gets_its_own_outcome() -> None:
    fake = FakeTryton()
    target = TrytonErpTarget(cast(Any, fake))
    demand = ErpChange("market_demand", None, demand=DemandRow(
        "7", "市场趋势", "手机", "5G手机市场增长迅速", datetime(2026, 11, 29, tzinfo=UTC), False,
        pos(5)))
    changes = [order("10", "1", 2), customer("1", 1), demand, order("11", "1", 3)]

    outcomes = target.apply(changes)

    assert fake.calls == [("customers", [1]), ("orders", [2, 3])]
    assert [(o.kind, o.key, o.status) for o in outcomes] == [
        ("order", "10", Status.APPLIED), ("customer", "1", Status.APPLIED),
        ("market_demand", "7", Status.APPLIED), ("order", "11", Status.APPLIED)]
    assert outcomes[2].reason == "not kept by the tryton target"


def test_a_refused_order_with_several_events_is_retried_event_by_event() -> None:
    fake = FakeTryton(refuse_lsn=3)  # the second event of order 10 is the one refused
    target = TrytonErpTarget(cast(Any, fake))
    changes = [order("10", "1", 2), order("10", "1", 3, "CANCELLED"), order("11", "1", 4)]

    outcomes = target.apply(changes)

    assert [o.status for o in outcomes] == [Status.APPLIED, Status.REFUSED, Status.APPLIED]
    assert outcomes[1].reason == "cancel: Tryton action"
    assert fake.calls == [("orders", [2, 3, 4]), ("orders", [2]), ("orders", [3])]


def test_view_keeps_what_tryton_holds_of_the_mapped_values() -> None:
    fake = FakeTryton()
    fake._subdivisions = {"北京市": 5}  # type: ignore[attr-defined]
    fake._subdivision_codes = {5: "CN-BJ"}  # type: ignore[attr-defined]
    fake._load_reference = lambda: None  # type: ignore[attr-defined]
    target = TrytonErpTarget(cast(Any, fake))
    row = customer("1", 1).partner
    assert row is not None
    values = {f: getattr(row, f) for f in ("full_name", "province", "city", "district",
                                           "street", "phone_e164", "email")}
    assert target.view("customer", values) == {
        "full_name": "张三", "street": "朝阳区 建国路88号", "city": "北京市",
        "subdivision": "CN-BJ", "phone_e164": None, "email": None}
    assert target.view("customer", {**values, "province": "火星"})["subdivision"] is None

    items = {'["10","1"]': ("SKU-100001", "5G手机", Decimal(10), "UNIT", Decimal(5000))}
    view = target.view("order", {"crm_customer_id": "1", "status_code": "SHIPPED",
                                 "currency": "USD", "items": items})
    assert view == {"_absent_ok": False, "crm_customer_id": "1", "state": "confirmed",
                    "currency": "USD", "items": {1: ("SKU-100001", 10.0, Decimal(5000))}}
    unknown = target.view("order", {"crm_customer_id": "1", "status_code": "ON_HOLD"})
    assert unknown["state"] == "(no Tryton state for ON_HOLD)"
    # An order cancelled before it reached Tryton has no sale there, as the CRM asks.
    assert target.view("order", {"crm_customer_id": "1", "status_code": "CANCELLED"})[
        "_absent_ok"] is True


def test_reconcile_accepts_an_absent_record_where_the_view_says_so() -> None:
    from service.operator.reconcile import EntityReport, _compare

    report = EntityReport("orders")
    _compare({"8": {"_absent_ok": True, "state": "cancelled"},
              "9": {"_absent_ok": False, "state": "confirmed"},
              "10": {"_absent_ok": True, "state": "cancelled"}},
             {"10": {"state": "confirmed", "deleted": False}}, report)
    assert report.missing == ["9"]
    assert report.differing == {"10": ["state"]}  # a cancel Tryton refused is drift
