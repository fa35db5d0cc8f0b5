"""The dead-letter circuit breaker against the real broker and ERP: a burst of invalid
messages on one partition pauses that partition only; the process stays up and applies the
others; `status`, `/readyz` and a metric say so; `resume` continues; the state survives a
restart; a restart with a cold window does not trip. And `consume --until-caught-up`."""

from __future__ import annotations

import threading
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.demo.load import load_demo
from service.erp.mappings import Mappings
from service.kafka_io import make_producer
from service.ops import group_lag
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import (
    actual_erp,
    consume_until_caught_up,
    expected_erp,
    read_topic,
    wait_until,
)
from tests.integration.conftest import Cli


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def send_garbage(settings: Settings, partition: int, n: int, tag: str) -> None:
    producer = make_producer(settings)
    for i in range(n):
        producer.send(settings.sales_topic, key=f"{tag}-{i}".encode(), value=b"not avro",
                      partition=partition)
    producer.flush()
    producer.close()


def letters(sync_env: SyncEnv, partition: int) -> int:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT count(*) FROM sync.dead_letters WHERE partition = %s",
                          (partition,)).fetchone()
    return int(row[0]) if row else 0


def partners(sync_env: SyncEnv) -> set[str]:
    with sync_env.erp() as erp:
        return {r[0] for r in erp.execute("SELECT crm_customer_id FROM erp.business_partners")}


def partition_lag(settings: Settings, partition: int) -> int:
    return sum(p.lag for p in group_lag(settings)
               if p.topic == settings.sales_topic and p.partition == partition)


def test_a_burst_on_one_partition_pauses_it_alone_until_resumed(
        sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.with_(breaker_min_messages=50, breaker_window_s=300.0,
                              breaker_poll_s=0.5)
    produce_all(sync_env)  # the slot: what follows is streamed
    consumer = ErpConsumer(settings)
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        send_garbage(settings, 1, 300, "burst")
        trips = wait_until(lambda: cli(settings, "status", "--json").json["breaker"],
                           timeout=90, message="the breaker to trip")
        (trip,) = trips
        assert trip["partition"] == 1 and trip["topic"] == settings.sales_topic
        assert trip["dead_letters"] == trip["messages"] >= 50
        assert trip["message"].startswith(
            f"tripped: 100% of the last {trip['messages']} messages on "
            f"{settings.sales_topic}[1] were dead letters, limit 50%")
        assert trip["last_reasons"] and all(r.startswith("DecodeError") for r in
                                            trip["last_reasons"])
        assert letters(sync_env, 1) == 0  # nothing drained into the DLQ
        status = cli(settings, "status")
        assert status.code == 1
        assert f"circuit breaker open on {settings.sales_topic}[1]" in status.out
        assert f"resume --partition {settings.sales_topic}:1" in status.out
        # Waited for: on a loaded machine the group may be rebalancing at this moment (then
        # /readyz says outside_group first, which membership heals by itself).
        body = wait_until(lambda: (r := consumer.health.readiness())[1]["state"] == "degraded"
                          and not r[0] and r[1], timeout=60, message="/readyz degraded")
        assert "tripped: 100%" in body["breaker_open"][0]
        metric = (f'crm_erp_sync_breaker_open{{partition="1",topic="{settings.sales_topic}"}} '
                  "1.0")
        assert metric in consumer.metrics.exposition().decode()

        # Good traffic meanwhile: the other partitions keep applying.
        with sync_env.crm() as crm:
            for i in range(30):
                crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                            "VALUES ('王', %s, '13912345678')", (str(i),))
        produce_all(sync_env)
        by_partition: dict[int, set[str]] = {}
        registry = SchemaRegistry.load(settings.schemas_dir)
        for record in read_topic(settings, settings.sales_topic):
            if record.value != b"not avro":
                _, event = registry.decode(record.value)
                by_partition.setdefault(record.partition, set()).add(
                    event["key"])
        elsewhere = by_partition.get(0, set()) | by_partition.get(2, set())
        paused = by_partition.get(1, set())
        assert elsewhere and paused, "the keys should spread over the partitions"
        wait_until(lambda: elsewhere <= partners(sync_env), timeout=90,
                   message="partitions 0 and 2 applied while 1 is paused")
        assert not paused & partners(sync_env)
        assert thread.is_alive() and not crashed  # the process did not exit

        resumed = cli(settings, "resume", "--partition", f"{settings.sales_topic}:1",
                      "--reason", "looked at the burst: test garbage", "--actor", "ops")
        assert resumed.code == 0, resumed.err
        assert f"resumed {settings.sales_topic}[1]" in resumed.out
        wait_until(lambda: paused <= partners(sync_env), timeout=90,
                   message="partition 1 to continue after the resume")
        wait_until(lambda: partition_lag(settings, 1) == 0, timeout=60, message="no lag")
        assert letters(sync_env, 1) == 300
        wait_until(lambda: consumer.health.readiness()[0], timeout=30, message="ready again")
        assert metric not in consumer.metrics.exposition().decode()
        assert cli(settings, "status", "--json").json["breaker"] == []
        with sync_env.erp() as erp:
            assert erp.execute("SELECT state, resumed_by, resume_reason FROM "
                               "sync.breaker_trips").fetchall() == [
                ("resumed", "ops", "looked at the burst: test garbage")]
        # Resuming a partition that is not tripped, or --all with nothing tripped, is a no-op
        # that succeeds and says so; a partition that does not exist is an error.
        not_paused = cli(settings, "resume", "--partition", f"{settings.sales_topic}:2",
                         "--reason", "x")
        assert not_paused.code == 0, not_paused.err
        assert f"{settings.sales_topic}[2] was not paused; nothing to resume" in not_paused.out
        nothing = cli(settings, "resume", "--all", "--reason", "x")
        assert nothing.code == 0 and "Nothing to resume" in nothing.out
        assert cli(settings, "resume", "--partition", "no-number", "--reason", "x").code == 2
    finally:
        consumer.stop()
        thread.join(60)
    assert not crashed


def test_cold_windows_after_restarts_and_a_trip_that_survives_one(sync_env: SyncEnv,
                                                                  cli: Cli) -> None:
    settings = sync_env.with_(breaker_min_messages=50, breaker_window_s=300.0)
    # 30 invalid messages: under the minimum, dead-lettered, no trip.
    send_garbage(settings, 0, 30, "first")
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.caught_up and not stats.blocked and letters(sync_env, 0) == 30
    # A restart, 30 more: one process would now see 60 of 60 in its window, a restarted one
    # starts cold (what used to crash-loop the group) and does not trip.
    send_garbage(settings, 0, 30, "second")
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.caught_up and letters(sync_env, 0) == 60

    # 80 on partition 2 trip it; the trip is kept across restarts until resumed.
    send_garbage(settings, 2, 80, "burst")
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.blocked == [f"{settings.sales_topic}[2]"] and not stats.caught_up
    restarted = cli(settings, "consume", "--until-caught-up")
    assert restarted.code == 1 and f"{settings.sales_topic}[2]" in restarted.err
    assert letters(sync_env, 2) == 0 and partition_lag(settings, 2) == 80
    assert cli(settings, "resume", "--all", "--reason", "checked").code == 0
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.caught_up and letters(sync_env, 2) == 80


def assert_erp_matches_crm(sync_env: SyncEnv) -> None:
    mappings = Mappings.load(sync_env.settings.mappings_file)
    with sync_env.crm() as crm, sync_env.erp() as erp:
        assert actual_erp(erp) == expected_erp(crm, mappings)


def topic_records(settings: Settings) -> int:
    return sum(len(read_topic(settings, t)) for t in (settings.sales_topic,
                                                      settings.market_topic))


def test_until_caught_up_twice_applies_exactly_what_was_new(sync_env: SyncEnv,
                                                           cli: Cli) -> None:
    settings = sync_env.settings
    load_demo(settings.crm_dsn, customers=40, orders=80, rate=None, seed=5, changes=20)
    produce_all(sync_env)
    first = cli(settings, "consume", "--until-caught-up")
    assert first.code == 0, first.err
    assert_erp_matches_crm(sync_env)
    assert all(p.lag == 0 for p in group_lag(settings))
    before = topic_records(settings)

    with sync_env.crm() as crm:  # the changes of the next period
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('赵', '六', '13912345678'), ('钱', '七', '13912345679')")
        crm.execute("UPDATE crm.customers SET phone = '13700000000' WHERE customer_id = "
                    "(SELECT min(customer_id) FROM crm.customers)")
    produce_all(sync_env)
    new = topic_records(settings) - before
    assert new == 3
    second = ErpConsumer(settings)
    stats: Any = consume_until_caught_up(second)
    assert stats.caught_up and stats.messages == new and second.applier.applied == new
    assert_erp_matches_crm(sync_env)
