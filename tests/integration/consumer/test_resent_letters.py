"""A producer that crashed re-sends its unconfirmed transactions (at-least-once): the same
events, the same event ids, at new offsets. An event that already has its dead letter (open
or resolved) is not a new failure: no second letter row, no second record on the dead-letter
topic, no second count; a re-send is exactly the same record (key, value, headers) sent
again, so the tests send it again through a KafkaProducer, against the real broker and ERP."""

from __future__ import annotations

import json
from typing import Any

from service.avro import SchemaRegistry
from service.cdc import dead_letters as capture_letters
from service.consumer.pipeline import ErpConsumer
from service.consumer.policy import DlqLimit
from service.kafka_io import make_producer
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up, read_topic
from tests.integration.conftest import Cli
from tests.integration.consumer.test_applier import produce_all


def consume(sync_env: SyncEnv) -> ErpConsumer:
    consumer = ErpConsumer(sync_env.settings, dlq_limit=DlqLimit.DISABLED)
    stats = consume_until_caught_up(consumer)
    assert stats.caught_up and not stats.blocked
    return consumer


def resend(settings: Settings, records: list[Any]) -> list[tuple[int, int]]:
    """Send these records again, as they are, to their partitions; their new places."""
    producer = make_producer(settings)
    try:
        futures = [producer.send(r.topic, key=r.key, value=r.value, headers=list(r.headers),
                                 partition=r.partition) for r in records]
        producer.flush()
        return [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    finally:
        producer.close()


def letters(sync_env: SyncEnv) -> list[tuple[Any, ...]]:
    with sync_env.erp() as erp:
        return erp.execute('SELECT dead_letter_id, msg_key, event_id, stage, state, "offset" '
                           "FROM sync.dead_letters ORDER BY dead_letter_id").fetchall()


def held(sync_env: SyncEnv) -> list[tuple[Any, ...]]:
    with sync_env.erp() as erp:
        return erp.execute('SELECT "offset", reason FROM sync.held_events ORDER BY "offset"'
                           ).fetchall()


def event_ids(sync_env: SyncEnv, records: list[Any]) -> list[str]:
    registry = SchemaRegistry.load(sync_env.settings.schemas_dir)
    return [registry.decode(r.value)[1]["event_id"] for r in records]


def test_a_resent_order_with_an_open_then_resolved_letter_is_not_a_new_failure(
        sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                          "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():  # the demo's product without an ERP mapping
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status) VALUES (901, 'X901', %s, '2023-01-01', '已付款')",
                        (cid,))
            crm.execute("INSERT INTO crm.order_lines VALUES (901, 1, %s, 'P-HOVERBOARD', "
                        "'平衡车', '10台', 5000)", (cid,))
        crm.execute("UPDATE crm.sales_orders SET status = '已发货' WHERE order_id = 901")
    produce_all(sync_env)
    first = consume(sync_env)
    assert first.applier.dead_lettered == 1
    [(letter_id, key, event_id, stage, state, offset)] = letters(sync_env)
    assert (key, stage, state) == (str(cid).encode(), "transform", "open")
    records = [r for r in read_topic(settings, settings.sales_topic) if r.key == key]
    failing = next(r for r in records if r.offset == offset)
    assert event_ids(sync_env, [failing]) == [event_id]
    update = [r for r in records if r.offset > offset]
    assert len(update) == 1 and held(sync_env) == [(update[0].offset, "key_blocked")]

    # The producer re-sends the transaction and what followed: the copy of the failing event
    # is its letter's (not held, not lettered), the update's copy waits behind the letter.
    (_, copy_at), (_, update_copy_at) = resend(settings, [failing, *update])
    again = consume(sync_env)
    assert again.applier.dead_lettered == 0
    assert letters(sync_env) == [(letter_id, key, event_id, "transform", "open", offset)]
    assert len(read_topic(settings, settings.dlq_topic)) == 1
    assert held(sync_env) == [(update[0].offset, "key_blocked"),
                              (update_copy_at, "key_blocked")]
    assert copy_at not in {at for at, _ in held(sync_env)}

    # Resolved (discarded): a later re-send is dropped as already handled.
    gone = cli(settings, "dlq", "discard", str(letter_id), "--reason", "no such product")
    assert gone.code == 0, gone.out + gone.err
    resend(settings, [failing])
    third = consume(sync_env)
    assert third.applier.dead_lettered == 0
    assert [(i, s) for i, _, _, _, s, _ in letters(sync_env)] == [(letter_id, "discarded")]
    assert len(read_topic(settings, settings.dlq_topic)) == 1
    assert held(sync_env) == []  # the discard released the key


def test_a_customer_resent_before_its_letter_was_filed_gets_one_letter(
        sync_env: SyncEnv) -> None:
    """Both copies in the consumer's same poll: the letter is filed once, for the first."""
    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                          "('张', '三', '138xxxx5678') RETURNING customer_id").fetchone()[0]
    produce_all(sync_env)
    [original] = [r for r in read_topic(settings, settings.sales_topic)
                  if r.key == str(cid).encode()]
    resend(settings, [original])
    consumer = consume(sync_env)
    assert consumer.applier.dead_lettered == 1
    [(_, key, event_id, stage, state, offset)] = letters(sync_env)
    assert (key, stage, state, offset) == (str(cid).encode(), "transform", "open",
                                           original.offset)
    assert [event_id] == event_ids(sync_env, [original])
    dlq = read_topic(settings, settings.dlq_topic)
    assert [(r.key, r.value) for r in dlq] == [(original.key, original.value)]
    assert held(sync_env) == []
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM erp.business_partners").fetchone() == (0,)


def test_a_resent_capture_letter_is_recorded_once(sync_env: SyncEnv) -> None:
    """The producer re-sends a capture letter too (to the dead-letter topic, and its marker
    pointing there): the consumer records the first one only."""
    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        nan = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                          "purchase_amount) VALUES ('李', '娜', '13912345678', 'NaN') "
                          "RETURNING customer_id").fetchone()[0]
    produce_all(sync_env)
    first = consume(sync_env)
    assert first.applier.dead_lettered == 1
    [(letter_id, key, event_id, stage, state, _)] = letters(sync_env)
    assert (key, stage, state) == (str(nan).encode(), "capture", "open") and event_id
    [marker] = [r for r in read_topic(settings, settings.sales_topic)
                if r.key == key and capture_letters.is_marker(r.value)]
    [letter] = read_topic(settings, settings.dlq_topic)

    # What the restarted producer sends: the letter again, then a marker pointing at it.
    [(part, off)] = resend(settings, [letter])
    doc = json.loads(marker.value[len(capture_letters.MARKER):])
    assert doc["event_id"] == event_id
    value = capture_letters.MARKER + json.dumps(
        {**doc, "dlq_partition": part, "dlq_offset": off}, ensure_ascii=False).encode()
    producer = make_producer(settings)
    try:
        producer.send(marker.topic, key=marker.key, value=value, headers=list(marker.headers),
                      partition=marker.partition).get(timeout=30)
    finally:
        producer.close()
    again = consume(sync_env)
    assert again.applier.dead_lettered == 0
    assert [(i, s) for i, _, _, _, s, _ in letters(sync_env)] == [(letter_id, "open")]
    assert held(sync_env) == []
