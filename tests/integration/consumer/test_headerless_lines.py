"""A change to lines alone of an order the ERP no longer holds (newcomer9 F13: the order
deleted there by hand): the sql target must not write items of no order. The lines are held,
as the tryton target holds lines before their header; when no header comes within
ORPHAN_HOLD_S they become a dead letter naming the order and the way back (real broker and
databases)."""

from __future__ import annotations

from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running, caught_up

ORDER = 9601


def _erp_order(sync_env: SyncEnv) -> tuple[int, list[str]]:
    with sync_env.erp() as erp:
        headers = erp.execute("SELECT count(*) FROM erp.sales_orders WHERE crm_order_id = %s",
                              (str(ORDER),)).fetchone()[0]
        items = [r[0] for r in erp.execute(
            "SELECT crm_line_id FROM erp.sales_order_items WHERE crm_order_id = %s "
            "AND NOT deleted ORDER BY crm_line_id", (str(ORDER),)).fetchall()]
    return int(headers), items


def _letter(sync_env: SyncEnv) -> tuple[int, str] | None:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT dead_letter_id, error_message FROM sync.dead_letters "
                          "WHERE state = 'open'").fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def test_lines_of_an_order_deleted_from_the_erp_are_held_then_a_letter_not_orphans(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.with_(orphan_hold_s=4.0)
    running.start_producer(settings)
    running.start_consumer(settings)
    caught_up(sync_env)
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('张', '三', '13812345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (%s, 'X9601', %s, '2023-01-01', "
                        "'已发货', '元')", (ORDER, buyer))
            for line in (1, 2):
                crm.execute("INSERT INTO crm.order_lines VALUES (%s, %s, %s, 'P-PHONE-5G', "
                            "'手机', '10台', 5000)", (ORDER, line, buyer))
    wait_until(lambda: _erp_order(sync_env) == (1, ['["9601","1"]', '["9601","2"]']),
               timeout=90, message=f"order {ORDER} in the ERP")
    with sync_env.erp() as erp:  # an ERP admin's cleanup
        erp.execute("DELETE FROM erp.sales_order_items WHERE crm_order_id = %s", (str(ORDER),))
        erp.execute("DELETE FROM erp.order_stock_effects WHERE crm_order_id = %s",
                    (str(ORDER),))
        erp.execute("DELETE FROM erp.sales_orders WHERE crm_order_id = %s", (str(ORDER),))

    with sync_env.crm() as crm:
        crm.execute("UPDATE crm.order_lines SET unit_price = unit_price + 5 "
                    "WHERE order_id = %s AND line_no = 1", (ORDER,))
    wait_until(lambda: _letter(sync_env) is not None, timeout=90,
               message="the held lines dead-lettered after ORPHAN_HOLD_S")
    assert _erp_order(sync_env) == (0, [])  # never an item of no order
    letter = _letter(sync_env)
    assert letter is not None
    letter_id, message = letter
    assert f"the header of order {ORDER} is not in the ERP" in message, message
    assert "reconcile --repair --entity orders" in message, message

    # the way back the letter names: discard it, then re-read the order
    discarded = cli(settings, "dlq", "discard", str(letter_id), "--reason", "order deleted")
    assert discarded.code == 0, (discarded.out, discarded.err)
    repaired = cli(settings, "reconcile", "--repair", "--entity", "orders", "--wait", "60")
    assert repaired.code == 0, repaired.out
    wait_until(lambda: _erp_order(sync_env) == (1, ['["9601","1"]', '["9601","2"]']),
               timeout=90, message="the re-read order, header and both lines, in the ERP")
    assert cli(settings, "reconcile", "--entity", "orders").code == 0
