"""The CDC producer against the real CRM database and the real broker."""

from __future__ import annotations

import random
import string
import threading
from decimal import Decimal
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.helpers import decoded_events, wait_until


def drain(sync_env: SyncEnv, **overrides: Any) -> CdcProducer:
    settings = sync_env.with_(**overrides) if overrides else sync_env.settings
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    producer.run(until_idle=True)
    return producer


def add_customer(conn: Any, family: str = "张", given: str = "三", **extra: Any) -> int:
    cols = {"family_name": family, "given_name": given, **extra}
    row = conn.execute(
        f"INSERT INTO crm.customers ({', '.join(cols)}) VALUES "
        f"({', '.join(['%s'] * len(cols))}) RETURNING customer_id", list(cols.values())
    ).fetchone()
    return int(row[0])


def test_inserts_updates_and_deletes_stream_in_commit_order(sync_env: SyncEnv) -> None:
    drain(sync_env)  # creates the slot; the initial snapshot of empty tables is empty
    with sync_env.crm() as crm:
        cid = add_customer(crm, phone="138 1234 5678", address="北京市朝阳区XX路XX号",
                           purchase_amount=Decimal("1000.00"))
        crm.execute("UPDATE crm.customers SET phone = '13900000000' WHERE customer_id = %s",
                    (cid,))
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status) VALUES (1, '20230101', %s, '2023-01-01', '已付款')",
                        (cid,))
            crm.execute("INSERT INTO crm.order_lines VALUES (1, 1, %s, 'P-PHONE-5G', '手机', "
                        "'10台', 5000.00)", (cid,))
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (cid,))
    drain(sync_env)
    events = [(kind, ev) for key, kind, ev, _ in decoded_events(sync_env.settings)
              if key == str(cid).encode()]
    # The cascade deletes the order after its customer: that is the WAL's (commit) order.
    assert [(k, e["op"]) for k, e in events] == [
        ("customer", "CREATE"), ("customer", "UPDATE"), ("order", "CREATE"),
        ("customer", "DELETE"), ("order", "DELETE")]
    update = events[1][1]
    assert update["before"]["phone"] == "138 1234 5678"
    assert update["after"]["phone"] == "13900000000"
    order = events[2][1]
    assert order["after"]["status"] == "已付款"
    assert order["lines"][0]["after"]["quantity"] == "10台"
    assert order["lines"][0]["after"]["unit_price"] == "5000.00"  # the CRM's exact text
    positions = [(e["source"]["lsn"], e["source"]["seq"]) for _, e in events]
    assert positions == sorted(positions)
    assert len({e["event_id"] for _, e in events}) == len(events)


def test_cjk_text_and_numeric_precision_round_trip_exactly(sync_env: SyncEnv) -> None:
    drain(sync_env)
    with sync_env.crm() as crm:
        cid = add_customer(crm, "欧阳", "娜娜", address="广西壮族自治区南宁市青秀区民族大道100号",
                           purchase_amount=Decimal("123456789012.34"),
                           product_preference="电子产品、家用电器😀")
    drain(sync_env)
    (after,) = [ev["after"] for key, _, ev, _ in decoded_events(sync_env.settings)
                if key == str(cid).encode()]
    assert after["family_name"] == "欧阳" and after["given_name"] == "娜娜"
    assert after["address"] == "广西壮族自治区南宁市青秀区民族大道100号"
    assert after["product_preference"] == "电子产品、家用电器😀"
    assert Decimal(after["purchase_amount"]) == Decimal("123456789012.34")


def test_unchanged_toasted_column_is_published_in_full(sync_env: SyncEnv) -> None:
    drain(sync_env)
    notes = "".join(random.choices(string.ascii_letters + "张王李赵", k=20_000))
    with sync_env.crm() as crm:
        cid = add_customer(crm, notes=notes)
        stored = crm.execute("SELECT pg_column_size(notes) FROM crm.customers").fetchone()
        assert stored is not None and stored[0] > 2000  # really out of line (TOASTed)
        crm.execute("UPDATE crm.customers SET phone = '13800000000' WHERE customer_id = %s",
                    (cid,))
    drain(sync_env)
    events = [ev for key, _, ev, _ in decoded_events(sync_env.settings)
              if key == str(cid).encode()]
    assert [e["op"] for e in events] == ["CREATE", "UPDATE"]
    assert events[1]["after"]["notes"] == notes
    assert events[1]["before"]["notes"] == notes


def test_a_100000_row_transaction_arrives_whole(sync_env: SyncEnv) -> None:
    drain(sync_env)
    with sync_env.crm() as crm:
        crm.execute(
            "INSERT INTO crm.market_demand (kind, product_category, content, observed_at) "
            "SELECT '市场趋势', '手机', '5G手机市场增长迅速 #' || g, now() "
            "FROM generate_series(1, 100000) g")
    producer = drain(sync_env)
    assert producer.stats.events == 100_000
    events = decoded_events(sync_env.settings, sync_env.settings.market_topic)
    assert len({ev["event_id"] for _, _, ev, _ in events}) == 100_000
    assert {ev["source"]["txid"] for _, _, ev, _ in events}.__len__() == 1


def test_initial_snapshot_with_concurrent_writes_converges(sync_env: SyncEnv) -> None:
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                    "SELECT '王', '五' || g, '1380000' || lpad(g::text, 4, '0') "
                    "FROM generate_series(1, 3000) g")
    settings = sync_env.with_(producer_max_changes=200)
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    stop_writes = threading.Event()

    def writer() -> None:
        rng = random.Random(7)
        with sync_env.crm() as crm:
            while not stop_writes.is_set():
                cid = rng.randint(1, 3000)
                if rng.random() < 0.1:
                    crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (cid,))
                else:
                    crm.execute("UPDATE crm.customers SET phone = %s WHERE customer_id = %s",
                                (f"139{rng.randint(0, 99_999_999):08d}", cid))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        runner = threading.Thread(target=producer.run, kwargs={"until_idle": True})
        runner.start()
        wait_until(lambda: producer.stats.snapshot_rows > 1000, timeout=120,
                   message="snapshot under way")
    finally:
        stop_writes.set()
        thread.join()
    runner.join(timeout=300)
    drain(sync_env)

    state: dict[int, tuple[tuple[int, int], Any]] = {}
    for key, _, ev, _ in decoded_events(sync_env.settings):
        pos = (ev["source"]["lsn"], ev["source"]["seq"])
        cid = int(key)
        if cid not in state or state[cid][0] < pos:
            state[cid] = (pos, ev["after"])
    projected = {cid: after["phone"] for cid, (_, after) in state.items() if after is not None}
    with sync_env.crm() as crm:
        actual = dict(crm.execute("SELECT customer_id, phone FROM crm.customers").fetchall())
    assert projected == actual


@pytest.mark.parametrize("table", ["customers"])
def test_ad_hoc_snapshot_of_some_keys(sync_env: SyncEnv, table: str) -> None:
    from service.cdc.capture import request_snapshot
    from service.cdc.profile import load_profile

    drain(sync_env)
    with sync_env.crm() as crm:
        ids = [add_customer(crm, "李", f"{i}") for i in range(5)]
    drain(sync_env)
    with sync_env.crm() as crm:
        request_snapshot(crm, load_profile("demo"), f"crm.{table}",
                         keys=[str(i) for i in ids[:2]])
    producer = drain(sync_env)
    assert producer.stats.snapshot_rows == 2
    reads = [ev for _, _, ev, _ in decoded_events(sync_env.settings) if ev["op"] == "READ"]
    assert sorted(int(ev["key"]) for ev in reads) == ids[:2]
    assert all(ev["source"]["snapshot"] and ev["event_id"].startswith("snap/") for ev in reads)
