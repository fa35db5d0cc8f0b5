"""The pure decisions of the tryton target: what to write for a party, which lines changed."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.erp.changes import OrderItemRow, PartnerRow, Position
from service.erp.tryton import PositionStore, TrytonTarget, _Order
from service.erp.tryton_rpc import TrytonRPC

POS = Position(100, 0, "64/0", datetime(2026, 11, 29, tzinfo=UTC))
ROW = PartnerRow("42", False, "张三", "M", None, None, "+8613800005678", "z@example.cn", "北京市",
                 "北京市", "朝阳区", "建国路88号", None, None, None, None, None, POS)


def target() -> TrytonTarget:
    t = TrytonTarget(TrytonRPC("http://127.0.0.1:9", "db", "u", "p"), PositionStore("unused"))
    t._country_cn, t._subdivisions, t._uoms = 7, {"北京市": 3}, {"u": 1}
    t._currencies = {"CNY": 2}
    return t


def party(**changes: Any) -> dict[str, Any]:
    p = {"id": 9, "name": "张三", "active": True,
         "address": {"id": 11, "street_unstructured": "朝阳区 建国路88号", "city": "北京市",
                     "subdivision": 3, "country": 7},
         "phone": {"id": 21, "value": "+8613800005678"},
         "email": {"id": 22, "value": "z@example.cn"}}
    p.update(changes)
    return p


def test_a_party_equal_to_the_crm_row_is_not_written() -> None:
    assert target()._party_changes(party(), ROW) == {}


def test_only_what_differs_is_written() -> None:
    changes = target()._party_changes(
        party(active=False), replace(ROW, phone_e164=None, city="北京", email="n@example.cn"))
    assert changes == {
        "active": True,
        "addresses": [["write", [11], {"city": "北京"}]],
        "contact_mechanisms": [["delete", [21]], ["write", [22], {"value": "n@example.cn"}]],
    }


def test_line_changes_are_keyed_by_line_number_and_only_real_differences_count() -> None:
    item = OrderItemRow("5", '["5","1"]', "SKU-1", "手机", Decimal(10), "UNIT",
                        Decimal("5000.00"), False, POS)
    gone = replace(item, crm_line_id='["5","2"]', deleted=True)
    sale = {"lines": {1: {"id": 31, "product": 4, "quantity": 10.0, "unit": 1,
                          "unit_price": Decimal("5000")},
                      2: {"id": 32, "product": 4, "quantity": 1.0, "unit": 1,
                          "unit_price": Decimal("1")}}}
    products = {"SKU-1": {"id": 4, "code": "SKU-1"}}
    t = target()

    ops, bad = t._line_ops(_Order("5", items={1: item, 2: gone}), sale, products)
    assert (ops, bad) == ([("delete", [32])], "")

    ops, bad = t._line_ops(_Order("5", items={1: replace(item, quantity=Decimal(12))}), sale,
                           products)
    assert ops == [("write", [31], {"quantity": 12.0})]

    ops, bad = t._line_ops(_Order("5", items={1: replace(item, sku="SKU-X")}), sale, products)
    assert ops == [] and "no product with code SKU-X" in bad


def plan(state: str | None, status: str = "PAID", *, deleted: bool = False,
         items: dict[int, OrderItemRow] | None = None, currency: str = "CNY",
         currencies: dict[str, int] | None = None) -> Any:
    from service.erp.changes import OrderHeaderRow

    t = target()
    t._shop = {"id": 1}
    if currencies is not None:
        t._currencies = currencies
    header = OrderHeaderRow("5", "SO-5", "42", POS.commit_time.date(), status, currency, deleted,
                            POS)
    sale = None if state is None else {"id": 8, "state": state, "party": 9, "currency": 2,
                                       "currency.": {"code": "CNY"},
                                       "reference": "SO-5", "sale_date": header.order_date,
                                       "lines": {}}
    parties = {"CRM-42": {"id": 9, "address": {"id": 11}}}
    return t._plan_order(_Order("5", header=header, items=items or {}, pos=POS), sale,
                         parties, {"SKU-1": {"id": 4}})


def test_order_plans_follow_the_ownership_rules() -> None:
    from service.erp.tryton import Outcome, Status, _Plan

    assert plan("quotation").target == "confirmed"
    assert plan("processing") == _Plan("processing")  # re-applied PAID: nothing to do
    assert plan("quotation", "CANCELLED") == _Plan("cancelled")
    cancelled = plan(None, deleted=True)
    assert isinstance(cancelled, Outcome) and cancelled.status is Status.APPLIED

    for state, status, words in (("processing", "CANCELLED", "Handle Shipment Exception"),
                                 ("processing", "PENDING_PAYMENT", "moved back"),
                                 ("quotation", "REFUNDED", "no Tryton sale state")):
        refused = plan(state, status)
        assert isinstance(refused, Outcome) and refused.status is Status.REFUSED
        assert refused.reason is not None and words in refused.reason

    item = OrderItemRow("5", '["5","1"]', "SKU-1", "手机", Decimal(1), "UNIT", Decimal(1), False,
                        POS)
    edited = plan("quotation", items={1: item})
    assert edited.draft_first and edited.target == "confirmed"
    assert edited.write == {"lines": [["create", [
        {"type": "line", "sequence": 1, "product": 4, "quantity": 1.0, "unit": 1,
         "unit_price": Decimal(1), "description": "手机"}]]]}


def test_a_paid_order_without_lines_stays_a_draft_until_its_lines_arrive() -> None:
    # Tryton refuses to quote a sale without lines: a header whose lines were refused (or
    # come later) is created as a draft; the event that brings lines moves it forward.
    new = plan(None)
    assert new.target == "draft" and new.create is not None
    assert plan("draft").target == "draft"
    item = OrderItemRow("5", '["5","1"]', "SKU-1", "手机", Decimal(1), "UNIT", Decimal(1), False,
                        POS)
    assert plan("draft", items={1: item}).target == "confirmed"
    assert plan(None, items={1: item}).target == "confirmed"


def test_the_sale_takes_the_orders_currency_never_the_shops_by_default() -> None:
    from service.erp.tryton import Outcome, Status, _Plan

    both = {"CNY": 2, "USD": 3}
    assert plan(None, currency="USD", currencies=both).create["currency"] == 3
    assert plan(None).create["currency"] == 2
    assert plan("processing") == _Plan("processing")  # same currency: nothing to write

    missing = plan(None, currency="USD")
    assert isinstance(missing, Outcome) and missing.status is Status.REFUSED
    assert missing.reason is not None
    assert missing.reason.startswith("currency USD is not in Tryton: ")
    assert "Currency > Currencies" in missing.reason
    assert isinstance(plan("quotation", currency="USD"), Outcome)  # an existing sale too

    # A currency change: written while the CRM owns the sale, else refused with the action.
    changed = plan("quotation", "PENDING_PAYMENT", currency="USD", currencies=both)
    assert changed == _Plan("quotation", write={"currency": 3}, draft_first=True)
    assert plan("draft", "PENDING_PAYMENT", currency="USD", currencies=both).write == \
        {"currency": 3}
    refused = plan("processing", currency="USD", currencies=both)
    assert isinstance(refused, Outcome) and refused.status is Status.REFUSED
    assert refused.reason is not None
    assert refused.reason.startswith(
        "currency changed to USD in the CRM but the Tryton sale is processing in CNY: ")
    assert "correct the order's currency in the CRM" in refused.reason

    # A cancellation carries no currency to check.
    gone = plan("quotation", "CANCELLED", deleted=True, currency="")
    assert gone == _Plan("cancelled")
