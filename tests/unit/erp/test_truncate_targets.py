"""A truncate change at the targets: the tryton target refuses it with a reason (a dead
letter naming what to do), except for market demand, which it does not keep at all."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from service.erp.changes import ErpChange, Position, TruncateRow
from service.erp.target import Status
from service.erp.tryton_target import TrytonErpTarget


def _truncate(entity: str, table: str) -> ErpChange:
    pos = Position(0x10, 2, "10/2", datetime(2026, 11, 29, tzinfo=UTC))
    return ErpChange("truncate", None, truncate=TruncateRow(entity, table, pos))


def test_tryton_refuses_a_truncate_of_customers_orders_and_lines_with_a_reason() -> None:
    target = TrytonErpTarget(cast(Any, None))  # a truncate never reaches Tryton itself
    outcomes = target.apply([_truncate("customer", "crm.customers"),
                             _truncate("order", "crm.sales_orders"),
                             _truncate("order_line", "crm.order_lines"),
                             _truncate("market_demand", "crm.market_demand")])
    assert [(o.key, o.status) for o in outcomes] == [
        ("crm.customers", Status.REFUSED), ("crm.sales_orders", Status.REFUSED),
        ("crm.order_lines", Status.REFUSED), ("", Status.APPLIED)]
    assert "does not apply a CRM TRUNCATE" in (outcomes[0].reason or "")
    assert "reconcile --repair" in (outcomes[0].reason or "")
