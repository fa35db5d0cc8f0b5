"""The pipeline with the `tryton` target, for test_consumer_tryton.py and
test_reconcile_tryton.py: a private sync world (CRM, sync-state database, topics, group)
whose consumer applies to the module's Tryton server (test_tryton.py has a ``world`` of its
own, for the target alone).

The Tryton database is shared by a module (one server); every test gives its CRM rows ids of
their own, so parties (code CRM-<id>) and sales (web_id <id>) never collide.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.erp.tryton import PositionStore, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.settings import Settings
from tests.conftest import SyncEnv, TrytonServer
from tests.helpers import consume_until_caught_up


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
            "(%s, 2, %s, 'P-EARBUDS', '无线耳机', '2个', 300.00), "
            "(%s, 1, %s, 'P-LAPTOP', '笔记本电脑', '1台', 8000.00), "
            "(%s, 1, %s, 'P-TV-55', '55英寸电视', '3台', 4000.00)",
            (b + 11, b + 1, b + 11, b + 1, b + 12, b + 2, b + 13, b + 3))
    return [str(b + i) for i in (1, 2, 3)], {str(b + 11): "paid", str(b + 12): "pending",
                                             str(b + 13): "shipped"}
