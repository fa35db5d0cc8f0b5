"""A lines-only order event against its sale's currency in a real Tryton server (finding
N12): ``TrytonErpTarget.order_currencies`` reads ``currency.code`` of the CRM web shop's
sales in one call, and a line priced in dollars under a yuan sale is a dead letter naming
``lines.unit_price``, the line and both currencies; the sale's line keeps its price."""

from __future__ import annotations

from decimal import Decimal

from service.erp.tryton_target import TrytonErpTarget
from tests.integration.erp.conftest import World, load_crm


def test_a_lines_only_dollar_price_under_a_yuan_sale_is_a_letter(world: World) -> None:
    with world.env.crm() as crm:  # the CRM keeps unit prices as text (100美元)
        crm.execute("ALTER TABLE crm.order_lines ALTER COLUMN unit_price TYPE text")
    _, orders = load_crm(world)
    world.produce()
    world.consume()
    target = TrytonErpTarget(world.tryton)
    missing = str(world.base + 99)
    stored = target.order_currencies([*orders, missing])
    assert {k: c.code for k, c in stored.items()} == dict.fromkeys(orders, "CNY")
    positions = world.tryton.positions.get("order", list(orders))
    assert {k: c.position for k, c in stored.items()} == positions

    pending = next(k for k, s in orders.items() if s == "pending")  # a quotation: editable
    with world.env.crm() as crm:
        crm.execute("UPDATE crm.order_lines SET unit_price = '100美元' WHERE order_id = %s",
                    (int(pending),))
    world.produce()
    world.consume()

    with world.env.erp() as conn:
        letters = conn.execute("SELECT stage, error_class, error_message "
                               "FROM sync.dead_letters").fetchall()
    assert letters == [(
        "transform", "MappingError",
        f'lines.unit_price: line ["{pending}","1"]: currency written with the amount (USD) '
        "differs from the order's currency in the ERP (CNY)")]
    (line,) = world.tryton.read_sales([pending])[pending].lines
    assert Decimal(str(line[3])) == Decimal("8000.00")
