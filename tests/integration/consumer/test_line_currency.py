"""A change to an order's lines alone (a lines-only event: no header) is checked against the
order's currency as the ERP holds it (finding N12), on the real broker and databases: a line
priced in dollars under a yuan order is a dead letter naming ``lines.unit_price``, the line
and both currencies; a price in the order's currency, or in the one its header changed to
just before, is applied."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up
from tests.integration.consumer.test_money_text import sync_once, yuan_order


def _order(crm: Any, order_id: int, price: str) -> None:
    """An order of its own customer (a letter holds its customer's key: orders apart)."""
    customer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                           "VALUES ('张', '三', '13812345678') RETURNING customer_id"
                           ).fetchone()[0]
    yuan_order(crm, order_id, customer, price)


def _price(erp: Any, order_id: int) -> Decimal:
    row = erp.execute("SELECT unit_price FROM erp.sales_order_items WHERE crm_order_id = %s "
                      "AND NOT deleted", (str(order_id),)).fetchone()
    return Decimal(row[0])


def test_a_lines_only_price_in_another_currency_than_the_erps_order_is_a_letter(
        sync_env: SyncEnv) -> None:
    with sync_env.crm() as crm:  # the CRM keeps unit prices as text (5000元)
        crm.execute("ALTER TABLE crm.order_lines ALTER COLUMN unit_price TYPE text")
        for order_id in (781, 782, 783):
            _order(crm, order_id, "5000元")
    sync_once(sync_env.settings)

    with sync_env.crm() as crm:  # each statement its own transaction: lines-only events
        crm.execute("UPDATE crm.order_lines SET unit_price = '100美元' WHERE order_id = 781")
        crm.execute("UPDATE crm.order_lines SET unit_price = '¥6,000.00' WHERE order_id = 782")
        crm.execute("UPDATE crm.sales_orders SET currency = '美元' WHERE order_id = 783")
        crm.execute("UPDATE crm.order_lines SET unit_price = 'USD 120' WHERE order_id = 783")
    sync_once(sync_env.settings)

    with sync_env.erp() as erp:
        letters = erp.execute(
            "SELECT stage, error_class, error_message FROM sync.dead_letters "
            "ORDER BY dead_letter_id").fetchall()
        prices = {n: _price(erp, n) for n in (781, 782, 783)}
        currency = erp.execute("SELECT currency FROM erp.sales_orders "
                               "WHERE crm_order_id = '783'").fetchone()[0]
    assert letters == [(
        "transform", "MappingError",
        'lines.unit_price: line ["781","1"]: currency written with the amount (USD) differs '
        "from the order's currency in the ERP (CNY)")]
    assert prices == {781: Decimal("5000.00"),  # the letter's line is not applied
                      782: Decimal("6000.00"), 783: Decimal("120.00")}
    assert currency == "USD"

    # 782 becomes a dollar order, lines and all; then every event again from the start (a new
    # group: a replay), one event per batch (no header before a line in its batch). The yuan
    # price of 782 is older than its dollar header in the ERP: not compared with it, so no
    # new letter; the old letter is not written twice.
    with sync_env.crm() as crm:
        crm.execute("UPDATE crm.sales_orders SET currency = '美元' WHERE order_id = 782")
        crm.execute("UPDATE crm.order_lines SET unit_price = 'USD 60' WHERE order_id = 782")
    sync_once(sync_env.settings)
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)
    consume_until_caught_up(ErpConsumer(dataclasses.replace(
        sync_env.settings, consumer_group=sync_env.settings.consumer_group + ".replay",
        batch_max_events=1)))
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM sync.dead_letters").fetchone()[0] == 1
        assert _price(erp, 782) == Decimal("60.00")
