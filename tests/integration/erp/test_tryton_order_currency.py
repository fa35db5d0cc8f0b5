"""An order's currency against a real Tryton server: the sale is made in the Tryton currency
whose code is the order's ISO currency, never in the web shop's (CNY) by default. An order in
a currency Tryton does not have is a dead letter naming the currency and the fix; once the
currency is created in Tryton, the redriven letter becomes a sale in that currency. A CRM
currency change reaches a quotation and is a letter for a sale past it.

The module has its own Tryton database (``tryton_server`` is per module): the dollar created
here is seen by no other module."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from service import pg
from service.erp.changes import OrderHeaderRow, Position
from service.erp.tryton import Status
from service.erp.tryton_rpc import TrytonRPC
from service.operator.dlq import get_letters, redrive
from service.operator.reconcile import reconcile
from tests.integration.erp.conftest import World, load_crm

ADMIN_PASS = Path(__file__).resolve().parents[3] / ".stack" / "tryton" / "admin.pass"


def sale_currency(w: World, key: str) -> str:
    return w.tryton.sale_currencies([key]).get(key, "")


def letters(w: World) -> list[tuple[Any, ...]]:
    with w.env.erp() as conn:
        return conn.execute("SELECT dead_letter_id, error_class, error_message "
                            "FROM sync.dead_letters WHERE state IN ('open', 'failed_again') "
                            "ORDER BY dead_letter_id").fetchall()


def create_dollar(w: World) -> None:
    """As a Tryton administrator would (Currency > Currencies): the sync's user may not."""
    admin = TrytonRPC(w.settings.tryton_url, w.settings.tryton_database, "admin",
                      ADMIN_PASS.read_text().strip())
    try:
        admin.execute("currency.currency", "create", [{
            "name": "U.S. Dollar", "code": "USD", "numeric_code": "840", "symbol": "$",
            "rounding": "0.01", "digits": 2}])
    finally:
        admin.close()


def test_an_order_becomes_a_sale_in_its_own_currency_or_a_letter_naming_it(
        world: World) -> None:
    customers, orders = load_crm(world)
    paid = next(k for k, s in orders.items() if s == "paid")
    pending = next(k for k, s in orders.items() if s == "pending")
    shipped = next(k for k, s in orders.items() if s == "shipped")
    with world.env.crm() as crm:  # the paid order is in dollars; the others in 元
        crm.execute("UPDATE crm.sales_orders SET currency = '美元' WHERE order_id = %s",
                    (int(paid),))
    world.produce()
    world.consume()

    # No USD in Tryton: a letter naming USD and the fix; nothing made in yuan.
    [(letter_id, error_class, message)] = letters(world)
    assert error_class == "ApplyError"
    assert message.startswith("currency USD is not in Tryton: create the currency in Tryton "
                              "(Currency > Currencies"), message
    assert world.tryton.read_sales([paid]) == {}
    assert {k: sale_currency(world, k) for k in (pending, shipped)} == \
        {pending: "CNY", shipped: "CNY"}

    # The target that refused finds the dollar created since (no restart), and so does the
    # redriven letter: a USD sale, its lines' prices as the CRM wrote them.
    probe = OrderHeaderRow(str(world.base + 99), "SO-probe", customers[0], date(2026, 11, 29),
                           "PENDING_PAYMENT", "USD", False,
                           Position(1, 0, "1/0", datetime(2026, 11, 29, tzinfo=UTC)))
    outcome, = world.tryton.apply_orders([probe], [])
    assert outcome.status is Status.REFUSED
    create_dollar(world)
    outcome, = world.tryton.apply_orders([replace(probe, pos=replace(probe.pos, lsn=2))], [])
    assert outcome.status is Status.APPLIED, outcome.reason
    assert sale_currency(world, probe.crm_order_id) == "USD"

    with pg.connect(world.settings.erp_dsn, "erp") as erp:
        todo = list(get_letters(erp, [letter_id]).values())
    report = redrive(world.settings, todo, actor="test")
    assert [o.outcome for o in report.outcomes] == ["redriven"], report
    assert letters(world) == []
    sale = world.tryton.read_sales([paid])[paid]
    assert (sale.state, sale_currency(world, paid)) == ("processing", "USD")
    assert [line[3] for line in sale.lines] == [5000, 300]

    # A currency change: a quotation takes it; a sale past quotation is a letter.
    with world.env.crm() as crm:
        crm.execute("UPDATE crm.sales_orders SET currency = '美元' WHERE order_id = ANY(%s)",
                    ([int(pending), int(shipped)],))
    world.produce()
    world.consume()
    assert world.tryton.read_sales([pending])[pending].state == "quotation"
    assert sale_currency(world, pending) == "USD"
    [(_, error_class, message)] = letters(world)
    assert message.startswith("currency changed to USD in the CRM but the Tryton sale is "
                              "processing in CNY: "), message
    assert sale_currency(world, shipped) == "CNY"

    # reconcile compares the sale's currency: a quotation put back in CNY by hand is found
    # (the processing sale's key is held by its letter, not compared).
    sale_id = world.tryton.read_sales([pending])[pending].id
    cny = world.rpc.execute("currency.currency", "search", [("code", "=", "CNY")])
    world.rpc.execute("sale.sale", "draft", [sale_id])
    world.rpc.execute("sale.sale", "write", [sale_id], {"currency": cny[0]})
    world.rpc.execute("sale.sale", "quote", [sale_id])
    report, = reconcile(world.settings, ["orders"]).entities
    assert report.differing == {pending: ["currency"]}
    assert report.missing == [] and report.extra == [probe.crm_order_id]
