"""A CRM change that cannot become a valid event is a capture dead letter, never a stuck slot:
special values (NaN, infinity, BC dates, years past 9999) and events over the broker's size
limit, with the producer and the consumer running against the real broker and databases."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka.admin import ConfigResource, ConfigResourceType

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer import dlq as dlq_headers
from service.consumer.pipeline import ErpConsumer
from service.kafka_io import make_admin
from service.operator import dlq as operator_dlq
from tests.conftest import SyncEnv
from tests.helpers import read_topic, wait_until
from tests.integration.conftest import Cli, capture_ready
from tests.integration.runtime.test_endpoints import running


@contextmanager
def pipeline(sync_env: SyncEnv) -> Iterator[CdcProducer]:
    """A producer and a consumer running (threads), the slot created before the block."""
    settings = sync_env.settings
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    consumer = ErpConsumer(settings)
    with running(producer), running(consumer):
        wait_until(lambda: capture_ready(sync_env), timeout=60, message="slot and initial snapshot")
        yield producer



def _insert(crm: Any, table: str, **values: Any) -> int:
    key = "demand_id" if table == "crm.market_demand" else "customer_id"
    row = crm.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES "
                      f"({', '.join(['%s'] * len(values))}) RETURNING {key}",
                      list(values.values())).fetchone()
    return int(row[0])


def _letters(sync_env: SyncEnv) -> dict[str, tuple[Any, ...]]:
    """The first dead letter of each key ("c<customer_id>" or "d<demand_id>"):
    (stage, error_class, error_message, dlq_partition, dlq_offset)."""
    with sync_env.erp() as erp:
        rows = erp.execute("SELECT topic, msg_key, stage, error_class, error_message, "
                           'dlq_partition, dlq_offset FROM sync.dead_letters '
                           'ORDER BY partition, "offset"').fetchall()
    out: dict[str, tuple[Any, ...]] = {}
    for topic, key, *rest in rows:
        prefix = "d" if topic == sync_env.settings.market_topic else "c"
        out.setdefault(prefix + bytes(key).decode(), tuple(rest))
    return out


def _partners(sync_env: SyncEnv) -> dict[int, Any]:
    with sync_env.erp() as erp:
        return {int(k): v for k, v in erp.execute(
            "SELECT crm_customer_id, notes FROM erp.business_partners WHERE NOT deleted")}


def _demands(sync_env: SyncEnv) -> set[int]:
    with sync_env.erp() as erp:
        return {int(r[0]) for r in erp.execute("SELECT crm_demand_id FROM erp.demand_signals")}


def test_special_values_are_capture_dead_letters_and_later_changes_flow(
        sync_env: SyncEnv) -> None:
    with pipeline(sync_env), sync_env.crm() as crm:
        nan = _insert(crm, "crm.customers", family_name="李", given_name="娜",
                      purchase_amount="NaN")
        # the fix of the row is a letter too (its old row still carries NaN), held behind
        crm.execute("UPDATE crm.customers SET purchase_amount = 5000 WHERE customer_id = %s",
                    (nan,))
        infinite = _insert(crm, "crm.market_demand", kind="市场趋势", product_category="手机",
                           content="x", observed_at="infinity")
        caesar = _insert(crm, "crm.customers", family_name="Caesar", given_name="Julius",
                         birth_date="0044-03-15 BC")
        far = _insert(crm, "crm.customers", family_name="赵", given_name="六",
                      birth_date="10000-01-01")
        never = _insert(crm, "crm.customers", family_name="钱", given_name="七",
                        birth_date="-infinity")
        good = _insert(crm, "crm.customers", family_name="张", given_name="三",
                       phone="138 1234 5678", notes="已发货")
        demand = _insert(crm, "crm.market_demand", kind="市场趋势", product_category="手机",
                         content="5G手机市场增长迅速", observed_at="2023-01-01T00:00:00Z")
        crm.execute("UPDATE crm.customers SET notes = '10台' WHERE customer_id = %s", (good,))
        wait_until(lambda: _partners(sync_env).get(good) == "10台" and demand in
                   _demands(sync_env), timeout=180, message="later good changes in the ERP")
        bad = {f"c{k}" for k in (nan, caesar, far, never)} | {f"d{infinite}"}
        wait_until(lambda: bad <= set(_letters(sync_env)), timeout=60,
                   message="every bad change in sync.dead_letters")
    letters = _letters(sync_env)
    assert {k: v[:2] for k, v in letters.items()} == dict.fromkeys(
        bad, ("capture", "UnrepresentableValue"))
    assert letters[f"c{nan}"][2].startswith("purchase_amount: ")
    assert letters[f"d{infinite}"][2].startswith("observed_at: infinity")
    assert letters[f"c{caesar}"][2].startswith("birth_date: BC date")
    assert letters[f"c{far}"][2].startswith("birth_date: date past year 9999")
    assert letters[f"c{never}"][2].startswith("birth_date: -infinity")
    assert set(_partners(sync_env)) == {good}  # nothing of a bad key was applied
    assert _demands(sync_env) == {demand}

    # The letter on the dead-letter topic: identity, reason and the raw values (as text),
    # with the consumer's header conventions.
    records = {(r.partition, r.offset): r for r in read_topic(sync_env.settings,
                                                               sync_env.settings.dlq_topic)}
    nan_letter = records[letters[f"c{nan}"][3:5]]
    headers = dlq_headers.decode_headers(nan_letter.headers)
    assert headers[dlq_headers.STAGE] == "capture"
    assert headers[dlq_headers.ORIGINAL_TOPIC] == sync_env.settings.sales_topic
    assert headers["crm_erp_sync-column"] == "purchase_amount"
    doc = json.loads(nan_letter.value)
    assert doc["table"] == "crm.customers" and doc["op"] == "CREATE"
    assert doc["primary_key"] == {"customer_id": str(nan)}
    assert doc["after"]["purchase_amount"] == "NaN" and doc["after"]["family_name"] == "李"
    assert doc["xid"] > 0 and "/" in doc["commit_lsn"]
    assert "李" not in json.dumps(headers, ensure_ascii=False)  # values: in the value only

    # Operators see and resolve them like any other dead letter.
    listed = operator_dlq.list_letters(sync_env.settings, error_type="capture")
    assert {("d" if d.topic == sync_env.settings.market_topic else "c") + d.key_text
            for d in listed} == bad
    nan_ids = [d.dead_letter_id for d in listed if d.key_text == str(nan)
               and d.topic == sync_env.settings.sales_topic]
    shown = operator_dlq.show(sync_env.settings, nan_ids[0])
    assert shown["headers"][dlq_headers.STAGE] == "capture"
    assert shown["payload"]["after"]["purchase_amount"] == "NaN"
    report = operator_dlq.discard(sync_env.settings,
                                  [d for d in listed if d.key_text == str(caesar)
                                   and d.topic == sync_env.settings.sales_topic],
                                  actor="test", reason="fixed in the CRM by hand")
    assert report.ok


def test_oversized_events_are_dead_lettered_and_later_changes_flow(
        sync_env: SyncEnv) -> None:
    # random bytes in base64: 1.6 MB that zstd cannot bring under the broker's 1 MiB
    huge = base64.b64encode(os.urandom(1_200_000)).decode()
    # 640 KB of ordinary text: twice that (before + after) is over 1 MiB, compressed far under
    long_note = ("张三 138xxxx5678 北京市朝阳区 10台 5000元 已发货。" * 20_000)[:640_000]
    with pipeline(sync_env) as producer, sync_env.crm() as crm:
        big = _insert(crm, "crm.customers", family_name="张", given_name="三", notes=huge)
        long = _insert(crm, "crm.customers", family_name="李", given_name="四", notes=long_note)
        crm.execute("UPDATE crm.customers SET notes = notes || '!' WHERE customer_id = %s",
                    (long,))
        after = _insert(crm, "crm.customers", family_name="王", given_name="五", notes="ok")
        wait_until(lambda: after in _partners(sync_env), timeout=90,
                   message="a later change of another key in the ERP")
        wait_until(lambda: f"c{big}" in _letters(sync_env), timeout=60,
                   message="the oversized insert in sync.dead_letters")
        assert producer.stats.dead_letters == 1, producer.stats
        assert producer.metrics.capture_dead_letters.labels(
            "crm.customers", "CaptureRejected")._value.get() == 1
    partners = _partners(sync_env)
    assert partners[long] == long_note + "!"  # the edit got through, compressed
    assert big not in partners
    stage, error_class, message, *_ = _letters(sync_env)[f"c{big}"]
    assert (stage, error_class) == ("capture", "CaptureRejected")
    assert message.startswith("event too large") and "max.message.bytes" in message
    assert set(_letters(sync_env)) == {f"c{big}"}


def test_special_values_read_by_a_snapshot_are_capture_dead_letters(sync_env: SyncEnv) -> None:
    """psycopg cannot load infinity or BC dates: the snapshot reads them as text and gives
    them the log's treatment instead of failing the chunk (and every chunk after it)."""
    with sync_env.crm() as crm:  # before the slot: only the initial snapshot sees them
        caesar = _insert(crm, "crm.customers", family_name="Caesar", given_name="Julius",
                         birth_date="0044-03-15 BC")
        good = _insert(crm, "crm.customers", family_name="张", given_name="三")
        infinite = _insert(crm, "crm.market_demand", kind="市场趋势", product_category="手机",
                           content="x", observed_at="-infinity")
    with pipeline(sync_env):
        wait_until(lambda: good in _partners(sync_env), timeout=90,
                   message="the good row of the snapshot in the ERP")
        wait_until(lambda: {f"c{caesar}", f"d{infinite}"} <= set(_letters(sync_env)),
                   timeout=60, message="the snapshot's bad rows in sync.dead_letters")
    letters = _letters(sync_env)
    assert letters[f"c{caesar}"][:2] == ("capture", "UnrepresentableValue")
    assert letters[f"d{infinite}"][2].startswith("observed_at: -infinity")


def test_a_send_the_broker_refuses_rebuilds_the_producer_and_rereads_the_limit(
        sync_env: SyncEnv) -> None:
    """The topic's limit lowered under a running producer: the broker refuses the send
    (MessageSizeTooLargeError, which poisons kafka-python's idempotent producer); the
    producer is dropped and rebuilt, reads the new limit, dead-letters the change, and the
    rebuilt producer carries the later changes."""
    with pipeline(sync_env) as producer, sync_env.crm() as crm:
        first = _insert(crm, "crm.customers", family_name="张", given_name="三", notes="ok")
        wait_until(lambda: first in _partners(sync_env), timeout=60, message="a first event")
        assert producer._limits[sync_env.settings.sales_topic] > 1_000_000
        admin = make_admin(sync_env.settings)
        try:
            admin.alter_configs([ConfigResource(
                ConfigResourceType.TOPIC, sync_env.settings.sales_topic,
                {"max.message.bytes": "100000"})])
        finally:
            admin.close()
        big = _insert(crm, "crm.customers", family_name="李", given_name="四",
                      notes=base64.b64encode(os.urandom(300_000)).decode())
        after = _insert(crm, "crm.customers", family_name="王", given_name="五", notes="ok")
        wait_until(lambda: after in _partners(sync_env), timeout=120,
                   message="a later change through the rebuilt producer")
        assert producer._limits[sync_env.settings.sales_topic] == 100_000
        assert producer.metrics.retries._value.get() >= 1  # the refused send was retried
    assert f"c{big}" in _letters(sync_env)
    assert big not in _partners(sync_env)


def test_redrive_of_capture_letters_rereads_the_fixed_row(sync_env: SyncEnv) -> None:
    """The fix of a NaN row is a letter too (its old row carries the NaN); redriving the
    key's letters, in order, re-reads the row as it is now. (A later change of the row that
    maps would supersede them instead: test_a_newer_good_change_supersedes_capture_letters.)"""
    with pipeline(sync_env), sync_env.crm() as crm:
        cid = _insert(crm, "crm.customers", family_name="李", given_name="娜",
                      purchase_amount="NaN")
        crm.execute("UPDATE crm.customers SET purchase_amount = 5000, notes = '已发货' "
                    "WHERE customer_id = %s", (cid,))
        wait_until(lambda: len(operator_dlq.list_letters(sync_env.settings, key=str(cid)))
                   == 2, timeout=60, message="the two capture letters")
        letters = operator_dlq.list_letters(sync_env.settings, key=str(cid))
        assert [d.stage for d in letters] == ["capture", "capture"]
        report = operator_dlq.redrive(sync_env.settings, letters, actor="test",
                                      reason="NaN fixed in the CRM")
        assert report.ok, report.outcomes
        assert "re-read of crm.customers customer_id=" in report.outcomes[0].detail
        wait_until(lambda: _partners(sync_env).get(cid) == "已发货", timeout=90,
                   message="the re-read row in the ERP")
    with sync_env.erp() as erp:
        amount = erp.execute("SELECT purchase_amount FROM erp.business_partners "
                             "WHERE crm_customer_id = %s", (str(cid),)).fetchone()
    assert amount is not None and amount[0] == 5000
    assert _held(sync_env) == 0


def _held(sync_env: SyncEnv) -> int:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT count(*) FROM sync.held_events").fetchone()
    return int(row[0]) if row else 0


def _states(sync_env: SyncEnv, key: int) -> list[tuple[str, str]]:
    """(stage, state) of every letter of a customer's key, oldest first."""
    with sync_env.erp() as erp:
        return [(s, t) for s, t in erp.execute(
            "SELECT stage, state FROM sync.dead_letters WHERE topic = %s AND msg_key = %s "
            "ORDER BY dead_letter_id",
            (sync_env.settings.sales_topic, str(key).encode())).fetchall()]


def test_a_resnapshot_of_the_fixed_row_supersedes_its_capture_letters(
        sync_env: SyncEnv, cli: Cli) -> None:
    """A capture letter is settled like a consumer-side one: the READ of the fixed row (an
    ad-hoc snapshot of its key) maps, so the key's older letters become `superseded`, the
    events held behind them are released, and `dlq list` no longer counts them open."""
    with pipeline(sync_env), sync_env.crm() as crm:
        cid = _insert(crm, "crm.customers", family_name="李", given_name="娜",
                      purchase_amount="NaN")
        wait_until(lambda: _states(sync_env, cid) == [("capture", "open")], timeout=60,
                   message="the NaN row's capture letter")
        # the fix itself is a letter too (REPLICA IDENTITY FULL: its old row has the NaN)
        crm.execute("UPDATE crm.customers SET purchase_amount = 5000 WHERE customer_id = %s",
                    (cid,))
        wait_until(lambda: len(_states(sync_env, cid)) == 2, timeout=60,
                   message="the fix's capture letter")
        requested = cli(sync_env.settings, "snapshot", "--table", "customers",
                        "--key", str(cid))
        assert requested.code == 0, requested.out + requested.err
        wait_until(lambda: cid in _partners(sync_env), timeout=90,
                   message="the re-read row in the ERP")
        wait_until(lambda: {t for _, t in _states(sync_env, cid)} == {"superseded"},
                   timeout=30, message="the capture letters superseded")
        assert operator_dlq.list_letters(sync_env.settings, key=str(cid)) == []
    assert _held(sync_env) == 0


def test_a_newer_good_change_supersedes_capture_letters(sync_env: SyncEnv) -> None:
    """A newer change of the row whose event maps (the whole row, like a READ) settles the
    older capture letters too, and the key is not held behind them."""
    with pipeline(sync_env), sync_env.crm() as crm:
        cid = _insert(crm, "crm.customers", family_name="李", given_name="娜",
                      purchase_amount="NaN")
        crm.execute("UPDATE crm.customers SET purchase_amount = 5000 WHERE customer_id = %s",
                    (cid,))
        crm.execute("UPDATE crm.customers SET notes = '已发货' WHERE customer_id = %s", (cid,))
        wait_until(lambda: _partners(sync_env).get(cid) == "已发货", timeout=90,
                   message="the good change applied, not held")
        wait_until(lambda: _states(sync_env, cid) == [("capture", "superseded")] * 2,
                   timeout=30, message="both capture letters superseded")
    assert _held(sync_env) == 0
