"""Stock in each SKU's base unit, kept incrementally, through the real producer, broker,
consumer and ERP; the full recount beside it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.erp.mappings import Mappings
from service.errors import ConfigError
from service.kafka_io import make_producer
from service.operator.stock import recount
from tests.conftest import SyncEnv
from tests.helpers import read_topic

D = Decimal


def produce(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def consume(sync_env: SyncEnv) -> ErpConsumer:
    consumer = ErpConsumer(sync_env.settings)
    consumer.run(until_idle_s=3)
    return consumer


def order(crm: Any, order_id: int, status: str, lines: list[tuple[str, str]]) -> None:
    """A customer of its own and one order with these (product code, quantity) lines."""
    with crm.transaction():
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES "
                          "('张', '三') RETURNING customer_id").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, "
                    "status) VALUES (%s, %s, %s, '2024-05-01', %s)",
                    (order_id, f"SO{order_id}", cid, status))
        for n, (code, qty) in enumerate(lines, 1):
            crm.execute("INSERT INTO crm.order_lines VALUES (%s, %s, %s, %s, '商品', %s, 10)",
                        (order_id, n, cid, code, qty))


def stock(sync_env: SyncEnv) -> dict[str, tuple[Decimal, Decimal, str]]:
    with sync_env.erp() as erp:
        return {sku: (reserved, issued, unit) for sku, reserved, issued, unit in erp.execute(
            "SELECT sku, reserved, issued, base_unit FROM erp.stock ORDER BY sku")}


def recounted(sync_env: SyncEnv, *, repair: bool, mappings: Mappings | None = None) -> Any:
    with sync_env.erp() as erp:
        erp.autocommit = True
        return recount(erp, mappings or Mappings.load(sync_env.settings.mappings_file),
                       repair=repair)


@pytest.fixture
def ordered(sync_env: SyncEnv) -> SyncEnv:
    """Chargers (base PCE, 1 箱 = 12) in 箱 and 个, and in kg (not convertible); solder (base
    KGM) in 吨 and 克 (pint), and in 箱 (not convertible)."""
    produce(sync_env)
    with sync_env.crm() as crm:
        order(crm, 101, "已发货", [("P-CHARGER", "2箱"), ("P-CHARGER", "5个")])
        order(crm, 102, "已发货", [("P-CHARGER", "3kg")])
        order(crm, 103, "已付款", [("P-SOLDER", "0.5吨"), ("P-SOLDER", "250克")])
        order(crm, 104, "已付款", [("P-SOLDER", "1箱")])
    produce(sync_env)
    consume(sync_env)
    return sync_env


def test_stock_is_kept_in_base_units_and_unconvertible_lines_are_dead_lettered(
        ordered: SyncEnv) -> None:
    settings = ordered.settings
    assert stock(ordered) == {"SKU-100011": (0, 29, "PCE"),          # 2 x 12 + 5, not 2 + 5
                              "SKU-100013": (D("500.25"), 0, "KGM")}  # 0.5 t + 250 g
    with ordered.erp() as erp:
        lines = erp.execute("SELECT crm_order_id, crm_line_id, quantity, unit_code, "
                            "base_quantity, base_unit FROM erp.sales_order_items "
                            "ORDER BY 1, 2").fetchall()
        letters = dict(erp.execute("SELECT msg_key, error_message FROM sync.dead_letters "
                                   "WHERE state = 'open'").fetchall())
        keys = dict(erp.execute("SELECT o.crm_order_id, b.crm_customer_id FROM erp.sales_orders"
                                " o JOIN erp.business_partners b USING (crm_customer_id)"))
    assert [tuple(r) for r in lines] == [
        ("101", '["101","1"]', 2, "BOX", 24, "PCE"), ("101", '["101","2"]', 5, "PCE", 5, "PCE"),
        ("103", '["103","1"]', D("0.5"), "TNE", 500, "KGM"),
        ("103", '["103","2"]', 250, "GRM", D("0.25"), "KGM")]
    assert set(keys) == {"101", "103"}
    assert len(letters) == 2
    reasons = sorted(letters.values())  # each names its line (the CRM key)
    assert reasons[0].startswith('lines.quantity: line ["102","1"]: ')
    assert "KGM cannot be converted to PCE, the base unit of SKU-100011" in reasons[0]
    assert reasons[1].startswith('lines.quantity: line ["104","1"]: ')
    assert "BOX cannot be converted to KGM, the base unit of SKU-100013" in reasons[1]
    dlq = read_topic(settings, settings.dlq_topic)
    assert {r.key for r in dlq} == set(letters)

    # Changes apply their difference: a line corrected from 5个 to 1箱 (+7), an order
    # cancelled (its reservation released), another marked completed (issue -> issue: 0).
    with ordered.crm() as crm:
        crm.execute("UPDATE crm.order_lines SET quantity = '1箱' WHERE order_id = 101 "
                    "AND line_no = 2")
        crm.execute("UPDATE crm.sales_orders SET status = '已取消' WHERE order_id = 103")
        crm.execute("UPDATE crm.sales_orders SET status = '已完成' WHERE order_id = 101")
    produce(ordered)
    consume(ordered)
    after = {"SKU-100011": (0, 36, "PCE"), "SKU-100013": (0, 0, "KGM")}
    assert stock(ordered) == after

    # Every event again (duplicates) changes nothing: differences come from stored effects.
    producer = make_producer(settings)
    for record in read_topic(settings, settings.sales_topic):
        producer.send(record.topic, key=record.key, value=record.value)
    producer.flush()
    consume(ordered)
    assert stock(ordered) == after

    check = recounted(ordered, repair=False)
    assert (check.drift, check.lines_converted, check.orders_fixed) == ([], 0, 0)
    assert check.unconvertible == []  # dead-lettered lines never reached the ERP

    # The database itself refuses a difference in another unit than the total's.
    with ordered.erp() as erp:
        assert erp.execute("SELECT delta_unit FROM erp.stock WHERE sku = 'SKU-100011'"
                           ).fetchone() == ("PCE",)
        with pytest.raises(psycopg.errors.CheckViolation, match="stock_delta_in_base_unit"):
            erp.execute("UPDATE erp.stock SET issued = issued + 1, delta_unit = 'BOX' "
                        "WHERE sku = 'SKU-100011'")


def test_recount_finds_and_repairs_drift_and_upgrades_old_rows(ordered: SyncEnv) -> None:
    good = stock(ordered)
    with ordered.erp() as erp:  # as an ERP written before base units existed
        erp.execute("UPDATE erp.sales_order_items SET base_quantity = NULL, base_unit = NULL")
        erp.execute("UPDATE erp.stock SET issued = 7, base_unit = NULL "
                    "WHERE sku = 'SKU-100011'")
    with pytest.raises(ConfigError, match="stock recount"):
        consume(ordered)  # refuses to add base units to totals in an unknown unit

    check = recounted(ordered, repair=False)
    assert check.needs_attention
    assert check.lines_converted == 4
    assert [(d.sku, d.stored_unit, d.base_unit) for d in check.drift] == [
        ("SKU-100011", None, "PCE"), ("SKU-100013", "KGM", "KGM")]
    assert stock(ordered)["SKU-100011"] == (0, 7, None)  # --check wrote nothing

    fixed = recounted(ordered, repair=True)
    assert fixed.lines_converted == 4 and not fixed.needs_attention
    assert stock(ordered) == good
    again = recounted(ordered, repair=False)
    assert (again.drift, again.lines_converted, again.orders_fixed) == ([], 0, 0)
    consume(ordered)  # starts again


def test_recount_after_a_factor_change_counts_unconvertible_lines_nowhere(
        ordered: SyncEnv, tmp_path: Any) -> None:
    path = tmp_path / "mappings.toml"
    path.write_text(ordered.settings.mappings_file.read_text("utf-8").replace(
        'SKU-100011 = { base = "PCE", BOX = 12 }', 'SKU-100011 = { base = "PCE", BOX = 0.25 }'),
        "utf-8")
    changed = Mappings.load(path)  # 2 boxes would now be half a charger
    fixed = recounted(ordered, repair=True, mappings=changed)
    assert [(u.sku, u.unit, u.lines) for u in fixed.unconvertible] == [("SKU-100011", "BOX", 1)]
    assert fixed.needs_attention
    assert stock(ordered)["SKU-100011"] == (0, 5, "PCE")  # the 5 pieces; the boxes nowhere
    with ordered.erp() as erp:
        assert erp.execute("SELECT crm_line_id, base_quantity FROM erp.sales_order_items "
                           "WHERE crm_order_id = '101' ORDER BY 1").fetchall() == [
            ('["101","1"]', None), ('["101","2"]', 5)]
