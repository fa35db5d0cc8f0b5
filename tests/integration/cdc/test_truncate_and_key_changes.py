"""Issue #11 items 3 and 4, with the producer and a consumer running against the real broker
and databases: a primary-key UPDATE deletes the old key in the ERP and creates the new one; a
TRUNCATE of a captured table is propagated (watermark-guarded soft delete), skipped, or stops
capture until the operator chooses (CRM_ERP_SYNC_ON_TRUNCATE)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.events import NEW_KEY_HEADER, OLD_KEY_HEADER
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up, decoded_events, wait_until
from tests.integration.conftest import Cli, capture_ready
from tests.integration.runtime.test_endpoints import running


@contextmanager
def producer_running(settings: Settings) -> Iterator[CdcProducer]:
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    with running(producer):
        yield producer


@contextmanager
def consumer_running(settings: Settings) -> Iterator[ErpConsumer]:
    consumer = ErpConsumer(settings)
    with running(consumer):
        yield consumer


def _customer(crm: Any, cid: int, given: str = "三") -> None:
    crm.execute("INSERT INTO crm.customers (customer_id, family_name, given_name, phone, "
                "address) VALUES (%s, '张', %s, '138 1234 5678', '北京市朝阳区建国路88号')",
                (cid, given))


def _demand(crm: Any) -> str:
    row = crm.execute("INSERT INTO crm.market_demand (kind, product_category, content, "
                      "observed_at) VALUES ('市场趋势', '手机', '5G手机市场增长迅速', now()) "
                      "RETURNING demand_id").fetchone()
    return str(row[0])


def _rows(sync_env: SyncEnv, table: str, key: str) -> dict[str, bool]:
    """ERP key -> deleted."""
    with sync_env.erp() as erp:
        return dict(erp.execute(f"SELECT {key}, deleted FROM {table}").fetchall())


def _partners(sync_env: SyncEnv) -> dict[str, bool]:
    return _rows(sync_env, "erp.business_partners", "crm_customer_id")


def _demands(sync_env: SyncEnv) -> dict[str, bool]:
    return _rows(sync_env, "erp.demand_signals", "crm_demand_id")


def _reserved(sync_env: SyncEnv) -> dict[str, int]:
    with sync_env.erp() as erp:
        return {sku: int(q) for sku, q in erp.execute(
            "SELECT sku, reserved FROM erp.stock WHERE reserved <> 0").fetchall()}


def _slot_confirmed(sync_env: SyncEnv) -> int:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots"
                          " WHERE slot_name = %s", (sync_env.settings.slot_name,)).fetchone()
    return int(row[0])



def test_primary_key_update_deletes_the_old_key_and_creates_the_new(
        sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    with producer_running(settings), consumer_running(settings), sync_env.crm() as crm:
        wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and initial snapshot")
        _customer(crm, 1102)
        wait_until(lambda: _partners(sync_env).get("1102") is False, timeout=120,
                   message="customer 1102 in the ERP")
        crm.execute("UPDATE crm.customers SET customer_id = 1202 WHERE customer_id = 1102")
        wait_until(lambda: _partners(sync_env) == {"1102": True, "1202": False}, timeout=120,
                   message="1202 live and 1102 deleted in the ERP")
        # a later update of the new key applies over its create
        crm.execute("UPDATE crm.customers SET notes = '已发货' WHERE customer_id = 1202")
        with sync_env.erp() as erp:
            wait_until(lambda: erp.execute(
                "SELECT notes FROM erp.business_partners WHERE crm_customer_id = '1202'"
            ).fetchone() == ("已发货",), timeout=120, message="the later update of 1202")
    events = [(key, event["op"], event["key"], dict(record.headers))
              for key, _kind, event, record in decoded_events(settings)]
    delete = next(e for e in events if e[1] == "DELETE")
    create = next(e for e in events if e[2] == "1202" and e[1] == "CREATE")
    # the old key's delete went where the old key's events went (its key, its partition)
    assert delete[:3] == (b"1102", "DELETE", "1102")
    assert delete[3][NEW_KEY_HEADER] == b"1202"
    assert create[:3] == (b"1202", "CREATE", "1202")
    assert create[3][OLD_KEY_HEADER] == b"1102"


def _status(cli: Cli, settings: Settings) -> tuple[int, dict[str, Any]]:
    result = cli(settings, "status", "--json")
    return result.code, result.json


def test_truncate_propagated_soft_deletes_and_later_inserts_stay(
        sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.with_(on_truncate="propagate")
    with producer_running(settings), consumer_running(settings), sync_env.crm() as crm:
        wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and initial snapshot")
        old_demands = [_demand(crm), _demand(crm)]
        for cid in (1, 2):
            _customer(crm, cid)
        with crm.transaction():  # 已付款 reserves stock
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (970, 'X970', 1, '2023-01-01', "
                        "'已付款', '元')")
            crm.execute("INSERT INTO crm.order_lines VALUES (970, 1, 1, 'P-PHONE-5G', '手机', "
                        "'10台', 5000)")
        wait_until(lambda: set(_partners(sync_env)) == {"1", "2"}
                   and set(_demands(sync_env)) == set(old_demands)
                   and _rows(sync_env, "erp.sales_orders", "crm_order_id") == {"970": False}
                   and _reserved(sync_env) == {"SKU-100001": 10}, timeout=120,
                   message="customers, the order and demands in the ERP")
        crm.execute("TRUNCATE crm.market_demand")
        new_demand = _demand(crm)
        # customers are referenced by orders: a truncate of them cascades (one Truncate
        # message naming customers, orders and lines)
        with crm.transaction():
            crm.execute("TRUNCATE crm.customers CASCADE")
            _customer(crm, 3, "娜")  # inserted in the truncating transaction: stays
        _customer(crm, 4, "四")
        expected_demands = {**dict.fromkeys(old_demands, True), new_demand: False}
        wait_until(lambda: _demands(sync_env) == expected_demands
                   and _partners(sync_env) == {"1": True, "2": True, "3": False, "4": False},
                   timeout=120, message="truncated rows deleted, later inserts live")
    # the cascade's orders and lines are deleted too, and their stock effect undone
    assert _rows(sync_env, "erp.sales_orders", "crm_order_id") == {"970": True}
    assert _rows(sync_env, "erp.sales_order_items", "crm_line_id") == {'["970","1"]': True}
    assert _reserved(sync_env) == {}
    with sync_env.erp() as erp:
        marks = {r[0]: r[1:] for r in erp.execute(
            "SELECT entity, crm_table, truncates, rows_marked FROM sync.truncations "
            "WHERE truncates > 0").fetchall()}
    assert marks == {"market_demand": ("crm.market_demand", 1, 2),
                     "customer": ("crm.customers", 1, 2),
                     "order": ("crm.sales_orders", 1, 1),
                     "order_line": ("crm.order_lines", 1, 0)}  # the order's truncate took it
    _code, status = _status(cli, settings)
    truncates = status["truncates"]
    assert truncates["propagated"] == 4 and truncates["skipped"] == 0  # 1 + 3 (cascade)
    assert truncates["stopped"] == []
    assert not any("TRUNCATE" in a for a in status["attention"]), status["attention"]


def test_an_event_older_than_the_truncate_does_not_come_back(
        sync_env: SyncEnv, cli: Cli) -> None:
    """Replayed from the beginning (every event older than the truncate arrives again, as
    from a lagging partition), nothing truncated comes back and the truncate applies once."""
    settings = sync_env.with_(on_truncate="propagate")
    with sync_env.crm() as crm, producer_running(settings):
        wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and snapshot")
        before = [_demand(crm) for _ in range(3)]
        crm.execute("TRUNCATE crm.market_demand")
        after = _demand(crm)
        wait_until(lambda: len(decoded_events(settings, settings.market_topic)) == 5,
                   timeout=120, message="every event published")
    consume_until_caught_up(ErpConsumer(settings))
    # Applied in one batch: the creates older than the truncate are refused by its
    # watermark (the truncate is applied first), the later one is live.
    assert _demands(sync_env) == {after: False} and after not in before
    # The ERP forgets the truncated rows entirely; a replay brings their creates again,
    # older than the truncate: only the watermark can refuse them.
    with sync_env.erp() as erp:
        erp.execute("DELETE FROM erp.demand_signals WHERE deleted")
    result = cli(settings, "replay", "--topic", settings.market_topic, "--from-beginning")
    assert result.code == 0, result.err
    with consumer_running(settings):
        wait_until(lambda: _demands(sync_env) == {after: False}, timeout=120,
                   message="the replay applied")
        with sync_env.erp() as erp:
            wait_until(lambda: erp.execute(
                "SELECT truncates FROM sync.truncations WHERE entity = 'market_demand'"
            ).fetchone() == (1,), timeout=30, message="the truncate counted once")
    assert _demands(sync_env) == {after: False}


def test_truncate_skipped_keeps_erp_rows_and_is_reported(sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.with_(on_truncate="skip")
    with producer_running(settings), consumer_running(settings), sync_env.crm() as crm:
        wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and initial snapshot")
        first = _demand(crm)
        crm.execute("TRUNCATE crm.market_demand")
        second = _demand(crm)
        wait_until(lambda: _demands(sync_env) == {first: False, second: False}, timeout=120,
                   message="both demands live in the ERP")
        _code, status = _status(cli, settings)
    assert status["truncates"]["skipped"] == 1
    assert status["truncates"]["last"]["table"] == "crm.market_demand"
    assert status["truncates"]["last"]["outcome"] == "skipped"
    assert status["truncates"]["applied"] == []
    assert not any("TRUNCATE" in a for a in status["attention"]), status["attention"]


@pytest.mark.parametrize("transport", ["stream", "sql"])
def test_truncate_stops_capture_until_the_operator_chooses(sync_env: SyncEnv, cli: Cli,
                                                           transport: str) -> None:
    assert sync_env.settings.on_truncate == "stop"  # the default
    settings = sync_env.with_(capture_transport=transport)
    with consumer_running(settings), sync_env.crm() as crm:
        with producer_running(settings) as producer:
            wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and snapshot")
            first = _demand(crm)
            wait_until(lambda: _demands(sync_env) == {first: False}, timeout=120,
                       message="the first demand in the ERP")
            crm.execute("TRUNCATE crm.market_demand")
            second = _demand(crm)
            wait_until(lambda: producer.stopped_at is not None, timeout=60,
                       message="capture stopped")
            assert producer.stopped_at is not None
            assert producer.stopped_at.tables == ["crm.market_demand"]
            # up, but nothing after the truncate is published, and the slot stays before it
            ready, body = producer.health.readiness()
            assert not ready and body["state"] == "capture_stopped"
            truncate_lsn = int(crm.execute(
                "SELECT commit_lsn - '0/0'::pg_lsn FROM crm_erp_sync.truncates").fetchone()[0])
            assert _slot_confirmed(sync_env) < truncate_lsn
            code, status = _status(cli, settings)
            assert code == 1
            stopped = [a for a in status["attention"] if "TRUNCATE" in a]
            assert len(stopped) == 1
            assert "crm.market_demand" in stopped[0]
            assert "CRM_ERP_SYNC_ON_TRUNCATE=propagate" in stopped[0]
            assert status["truncates"]["stopped"][0]["table"] == "crm.market_demand"
            assert _demands(sync_env) == {first: False}
            text = cli(settings, "status")
            assert text.code == 1 and "CRM_ERP_SYNC_ON_TRUNCATE" in text.out
            assert _slot_confirmed(sync_env) < truncate_lsn  # still, seconds later
            assert producer.stats.truncates == 0
        # the operator chooses propagate and restarts the producer
        with producer_running(dataclasses.replace(settings, on_truncate="propagate")):
            wait_until(lambda: _demands(sync_env) == {first: True, second: False},
                       timeout=120, message="the truncate propagated, the later insert live")
            code, status = _status(cli, settings)
    assert status["truncates"]["stopped"] == []
    assert status["truncates"]["propagated"] == 1
    assert not any("TRUNCATE" in a for a in status["attention"]), status["attention"]
