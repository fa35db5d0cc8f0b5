"""Operator commands with the `tryton` target read what Tryton and ``tryton_positions`` hold,
through the ERP target (``ErpTarget.key_records``, ``last_applied``, ``stock_unavailable``),
not the sync-state database's empty ``erp.*`` tables. One Tryton server for the module."""

from __future__ import annotations

from tests.integration.conftest import Cli
from tests.integration.erp.conftest import World, load_crm


def test_trace_status_and_stock_recount_read_through_the_tryton_target(world: World,
                                                                       cli: Cli) -> None:
    customers, orders = load_crm(world)
    world.produce()
    world.consume()
    buyer = customers[0]
    paid = next(k for k, v in orders.items() if v == "paid")
    sale = world.tryton.read_sales([paid])[paid]

    # trace ORDER: the sale, with the position the consumer stored for it
    t = cli(world.settings, "trace", paid, "--json")
    assert t.code == 0, t.err
    [row] = [r for r in t.json["erp"] if r["as"] == "order"]
    assert row["table"] == "sale.sale"
    assert (row["row"]["id"], row["row"]["state"]) == (sale.id, sale.state)
    assert row["row"]["source_lsn"] is not None and row["row"]["applied_at"] is not None
    # trace CUSTOMER: the party and its sale
    t = cli(world.settings, "trace", buyer)
    assert t.code == 0, t.err
    assert "party.party (customer) id " in t.out and f"code CRM-{buyer}" in t.out
    assert f"sale.sale (order of the customer) id {sale.id}" in t.out
    assert "no record with this key" not in t.out

    # status: last applied from tryton_positions
    s = cli(world.settings, "status", "--json")
    last = s.json["last_applied"]
    assert last["applied_at"] is not None and last["crm_commit_time"] is not None, last
    assert last["seconds_since_last_apply"] is not None

    # stock recount: Tryton keeps stock, said so (exit 2), nothing counted
    r = cli(world.settings, "stock", "recount", "--check")
    assert r.code == 2, (r.out, r.err)
    assert "not available with the tryton target: Tryton keeps stock itself" in r.err
    assert "drifting" not in r.out
