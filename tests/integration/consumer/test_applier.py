"""The ERP applier against the real broker and the real ERP database: effects, order,
idempotency, poison messages, crashes and restarts (the circuit breaker: test_breaker.py).

Every run waits for a condition with a deadline (the group's offsets reaching the end
offsets, rows present), never "until idle for N seconds": on a loaded machine a consumer
that has not joined its group yet must not be taken for one that is done."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import TopicPartition

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.consumer.policy import DlqLimit
from service.demo.load import load_demo
from service.erp.mappings import Mappings
from service.kafka_io import ensure_topics, make_admin, make_producer
from service.ops import group_lag
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import (
    actual_erp,
    consume_until_caught_up,
    expected_erp,
    read_topic,
    settings_env,
    wait_until,
)


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def consume_all(sync_env: SyncEnv, settings: Settings | None = None,
                **kwargs: Any) -> ErpConsumer:
    """A consumer run until it has applied everything on the topics now (with a deadline)."""
    consumer = ErpConsumer(settings or sync_env.settings, **kwargs)
    stats = consume_until_caught_up(consumer)
    assert stats.caught_up and not stats.blocked
    return consumer


def assert_erp_matches_crm(sync_env: SyncEnv) -> None:
    mappings = Mappings.load(sync_env.settings.mappings_file)
    with sync_env.crm() as crm, sync_env.erp() as erp:
        assert actual_erp(erp) == expected_erp(crm, mappings)


def erp_fingerprint(sync_env: SyncEnv) -> list[Any]:
    with sync_env.erp() as erp:
        return [erp.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM "
                            f"(SELECT {cols} FROM {table}) t").fetchone()
                for table, cols in (
                    ("erp.business_partners", "crm_customer_id, full_name, phone_e164, deleted, "
                     "source_lsn, source_seq"),
                    ("erp.sales_orders", "crm_order_id, status_code, deleted, source_lsn"),
                    ("erp.sales_order_items", "crm_order_id, crm_line_id, quantity, deleted"),
                    ("erp.stock", "sku, reserved, issued"))]


def load_and_produce(sync_env: SyncEnv, customers: int, seed: int) -> SyncEnv:
    load_demo(sync_env.settings.crm_dsn, customers=customers, orders=customers * 2, rate=None,
              seed=seed, changes=customers)
    produce_all(sync_env)
    return sync_env


@pytest.fixture
def loaded(sync_env: SyncEnv) -> SyncEnv:
    return load_and_produce(sync_env, customers=150, seed=11)


def test_a_clean_pass_matches_the_crm_and_keeps_the_stock_invariant(loaded: SyncEnv) -> None:
    consumer = consume_all(loaded)
    assert consumer.applier.dead_lettered == 0
    assert_erp_matches_crm(loaded)
    with loaded.erp() as erp:
        (name, phone, province), = erp.execute(
            "SELECT full_name, phone_e164, province FROM erp.business_partners "
            "WHERE NOT deleted ORDER BY crm_customer_id LIMIT 1").fetchall()
    assert phone.startswith("+") and province and name


def test_replay_from_the_beginning_and_duplicates_change_nothing(loaded: SyncEnv) -> None:
    consume_all(loaded)
    before = erp_fingerprint(loaded)
    # Duplicates: publish every event a second time; replay: rewind the group to the start.
    producer = make_producer(loaded.settings)
    for record in read_topic(loaded.settings, loaded.settings.sales_topic):
        producer.send(record.topic, key=record.key, value=record.value)
    producer.flush()
    admin = make_admin(loaded.settings)
    parts = [TopicPartition(t, p) for t in (loaded.settings.sales_topic,
                                            loaded.settings.market_topic)
             for p in range(loaded.settings.topic_partitions)]
    admin.reset_group_offsets(loaded.settings.consumer_group, {tp: 0 for tp in parts})
    admin.close()
    consume_all(loaded)
    assert erp_fingerprint(loaded) == before
    assert_erp_matches_crm(loaded)


def test_poison_messages_go_to_the_dlq_beside_good_ones(sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        good = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                           "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        masked = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                             "VALUES ('张', '三', '138xxxx5678') RETURNING customer_id"
                             ).fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status) VALUES (900, 'X900', %s, '2023-01-01', '已付款')",
                        (good,))
            crm.execute("INSERT INTO crm.order_lines VALUES (900, 1, %s, 'P-UNKNOWN', '平衡车', "
                        "'10台', 5000)", (good,))
    produce_all(sync_env)
    producer = make_producer(settings)
    producer.send(settings.sales_topic, key=b"777", value=b"not avro at all")
    producer.send(settings.sales_topic, key=b"778", value=b"\xc3\x01" + b"\x00" * 8 + b"x")
    producer.flush()
    consumer = consume_all(sync_env, dlq_limit=DlqLimit.DISABLED)
    assert consumer.applier.dead_lettered == 4
    letters = read_topic(settings, settings.dlq_topic)
    by_key = {r.key: dict((k, v.decode()) for k, v in r.headers) for r in letters}
    assert by_key[str(masked).encode()]["crm_erp_sync-stage"] == "transform"
    assert "phone" in by_key[str(masked).encode()]["kafka_dlt-exception-message"]
    assert "product" in by_key[str(good).encode()]["kafka_dlt-exception-message"].lower() or \
        "sku" in by_key[str(good).encode()]["kafka_dlt-exception-message"].lower()
    assert by_key[b"777"]["crm_erp_sync-stage"] == "decode"
    assert "UnknownSchema" in by_key[b"778"]["kafka_dlt-exception-fqcn"]
    for headers in by_key.values():
        assert headers["kafka_dlt-original-topic"] == settings.sales_topic
        assert headers["kafka_dlt-original-consumer-group"] == settings.consumer_group
    original = {(r.key, r.value) for r in read_topic(settings, settings.sales_topic)}
    assert {(r.key, r.value) for r in letters} <= original  # bytes unchanged
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM erp.business_partners").fetchone() == (1,)
        assert erp.execute("SELECT count(*) FROM sync.dead_letters WHERE state = 'open'"
                           ).fetchone() == (4,)
    assert all(p.lag == 0 for p in group_lag(settings))


def _masked_customer_with_an_order(crm: Any, order_id: int) -> int:
    """A customer the mapping refuses (the brief's masked phone) and an order of theirs."""
    cid = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                      "('张', '三', '138xxxx5678') RETURNING customer_id").fetchone()[0]
    with crm.transaction():
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                    "order_date, status) VALUES (%s, %s, %s, '2023-01-01', '已付款')",
                    (order_id, f"O{order_id}", cid))
        crm.execute("INSERT INTO crm.order_lines VALUES (%s, 1, %s, 'P-PHONE-5G', '手机', "
                    "'10台', 5000)", (order_id, cid))
    return int(cid)


def test_events_after_a_dead_letter_of_the_same_key_are_held(sync_env: SyncEnv) -> None:
    produce_all(sync_env)
    with sync_env.crm() as crm:
        _masked_customer_with_an_order(crm, 31)
    produce_all(sync_env)
    consume_all(sync_env)
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM erp.business_partners").fetchone() == (0,)
        assert erp.execute("SELECT reason FROM sync.held_events").fetchall() == [
            ("key_blocked",)]


def test_a_fixed_crm_row_supersedes_its_dead_letter_and_releases_the_key(
        sync_env: SyncEnv) -> None:
    produce_all(sync_env)
    with sync_env.crm() as crm:
        cid = _masked_customer_with_an_order(crm, 32)
    produce_all(sync_env)
    consume_all(sync_env)  # the customer is dead-lettered, its order held behind it
    with sync_env.crm() as crm:  # the operator corrects the CRM
        crm.execute("UPDATE crm.customers SET phone = '010-65521234转123' "
                    "WHERE customer_id = %s", (cid,))
    produce_all(sync_env)
    consume_all(sync_env)
    with sync_env.erp() as erp:
        assert erp.execute("SELECT phone_e164, phone_extension FROM erp.business_partners "
                           "WHERE crm_customer_id = %s", (str(cid),)).fetchall() == [
            ("+861065521234", "123")]
        assert erp.execute("SELECT crm_order_id, status_code FROM erp.sales_orders"
                           ).fetchall() == [("32", "PAID")]
        assert erp.execute("SELECT count(*) FROM sync.held_events").fetchone() == (0,)
        assert erp.execute("SELECT state, event_kind FROM sync.dead_letters").fetchall() == [
            ("superseded", "customer")]
        assert erp.execute("SELECT action, actor, outcome FROM sync.dead_letter_actions"
                           ).fetchall() == [("supersede", "consumer", "superseded")]


def test_a_fix_in_the_same_batch_supersedes_too(sync_env: SyncEnv) -> None:
    produce_all(sync_env)
    with sync_env.crm() as crm:
        fixed = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('张', '三', '138****5678') RETURNING customer_id").fetchone()[0]
        crm.execute("UPDATE crm.customers SET phone = '13812345678' WHERE customer_id = %s",
                    (fixed,))
        # Fixed, then broken again: a fix older than an open letter does not supersede it
        # (the newer failure supersedes the first letter instead: one open letter per row).
        again = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '139****5678') RETURNING customer_id").fetchone()[0]
        crm.execute("UPDATE crm.customers SET phone = '13912345678' WHERE customer_id = %s",
                    (again,))
        crm.execute("UPDATE crm.customers SET phone = '139xxxx5678' WHERE customer_id = %s",
                    (again,))
    produce_all(sync_env)
    consume_all(sync_env)
    with sync_env.erp() as erp:
        assert erp.execute("SELECT crm_customer_id, phone_e164 FROM erp.business_partners"
                           ).fetchall() == [(str(fixed), "+8613812345678")]
        letters = erp.execute('SELECT msg_key, "offset", state FROM sync.dead_letters'
                              ).fetchall()
        assert sorted((int(k), o, state) for k, o, state in letters)[0][2] == "superseded"
        assert [(k, state) for k, _, state in sorted((int(k), o, st) for k, o, st in letters)
                ] == [
            (fixed, "superseded"), (again, "superseded"), (again, "open")]
        assert erp.execute("SELECT msg_key FROM sync.held_events").fetchall() == [
            (str(again).encode(),)]


def customer_and_order_records(sync_env: SyncEnv, order_id: int,
                               status: str) -> tuple[int, Any, Any]:
    """Commit a customer and an order together; return the id and both Kafka records."""
    produce_all(sync_env)
    with sync_env.crm() as crm, crm.transaction():
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES "
                          "('王', '五') RETURNING customer_id").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                    "order_date, status) VALUES (%s, %s, %s, '2023-01-01', %s)",
                    (order_id, f"O{order_id}", cid, status))
        crm.execute("INSERT INTO crm.order_lines VALUES (%s, 1, %s, 'P-PHONE-5G', '手机', "
                    "'10台', 5000)", (order_id, cid))
    produce_all(sync_env)
    registry = SchemaRegistry.load(sync_env.settings.schemas_dir)
    records = {registry.decode(r.value)[0]: r
               for r in read_topic(sync_env.settings, sync_env.settings.sales_topic)}
    return cid, records["customer"], records["order"]


def on_fresh_topic(sync_env: SyncEnv, suffix: str, **overrides: Any) -> Settings:
    """The same world with its own sales topic, to publish records in an order of our own."""
    other = sync_env.with_(sales_topic=f"{sync_env.settings.sales_topic}.{suffix}", **overrides)
    ensure_topics(other)
    return other


def test_an_order_before_its_customer_is_held_then_applied(sync_env: SyncEnv) -> None:
    cid, customer_record, order_record = customer_and_order_records(sync_env, 5, "已付款")
    # Re-published in the wrong order: the order first.
    other = on_fresh_topic(sync_env, "reordered")
    producer = make_producer(other)
    producer.send(other.sales_topic, key=order_record.key, value=order_record.value).get(30)
    consume_all(sync_env, other)
    with sync_env.erp() as erp:
        assert erp.execute("SELECT reason, waits_for FROM sync.held_events").fetchall() == [
            ("awaiting_customer", str(cid))]
        assert erp.execute("SELECT count(*) FROM erp.sales_orders").fetchone() == (0,)
    producer.send(other.sales_topic, key=customer_record.key,
                  value=customer_record.value).get(30)
    consume_all(sync_env, other)
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM sync.held_events").fetchone() == (0,)
        assert erp.execute("SELECT status_code FROM erp.sales_orders").fetchall() == [("PAID",)]
        assert erp.execute("SELECT reserved FROM erp.stock").fetchone()[0] == 10


def _spawn_consumer(sync_env: SyncEnv, log: Any) -> subprocess.Popen[bytes]:
    # Small batches make a run last long enough for the faults to land mid-run.
    env = {**os.environ, **settings_env(sync_env.settings), "CRM_ERP_SYNC_BATCH_MAX_EVENTS": "10"}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "consume"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def consumer_log(tmp_path: Any) -> Iterator[Any]:
    with (tmp_path / "consumers.log").open("ab") as log:
        yield log


@pytest.fixture
def loaded_large(sync_env: SyncEnv) -> SyncEnv:
    return load_and_produce(sync_env, customers=1500, seed=13)


def _lag(sync_env: SyncEnv) -> int:
    return sum(p.lag for p in group_lag(sync_env.settings))


def _caught_up(sync_env: SyncEnv) -> bool:
    return _lag(sync_env) == 0


def _started(sync_env: SyncEnv) -> bool:
    return any(p.committed for p in group_lag(sync_env.settings))


def test_kill_9_consumers_mid_batch_repeatedly(loaded_large: SyncEnv,
                                                consumer_log: Any) -> None:
    procs = [_spawn_consumer(loaded_large, consumer_log) for _ in range(3)]
    kills_mid_run = 0
    try:
        for round_ in range(3):
            wait_until(lambda: _started(loaded_large), timeout=60, message="progress")
            time.sleep(0.5)
            kills_mid_run += _lag(loaded_large) > 0
            victim = procs[round_ % len(procs)]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            procs[round_ % len(procs)] = _spawn_consumer(loaded_large, consumer_log)
        wait_until(lambda: _caught_up(loaded_large), timeout=240,
                   message="consumers to catch up")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    assert kills_mid_run >= 2, "the kills came after the work was done: the test proves nothing"
    assert_erp_matches_crm(loaded_large)


@contextlib.contextmanager
def consumer_riding_out_erp_faults(sync_env: SyncEnv, log: Any,
                                   log_path: Any) -> Iterator[None]:
    """A consumer process runs the block's faults; afterwards it must have retried, caught
    up without exiting, stopped cleanly on SIGTERM, and left the ERP equal to the CRM."""
    proc = _spawn_consumer(sync_env, log)
    try:
        wait_until(lambda: _started(sync_env), timeout=60, message="progress")
        yield
        try:
            wait_until(lambda: _caught_up(sync_env), timeout=180, message="consumer to recover")
        except AssertionError as exc:  # what the consumer did meanwhile says why
            log.flush()
            tail = log_path.read_bytes()[-4000:].decode("utf-8", "replace")
            raise AssertionError(f"{exc}; the consumer's log ends:\n{tail}") from None
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    log.flush()
    assert b"transient_failure_retrying" in log_path.read_bytes()
    assert_erp_matches_crm(sync_env)


def test_erp_database_connections_dropped_mid_run(loaded_large: SyncEnv, consumer_log: Any,
                                                 tmp_path: Any) -> None:
    """What an ERP restart does to its clients: every session dropped, repeatedly."""
    erp_db = loaded_large.settings.erp_dsn.rsplit("/", 1)[1]
    drops_mid_run = 0
    with consumer_riding_out_erp_faults(loaded_large, consumer_log,
                                        tmp_path / "consumers.log"), loaded_large.crm() as admin:
        for _ in range(5):
            if _lag(loaded_large) == 0:
                break
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (erp_db,)).fetchone()
            drops_mid_run += bool(dropped and dropped[0])
            time.sleep(0.4)
    assert drops_mid_run >= 1


def test_erp_database_restarted_mid_run(loaded_large: SyncEnv, consumer_log: Any,
                                       tmp_path: Any) -> None:
    """A real restart of the local stack's PostgreSQL while the consumer works."""
    reason = loaded_large.stack.why_not_restartable()
    if reason:
        pytest.skip(reason)
    with consumer_riding_out_erp_faults(loaded_large, consumer_log,
                                        tmp_path / "consumers.log"):
        assert _lag(loaded_large) > 0, "the restart would come after the work was done"
        loaded_large.stack.script("restart-pg")


def test_a_row_the_erp_refuses_is_isolated_and_dead_lettered(sync_env: SyncEnv) -> None:
    produce_all(sync_env)
    with sync_env.erp() as erp:  # an ERP rule the CRM does not know about
        erp.execute("ALTER TABLE erp.business_partners ADD CONSTRAINT short_names "
                    "CHECK (deleted OR char_length(full_name) <= 3)")
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES "
                    "('张', '三'), ('欧阳', '娜娜'), ('李', '四')")
    produce_all(sync_env)
    consumer = consume_all(sync_env)
    with sync_env.erp() as erp:
        names = sorted(r[0] for r in erp.execute("SELECT full_name FROM erp.business_partners"))
        letters = erp.execute("SELECT stage, error_class, error_message FROM sync.dead_letters"
                              ).fetchall()
    assert names == ["张三", "李四"]
    assert consumer.applier.dead_lettered == 1
    assert letters[0][:2] == ("apply", "ApplyError")
    assert "CheckViolation" in letters[0][2] and "short_names" in letters[0][2]


def test_an_order_whose_customer_never_arrives_is_dead_lettered_after_the_hold(
        sync_env: SyncEnv) -> None:
    cid, _, order = customer_and_order_records(sync_env, 7, "待付款")
    lonely = on_fresh_topic(sync_env, "orphans", orphan_hold_s=1.0)
    make_producer(lonely).send(lonely.sales_topic, key=order.key, value=order.value).get(30)
    consumer = ErpConsumer(lonely)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        wait_until(lambda: consumer.applier.dead_lettered == 1, timeout=60,
                   message="the orphan to be dead-lettered")
    finally:
        consumer.stop()
        thread.join()
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM sync.held_events").fetchone() == (0,)
        (message,), = erp.execute("SELECT error_message FROM sync.dead_letters").fetchall()
    assert f"customer {cid} did not arrive" in message
    letters = read_topic(lonely, lonely.dlq_topic)
    assert [r.value for r in letters] == [order.value]
