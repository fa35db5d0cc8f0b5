"""The whole pipeline with the `tryton` target: demo CRM rows -> producer -> Kafka -> consumer
(CRM_ERP_SYNC_ERP_TARGET=tryton) -> a real Tryton server, read back over JSON-RPC; and
`reconcile` against Tryton: test_reconcile_tryton.py.
"""

from __future__ import annotations

from service.consumer import dlq
from service.erp.tryton import CANCEL_ACTION
from tests.helpers import read_topic
from tests.integration.erp.conftest import World, load_crm


def dead_letters(w: World) -> list[tuple[str, str]]:
    with w.env.erp() as conn:
        rows = conn.execute("SELECT convert_from(msg_key, 'UTF8'), error_message "
                            "FROM sync.dead_letters WHERE state = 'open' ORDER BY 1").fetchall()
    return [(r[0], r[1]) for r in rows]


def test_crm_rows_become_parties_and_processing_sales_and_a_rerun_changes_nothing(
        world: World) -> None:
    customers, orders = load_crm(world)
    world.produce()

    world.consume()

    parties = world.tryton.read_parties(customers)
    assert {k: (p.name, p.active) for k, p in parties.items()} == {
        customers[0]: ("张三", True), customers[1]: ("李四", True), customers[2]: ("王五", True)}
    zhang = parties[customers[0]]
    assert (zhang.phone, zhang.subdivision, zhang.city) == ("+8613812345678", "CN-BJ", "北京市")
    sales = world.tryton.read_sales(list(orders))
    paid, pending, shipped = (sales[k] for k in orders)
    assert (paid.state, paid.shipment_state, paid.party_code) == \
        ("processing", "waiting", f"CRM-{customers[0]}")
    assert sorted((m.sku, m.quantity) for m in paid.moves) == \
        [("SKU-100001", 10.0), ("SKU-100005", 2.0)]
    assert pending.state == "quotation" and pending.moves == ()
    assert shipped.state == "processing" and [m.sku for m in shipped.moves] == ["SKU-100007"]
    assert dead_letters(world) == []
    before = world.snapshot(customers, list(orders))

    # A re-run from the start of the topics (another group: a replay of every event): all
    # stale by the positions in the sync-state database; Tryton is not written.
    world.consume(consumer_group=world.settings.consumer_group + ".again")
    assert world.snapshot(customers, list(orders)) == before  # counts, values, write dates

    # A crash after Tryton committed but before the positions did, for every event: the
    # re-applied events find everything equal and write nothing.
    with world.env.erp() as conn:
        conn.execute("DELETE FROM tryton_positions")
    world.consume(consumer_group=world.settings.consumer_group + ".after-crash")
    assert world.snapshot(customers, list(orders)) == before
    assert dead_letters(world) == []


def test_cancel_after_confirmation_is_a_dead_letter_naming_the_tryton_action(
        world: World) -> None:
    customers, orders = load_crm(world)
    world.produce()
    world.consume()
    paid_key = next(k for k, s in orders.items() if s == "paid")
    pending_key = next(k for k, s in orders.items() if s == "pending")
    assert world.tryton.read_sales([paid_key])[paid_key].state == "processing"

    with world.env.crm() as crm:  # both cancelled in the CRM
        crm.execute("UPDATE crm.sales_orders SET status = '已取消' WHERE order_id = ANY(%s)",
                    ([int(paid_key), int(pending_key)],))
    world.produce()
    world.consume()

    # The quotation was the CRM's to cancel; the processing sale is Tryton's.
    sales = world.tryton.read_sales([paid_key, pending_key])
    assert (sales[paid_key].state, sales[pending_key].state) == ("processing", "cancelled")
    (key, message), = dead_letters(world)
    assert key == customers[0]  # sales events are keyed by their customer
    assert "Tryton sale is processing" in message and CANCEL_ACTION in message
    letters = read_topic(world.settings, world.settings.dlq_topic)
    assert len(letters) == 1
    headers = dlq.decode_headers(letters[0].headers)
    assert CANCEL_ACTION in headers[dlq.EXCEPTION_MESSAGE]

