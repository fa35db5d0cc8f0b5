"""`crm-erp-sync replay`: refused while the group has members; a dry run changes nothing;
a replay from a timestamp re-applies exactly what came after it, harmlessly."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.kafka_io import make_admin
from service.operator.replay import group_members
from service.ops import group_lag
from tests.conftest import SyncEnv
from tests.helpers import read_topic, wait_until
from tests.integration.conftest import Cli, Running


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def insert_customers(sync_env: SyncEnv, n: int, prefix: str) -> None:
    with sync_env.crm() as crm:
        for i in range(n):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "(%s, %s, '13912345678')", (prefix, str(i)))


def partners(sync_env: SyncEnv) -> list[tuple[object, ...]]:
    with sync_env.erp() as erp:
        return erp.execute("SELECT crm_customer_id, full_name, source_lsn, source_seq "
                           "FROM erp.business_partners ORDER BY 1").fetchall()


def test_replay_from_a_timestamp_and_refused_while_the_group_is_active(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    topic = settings.sales_topic
    produce_all(sync_env)
    insert_customers(sync_env, 12, "早")
    produce_all(sync_env)
    time.sleep(0.05)  # the broker's timestamps are in ms: a clear boundary
    cut = datetime.now(UTC)
    time.sleep(0.05)
    insert_customers(sync_env, 9, "晚")
    produce_all(sync_env)
    after_cut = [r for r in read_topic(settings, topic) if r.timestamp >= cut.timestamp() * 1000]
    assert len(after_cut) == 9

    consumer = running.start_consumer(settings)
    wait_until(lambda: len(partners(sync_env)) == 21, message="21 partners applied")
    wait_until(lambda: all(p.lag == 0 for p in group_lag(settings)), message="no lag")
    admin = make_admin(settings)
    try:
        wait_until(lambda: group_members(admin, settings.consumer_group)[1],
                   message="the consumer is a group member")
    finally:
        admin.close()
    refused = cli(settings, "replay", "--topic", topic, "--from-beginning")
    assert refused.code == 1
    assert "Stop the consumers" in refused.err and "member" in refused.err
    # A dry run changes nothing, so it is allowed while consumers run, and says who runs.
    live_dry = cli(settings, "replay", "--topic", topic, "--from-beginning", "--dry-run")
    assert live_dry.code == 0, live_dry.err
    assert "would reprocess 21 event(s)" in live_dry.out and "member" in live_dry.out
    assert all(p.lag == 0 for p in group_lag(settings))
    running.stop(consumer)
    before = partners(sync_env)

    dry = cli(settings, "replay", "--topic", topic, "--from-time", cut.isoformat(),
              "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert dry.json["to_reprocess"] == 9 and dry.json["dry_run"] is True
    assert all(p.lag == 0 for p in group_lag(settings))  # nothing changed

    table = cli(settings, "replay", "--topic", topic, "--from-time", cut.isoformat())
    assert table.code == 0, table.err
    assert "will reprocess 9 event(s)" in table.out
    lag = {p.partition: p.lag for p in group_lag(settings) if p.topic == topic}
    assert sum(lag.values()) == 9
    assert lag == {p["partition"]: p["to_reprocess"] for p in dry.json["partitions"]}

    running.start_consumer(settings)
    wait_until(lambda: all(p.lag == 0 for p in group_lag(settings)), message="replayed")
    assert partners(sync_env) == before  # idempotent: the replay changed nothing

    assert cli(settings, "replay", "--topic", "nope", "--from-beginning").code == 2
    assert cli(settings, "replay", "--topic", topic, "--from-offset", "zero").code == 2
    assert cli(settings, "replay", "--topic", topic, "--from-time", "yesterday").code == 2


def test_replay_from_the_beginning_after_dead_letters_changes_no_letter_and_no_hold(
        sync_env: SyncEnv, cli: Cli) -> None:
    """Issue #14 item 5: a customer applied at offset n, its masked-phone update dead-lettered
    at n+1, an order of theirs held behind the letter. A replay from the beginning re-sends
    nothing to the dead-letter topic and holds nothing more (the applied event is older than
    the letter: it is not held behind it)."""
    from service.consumer.pipeline import ErpConsumer
    from tests.helpers import consume_until_caught_up

    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                          "('张', '三', '13912345678') RETURNING customer_id").fetchone()[0]
        crm.execute("UPDATE crm.customers SET phone = '138xxxx5678' WHERE customer_id = %s",
                    (cid,))
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (950, 'X950', %s, '2023-01-01', "
                        "'已发货', '元')", (cid,))
            crm.execute("INSERT INTO crm.order_lines VALUES (950, 1, %s, 'P-PHONE-5G', '手机', "
                        "'10台', 5000)", (cid,))
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(settings))

    def state() -> tuple[int, list[tuple[object, ...]], list[tuple[object, ...]]]:
        with sync_env.erp() as erp:
            held = erp.execute('SELECT topic, partition, "offset", reason FROM '
                               "sync.held_events ORDER BY 1, 2, 3").fetchall()
            letters = erp.execute('SELECT topic, partition, "offset", state FROM '
                                  "sync.dead_letters ORDER BY 1, 2, 3").fetchall()
        return len(read_topic(settings, settings.dlq_topic)), held, letters

    before = state()
    dlq_records, held, letters = before
    assert dlq_records == 1 and len(letters) == 1 and letters[0][3] == "open"
    assert [h[3] for h in held] == ["key_blocked"]  # the order, after the letter
    assert held[0][2] > letters[0][2]

    replayed = cli(settings, "replay", "--topic", settings.sales_topic, "--from-beginning")
    assert replayed.code == 0, replayed.err
    assert sum(p.lag for p in group_lag(settings)) > 0
    consume_until_caught_up(ErpConsumer(settings))
    assert state() == before
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM erp.business_partners WHERE "
                           "crm_customer_id = %s", (str(cid),)).fetchone()[0] == 1
