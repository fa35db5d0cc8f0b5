"""The whole pipeline with the `tryton` target: demo CRM rows -> producer -> Kafka -> consumer
(CRM_ERP_SYNC_ERP_TARGET=tryton) -> a real Tryton server, read back over JSON-RPC; and
`reconcile` against Tryton.

The Tryton database is shared by the module (one server); every test gives its CRM rows ids
of their own, so parties (code CRM-<id>) and sales (web_id <id>) never collide.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer import dlq
from service.consumer.pipeline import ErpConsumer
from service.erp.tryton import CANCEL_ACTION, PositionStore, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.operator.reconcile import reconcile
from service.settings import Settings
from tests.conftest import SyncEnv, TrytonServer
from tests.helpers import consume_until_caught_up, read_topic


@dataclasses.dataclass
class World:
    env: SyncEnv
    settings: Settings
    tryton: TrytonTarget
    rpc: TrytonRPC
    base: int  # CRM ids of this test start above it

    def produce(self) -> None:
        CdcProducer(self.settings, SchemaRegistry.load(self.settings.schemas_dir)).run(
            until_idle=True)

    def consume(self, **changes: Any) -> ErpConsumer:
        consumer = ErpConsumer(dataclasses.replace(self.settings, **changes))
        stats = consume_until_caught_up(consumer, timeout=300)
        assert stats.caught_up and not stats.blocked
        return consumer

    def snapshot(self, customers: list[str], orders: list[str]) -> Any:
        """Counts of every model the sync touches, and each record's values and write date."""
        ctx = {"active_test": False}
        counts = {m: self.rpc.execute(m, "search_count", [], context=ctx)
                  for m in ("party.party", "party.address", "party.contact_mechanism",
                            "sale.sale", "sale.line", "stock.move", "stock.shipment.out")}
        return counts, self.tryton.read_parties(customers), self.tryton.read_sales(orders)


@pytest.fixture
def world(sync_env: SyncEnv, tryton_server: TrytonServer) -> Iterator[World]:
    settings = dataclasses.replace(
        sync_env.settings, erp_target="tryton", tryton_url=tryton_server.url,
        tryton_database=tryton_server.database, tryton_user=tryton_server.login,
        tryton_password=tryton_server.password, batch_max_wait_ms=200)
    rpc = TrytonRPC(tryton_server.url, tryton_server.database, tryton_server.login,
                    tryton_server.password)
    tryton = TrytonTarget(rpc, PositionStore(settings.erp_dsn))
    try:
        yield World(sync_env, settings, tryton, rpc, (uuid.uuid4().int % 90_000 + 10_000) * 100)
    finally:
        tryton.close()


def load_crm(w: World) -> tuple[list[str], dict[str, str]]:
    """Three customers and three orders: paid (two lines), pending payment, shipped.
    Returns the customer keys and order key -> CRM status."""
    b = w.base
    with w.env.crm() as crm:
        crm.execute(
            "INSERT INTO crm.customers (customer_id, family_name, given_name, gender, phone, "
            "email, address) VALUES "
            "(%s, '张', '三', '男', '138 1234 5678', 'zhangsan@example.cn', "
            "'北京市朝阳区建国路88号'), "
            "(%s, '李', '四', '女', '139 0000 1111', NULL, '上海市浦东新区世纪大道100号'), "
            "(%s, '王', '五', '未知', NULL, 'wangwu@example.cn', '广东省广州市天河区体育西路1号')",
            (b + 1, b + 2, b + 3))
        crm.execute(
            "INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, status)"
            " VALUES (%s, %s, %s, DATE '2026-11-29', '已付款'), "
            "(%s, %s, %s, DATE '2026-11-29', '待付款'), "
            "(%s, %s, %s, DATE '2026-11-29', '已发货')",
            (b + 11, f"SO-{b + 11}", b + 1, b + 12, f"SO-{b + 12}", b + 2,
             b + 13, f"SO-{b + 13}", b + 3))
        crm.execute(
            "INSERT INTO crm.order_lines (order_id, line_no, customer_id, product_code, "
            "product_name, quantity, unit_price) VALUES "
            "(%s, 1, %s, 'P-PHONE-5G', '5G手机', '10台', 5000.00), "
            "(%s, 2, %s, 'P-EARBUDS', '无线耳机', '2台', 300.00), "
            "(%s, 1, %s, 'P-LAPTOP', '笔记本电脑', '1台', 8000.00), "
            "(%s, 1, %s, 'P-TV-55', '55英寸电视', '3台', 4000.00)",
            (b + 11, b + 1, b + 11, b + 1, b + 12, b + 2, b + 13, b + 3))
    return [str(b + i) for i in (1, 2, 3)], {str(b + 11): "paid", str(b + 12): "pending",
                                             str(b + 13): "shipped"}


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


def test_reconcile_against_tryton_reports_no_drift_then_finds_a_party_changed_by_hand(
        world: World) -> None:
    customers, _ = load_crm(world)
    world.produce()
    world.consume()

    clean = reconcile(world.settings)
    assert [r.entity for r in clean.entities] == ["customers", "orders"]  # no demand in Tryton
    assert clean.drift == 0, [(r.entity, r.missing, r.extra, r.differing, r.unmappable)
                              for r in clean.entities]
    by_name = {r.entity: r for r in clean.entities}
    assert (by_name["customers"].crm_rows, by_name["orders"].crm_rows) == (3, 3)

    party = world.tryton.read_parties([customers[1]])[customers[1]]
    world.rpc.execute("party.party", "write", [party.id], {"name": "李四四"})  # by hand
    drifted = reconcile(world.settings, ["customers"])
    report, = drifted.entities
    assert report.differing == {customers[1]: ["full_name"]}
    assert report.missing == [] and report.extra == []

