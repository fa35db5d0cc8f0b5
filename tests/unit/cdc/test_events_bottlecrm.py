"""service.cdc.events with the BottleCRM source profile: UUID keys, lines without the customer
on them, products by reference, a soft-delete flag (rows as pgoutput/typed_row give them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.events import (
    CREATE,
    DELETE,
    UPDATE,
    Outgoing,
    References,
    RowChange,
    build_events,
    canonical,
)
from service.cdc.profile import load_profile
from service.errors import SourceContractError, UnresolvedReference

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
LSN = 0x2A00F1C0
XID = 812
COMMIT = datetime(2026, 11, 29, 9, 30, 0, 250000, tzinfo=UTC)
BOTTLE = load_profile("bottlecrm")

ORG = "5f0c1a52-7d1e-4b7e-9c61-0a8d2f3e4b5c"
ACCOUNT = "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a"
ACCOUNT_2 = "c3d4e5f6-a7b8-4c9d-8e0f-112233445566"
ORDER = "7e57a11e-0d3c-4f25-8b8e-2c4b6d8f0a1c"
ORDER_2 = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f2a3b4c5d"
LINE_1 = "11111111-2222-4333-8444-555555555555"
LINE_2 = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
PHONE = "d1e2f3a4-b5c6-4d7e-8f90-a1b2c3d4e5f6"
LAPTOP = "f0e1d2c3-b4a5-4968-8776-655443322110"


def account(key: str = ACCOUNT, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": key, "org_id": ORG, "name": "北京星辰科技有限公司", "email": "info@xingchen.cn",
        "phone": "138 1234 5678", "website": None, "industry": "TECHNOLOGY",
        "address_line": "建国路88号", "city": "北京市", "state": "北京",
        "postcode": "100022", "country": "CN", "currency": "CNY", "is_active": True,
        "created_at": COMMIT, "updated_at": COMMIT,
    }
    row.update(overrides)
    return row


def order(key: str = ORDER, account_id: str = ACCOUNT, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": key, "org_id": ORG, "account_id": account_id, "name": "Q4 phones",
        "order_number": "ORD-2026-0001", "status": "ACTIVATED", "currency": "CNY",
        "subtotal": Decimal("50000.00"), "total_amount": Decimal("50000.00"),
        "order_date": date(2026, 11, 29),
    }
    row.update(overrides)
    return row


def item(key: str = LINE_1, order_id: str = ORDER, product_id: str | None = PHONE,
         **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": key, "org_id": ORG, "order_id": order_id, "product_id": product_id,
        "name": "手机", "description": None, "quantity": Decimal("10.00"),
        "unit_price": Decimal("5000.00"), "total": Decimal("50000.00"), "sort_order": 0,
    }
    row.update(overrides)
    return row


def product(key: str = PHONE, sku: str = "P-PHONE-5G", name: str = "5G手机"
            ) -> dict[str, Any]:
    return {"id": key, "org_id": ORG, "name": name, "sku": sku, "price": Decimal("5000.00"),
            "currency": "CNY", "category": "手机", "is_active": True}


class Crm:
    """The producer's reference loader: the CRM's current orders and products by key
    (as text), as canonical records; records every lookup."""

    def __init__(self, orders: Sequence[dict[str, Any]] = (),
                 products: Sequence[dict[str, Any]] = ()) -> None:
        self.rows = {("order", o["id"]): o for o in orders}
        self.rows.update({("product", p["id"]): p for p in products})
        self.asked: list[tuple[str, str]] = []

    def __call__(self, entity: str, key: str) -> dict[str, Any] | None:
        self.asked.append((entity, key))
        row = self.rows.get((entity, key))
        return None if row is None else canonical(BOTTLE.entities[entity], row, References())


def build(changes: list[RowChange], refs: References | None = None, **kw: Any
          ) -> list[Outgoing]:
    return build_events(changes, profile=BOTTLE, refs=References() if refs is None else refs,
                        lsn=LSN, xid=XID, commit_time=COMMIT, **kw)


def new_customer_with_an_order() -> list[RowChange]:
    return [
        RowChange("public.accounts", CREATE, None, account()),                # seq 0
        RowChange("public.product", CREATE, None, product()),                 # seq 1
        RowChange("public.orders", CREATE, None, order()),                    # seq 2
        RowChange("public.order_line_item", CREATE, None, item()),            # seq 3
        RowChange("public.order_line_item", CREATE, None,
                  item(LINE_2, quantity=Decimal("2.5"), unit_price=Decimal("0.10"))),  # seq 4
    ]


def test_uuid_keys_end_to_end() -> None:
    events = build(new_customer_with_an_order())
    # The product is reference data: it feeds the lines, it is not published.
    assert [(e.kind, e.record["op"]) for e in events] == [("customer", CREATE),
                                                          ("order", CREATE)]
    customer, sale = events
    # The Kafka key is the account's UUID text, for the customer and for its order.
    assert customer.key == sale.key == ACCOUNT.encode()
    assert customer.record["key"] == ACCOUNT
    assert (sale.record["key"], sale.record["customer_key"]) == (ORDER, ACCOUNT)
    assert [e.event_id for e in events] == [f"{LSN:X}/0", f"{LSN:X}/2"]
    assert customer.record["source"]["table"] == "public.accounts"
    assert sale.record["source"]["profile"] == "bottlecrm"
    assert customer.record["after"] == {
        "key": ACCOUNT, "full_name": "北京星辰科技有限公司", "family_name": None,
        "given_name": None, "middle_name": None, "name_order": None, "gender": None,
        "birth_date": None, "phone": "138 1234 5678", "email": "info@xingchen.cn",
        "address": None, "street": "建国路88号", "city": "北京市", "region": "北京",
        "postcode": "100022", "country": "CN", "currency": "CNY", "purchase_frequency": None,
        "purchase_amount": None, "product_preference": None, "notes": None,
    }
    assert sale.record["after"] == {
        "key": ORDER, "customer_key": ACCOUNT, "order_no": "ORD-2026-0001",
        "order_date": date(2026, 11, 29), "status": "ACTIVATED", "currency": "CNY",
        "total_amount": "50000.00",
    }
    assert sale.record["lines"] == [
        {"op": CREATE, "before": None, "after": {
            "key": LINE_1, "order_key": ORDER, "product_code": "P-PHONE-5G",
            "product_name": "手机", "quantity": "10.00", "unit": "个", "unit_price": "5000.00"}},
        {"op": CREATE, "before": None, "after": {
            "key": LINE_2, "order_key": ORDER, "product_code": "P-PHONE-5G",
            "product_name": "手机", "quantity": "2.5", "unit": "个", "unit_price": "0.10"}},
    ]


def test_every_event_encodes_and_decodes_back_equal() -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    crm = Crm(orders=[order(ORDER_2, ACCOUNT_2)], products=[product(LAPTOP, "P-LAPTOP")])
    changes = [
        *new_customer_with_an_order(),
        RowChange("public.order_line_item", UPDATE, item(order_id=ORDER_2, product_id=LAPTOP),
                  item(order_id=ORDER_2, product_id=LAPTOP, quantity=Decimal("3"))),
        RowChange("public.accounts", UPDATE, account(ACCOUNT_2),
                  account(ACCOUNT_2, is_active=False)),
        RowChange("public.order_line_item", DELETE, item(LINE_2, product_id=None), None),
    ]
    events = build(changes, References(crm))
    assert [(e.kind, e.record["op"]) for e in events] == [
        ("customer", CREATE), ("order", CREATE), ("order", UPDATE), ("customer", DELETE)]
    for event in events:
        kind, decoded = registry.decode(registry.encode(event.kind, event.record))
        assert kind == event.kind
        assert decoded == event.record


def test_line_only_transaction_is_partitioned_through_its_order() -> None:
    crm = Crm(orders=[order(ORDER_2, ACCOUNT_2)], products=[product()])
    changes = [RowChange("public.order_line_item", UPDATE, item(order_id=ORDER_2),
                         item(order_id=ORDER_2, quantity=Decimal("12")))]
    (event,) = build(changes, References(crm))
    assert event.kind == "order"
    assert event.key == ACCOUNT_2.encode()
    assert (event.record["key"], event.record["customer_key"]) == (ORDER_2, ACCOUNT_2)
    assert event.record["op"] == UPDATE
    assert event.record["before"] is None and event.record["after"] is None
    assert event.record["source"]["table"] == "public.order_line_item"
    assert [ln["after"]["quantity"] for ln in event.record["lines"]] == ["12"]
    assert ("order", ORDER_2) in crm.asked


def test_line_only_transaction_of_an_unknown_order_is_refused() -> None:
    crm = Crm(products=[product()])
    with pytest.raises(UnresolvedReference) as info:
        build([RowChange("public.order_line_item", CREATE, None, item(order_id=ORDER_2))],
              References(crm))
    assert (info.value.table, info.value.column, info.value.entity) == (
        "public.order_line_item", "order_id", "order")
    assert ORDER_2 not in str(info.value)  # identity of the mapping, never row values
    assert ("order", ORDER_2) in crm.asked


def test_a_line_preceding_its_header_in_one_transaction() -> None:
    crm = Crm(products=[product()])  # the order is not in the CRM yet: no lookup may be needed
    changes = [
        RowChange("public.order_line_item", CREATE, None, item()),  # seq 0
        RowChange("public.orders", CREATE, None, order()),          # seq 1
    ]
    (event,) = build(changes, References(crm))
    assert event.key == ACCOUNT.encode()
    assert event.event_id == f"{LSN:X}/0"  # the order takes the position of its first change
    assert event.record["op"] == CREATE
    assert event.record["after"]["key"] == ORDER
    assert [ln["after"]["key"] for ln in event.record["lines"]] == [LINE_1]
    assert ("order", ORDER) not in crm.asked


def test_product_reference_resolves_to_the_sku_in_the_same_transaction() -> None:
    crm = Crm(orders=[order()])
    changes = [
        RowChange("public.order_line_item", CREATE, None, item(product_id=LAPTOP)),
        RowChange("public.product", CREATE, None, product(LAPTOP, "P-LAPTOP", "笔记本电脑")),
    ]
    (event,) = build(changes, References(crm))
    assert event.record["lines"][0]["after"]["product_code"] == "P-LAPTOP"
    assert ("product", LAPTOP) not in crm.asked


def test_product_reference_resolves_to_the_sku_through_the_lookup() -> None:
    crm = Crm(orders=[order()], products=[product(LAPTOP, "P-LAPTOP")])
    refs = References(crm)
    changes = [RowChange("public.order_line_item", CREATE, None, item(product_id=LAPTOP))]
    (event,) = build(changes, refs)
    assert event.record["lines"][0]["after"]["product_code"] == "P-LAPTOP"
    assert crm.asked.count(("product", LAPTOP)) == 1
    # Remembered: the next line of that product does not read the CRM again.
    build([RowChange("public.order_line_item", CREATE, None, item(LINE_2, product_id=LAPTOP))],
          refs)
    assert crm.asked.count(("product", LAPTOP)) == 1


def test_a_product_change_updates_what_later_lines_resolve_to() -> None:
    refs = References(Crm(orders=[order()]))
    build([RowChange("public.product", CREATE, None, product(sku="OLD-SKU"))], refs)
    build([RowChange("public.product", UPDATE, product(sku="OLD-SKU"),
                     product(sku="P-PHONE-5G"))], refs)
    (event,) = build([RowChange("public.order_line_item", CREATE, None, item())], refs)
    assert event.record["lines"][0]["after"]["product_code"] == "P-PHONE-5G"


def test_a_line_without_a_product_has_no_product_code() -> None:
    crm = Crm(orders=[order()])
    (event,) = build([RowChange("public.order_line_item", CREATE, None,
                                item(product_id=None))], References(crm))
    assert event.record["lines"][0]["after"]["product_code"] is None
    assert crm.asked == [("order", ORDER)]


def test_an_unknown_product_is_refused() -> None:
    with pytest.raises(UnresolvedReference) as info:
        build([RowChange("public.order_line_item", CREATE, None, item(product_id=LAPTOP))],
              References(Crm(orders=[order()])))
    assert (info.value.table, info.value.column, info.value.entity) == (
        "public.order_line_item", "product_id", "product")


def test_deactivated_account_is_a_delete_with_its_before() -> None:
    (event,) = build([RowChange("public.accounts", UPDATE, account(),
                                account(is_active=False))])
    assert event.kind == "customer"
    assert event.record["op"] == DELETE
    assert event.key == ACCOUNT.encode() and event.record["key"] == ACCOUNT
    assert event.record["after"] is None
    assert event.record["before"] is not None
    assert event.record["before"]["full_name"] == "北京星辰科技有限公司"
    assert event.record["before"]["key"] == ACCOUNT


def test_an_account_created_inactive_is_a_delete() -> None:
    (event,) = build([RowChange("public.accounts", CREATE, None, account(is_active=False))])
    assert event.record["op"] == DELETE
    assert event.record["after"] is None and event.record["before"]["key"] == ACCOUNT


def test_a_reactivated_account_is_an_update() -> None:
    (event,) = build([RowChange("public.accounts", UPDATE, account(is_active=False),
                                account())])
    assert event.record["op"] == UPDATE
    assert event.record["after"]["key"] == ACCOUNT


def test_real_delete_of_an_account() -> None:
    (event,) = build([RowChange("public.accounts", DELETE, account(), None)])
    assert (event.record["op"], event.key) == (DELETE, ACCOUNT.encode())


@pytest.mark.parametrize(("table", "row", "column"), [
    ("public.accounts", account(), "email"),
    ("public.accounts", account(), "id"),
    ("public.orders", order(), "account_id"),
    ("public.orders", order(), "order_date"),
    ("public.order_line_item", item(), "order_id"),
    ("public.order_line_item", item(), "unit_price"),
])
def test_a_mapped_column_missing_from_the_row_is_a_source_contract_error(
        table: str, row: dict[str, Any], column: str) -> None:
    del row[column]
    refs = References(Crm(orders=[order()], products=[product()]))
    with pytest.raises(SourceContractError) as info:
        build([RowChange(table, CREATE, None, row)], refs)
    assert (info.value.table, info.value.column) == (table, column)
    message = str(info.value)
    assert table in message and column in message
    # No personal data in an error that may reach a log line: no value of the row.
    for value in row.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in message, value
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_column_of_the_wrong_type_is_a_source_contract_error() -> None:
    with pytest.raises(SourceContractError) as info:
        build([RowChange("public.orders", CREATE, None, order(order_date="2026-11-29"))],
              References())
    assert (info.value.table, info.value.column) == ("public.orders", "order_date")
    assert "2026-11-29" not in str(info.value)


def test_a_line_deleted_with_its_product_in_one_transaction() -> None:
    crm = Crm(orders=[order()])  # the product row is gone from the CRM by the time we read
    changes = [RowChange("public.order_line_item", DELETE, item(), None),
               RowChange("public.product", DELETE, product(), None)]
    (event,) = build(changes, References(crm))
    (deleted,) = event.record["lines"]
    assert deleted["op"] == DELETE and deleted["after"] is None
    assert deleted["before"]["product_code"] == "P-PHONE-5G"


def test_a_row_without_the_delete_flag_column_is_a_source_contract_error() -> None:
    row = account()
    del row["is_active"]
    with pytest.raises(SourceContractError) as info:
        build([RowChange("public.accounts", UPDATE, dict(row), dict(row))])
    assert (info.value.table, info.value.column) == ("public.accounts", "is_active")
