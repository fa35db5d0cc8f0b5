"""The slot's confirmed position never passes a transaction the broker did not acknowledge."""

from __future__ import annotations

import socket
import threading

import pytest

from service.avro import SchemaRegistry
from service.cdc import pgoutput
from service.cdc.producer import CdcProducer
from service.kafka_io import ensure_topics, make_admin, make_producer
from service.metrics import PREFIX
from tests.conftest import SyncEnv
from tests.helpers import decoded_events, wait_until


def confirmed_flush(sync_env: SyncEnv) -> int:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                          "WHERE slot_name = %s", (sync_env.settings.slot_name,)).fetchone()
    assert row is not None and row[0] is not None
    return pgoutput.str_to_lsn(row[0])


def add_customer(sync_env: SyncEnv, given: str) -> int:
    with sync_env.crm() as crm:
        row = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                          "('张', %s, '138 1234 5678') RETURNING customer_id", (given,)
                          ).fetchone()
    assert row is not None
    return int(row[0])


def commit_lsn_of(sync_env: SyncEnv, customer_id: int) -> int | None:
    for key, _, event, _ in decoded_events(sync_env.settings):
        if key == str(customer_id).encode():
            return int(event["source"]["lsn"])
    return None


@pytest.mark.parametrize("transport", ["stream", "sql"])
def test_no_confirmation_while_the_broker_refuses_then_confirmation_after(
        sync_env: SyncEnv, transport: str) -> None:
    settings = sync_env.with_(capture_transport=transport)
    registry = SchemaRegistry.load(settings.schemas_dir)
    CdcProducer(settings, registry).run(until_idle=True)  # slot, empty initial snapshot
    admin = make_admin(settings)
    try:
        # The broker stops taking the producer's events: their topic is gone (and topics
        # are never auto-created).
        admin.delete_topics([settings.sales_topic])
        wait_until(lambda: settings.sales_topic not in admin.list_topics(), timeout=60,
                   message="the topic to be deleted")
        cid = add_customer(sync_env, "三")
        producer = CdcProducer(settings, registry,
                               kafka_producer=make_producer(settings, max_block_ms=500))
        runner = threading.Thread(target=producer.run)
        runner.start()
        try:
            def retries() -> float:
                value = producer.metrics.registry.get_sample_value(
                    f"{PREFIX}_transient_failures_total")
                return value or 0.0

            seen: list[int] = []

            def failed_a_few_times() -> bool:
                seen.append(confirmed_flush(sync_env))
                return retries() >= 2

            # Failed publishes over many seconds (after the first, the rebuilt Kafka producer
            # blocks up to its max_block_ms on the missing topic): psycopg2 reports positions
            # every second and answers keepalives; none of that may confirm the transaction.
            wait_until(failed_a_few_times, timeout=240, interval=0.3,
                       message="the producer to fail publishing a few times")
            assert producer.stats.events == 0
            ensure_topics(settings)  # the broker takes events again
            wait_until(lambda: producer.stats.events >= 1, timeout=120,
                       message="the held-back event to be published")
            commit_lsn = commit_lsn_of(sync_env, cid)
            assert commit_lsn is not None
            # Before the publish succeeded, the slot stayed before the transaction's commit...
            assert max(seen) <= commit_lsn, (pgoutput.lsn_to_str(max(seen)),
                                             pgoutput.lsn_to_str(commit_lsn))
            # ... and after it, the slot moves past it.
            wait_until(lambda: confirmed_flush(sync_env) > commit_lsn, timeout=30,
                       message="the slot to be confirmed past the published transaction")
        finally:
            producer.stop()
            runner.join(timeout=60)
    finally:
        admin.close()


def test_a_producer_that_cannot_reach_the_broker_confirms_nothing(sync_env: SyncEnv) -> None:
    registry = SchemaRegistry.load(sync_env.settings.schemas_dir)
    CdcProducer(sync_env.settings, registry).run(until_idle=True)
    before = confirmed_flush(sync_env)
    cid = add_customer(sync_env, "四")
    dead = sync_env.with_(kafka_bootstrap=f"127.0.0.1:{_free_port()}")
    stuck = CdcProducer(dead, registry)
    # An always-on producer does not exit when the broker is unreachable: it retries (with
    # backoff) and confirms nothing meanwhile.
    runner = threading.Thread(target=stuck.run, kwargs={"until_idle": True}, daemon=True)
    runner.start()
    try:
        wait_until(lambda: stuck.metrics.retries._value.get() >= 2, timeout=120,
                   message="the producer retrying the unreachable broker")
        assert runner.is_alive()
    finally:
        stuck.stop()
        runner.join(timeout=60)
    assert not runner.is_alive()
    after_failure = confirmed_flush(sync_env)
    producer = CdcProducer(sync_env.settings, registry)
    producer.run(until_idle=True)
    assert producer.stats.events == 1
    commit_lsn = commit_lsn_of(sync_env, cid)
    assert commit_lsn is not None
    assert before <= after_failure <= commit_lsn
    assert confirmed_flush(sync_env) > commit_lsn


def _free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
