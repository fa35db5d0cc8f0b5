"""A producer that dies after the broker acknowledged a batch and before it recorded what the
batch did (a snapshot chunk's progress, the slot's confirmation) sends that batch again when
it restarts: the copies must be recognisable as copies. The crash point is the producer's
``on_acknowledged`` hook (called once every event of a batch is acknowledged, before the
progress is recorded and the slot confirmed), raising past ``run``; the real broker and CRM."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc import dead_letters as capture_letters
from service.cdc.capture import request_snapshot
from service.cdc.events import Outgoing
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.operator import dlq as operator_dlq
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up, decoded_events, read_topic


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the producer handles it)."""


def _crash_after(producer: CdcProducer, wanted: Any) -> list[list[Outgoing]]:
    """Make ``producer`` die once a batch with an event ``wanted`` accepts is acknowledged."""
    seen: list[list[Outgoing]] = []

    def hook(events: list[Outgoing]) -> None:
        if any(wanted(e) for e in events):
            seen.append(events)
            raise Crash
    producer.on_acknowledged = hook
    return seen


def _progress(sync_env: SyncEnv, snapshot_id: int) -> tuple[Any, ...]:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT chunks_done, state FROM crm_erp_sync.snapshots "
                          "WHERE snapshot_id = %s", (snapshot_id,)).fetchone()
    assert row is not None
    return tuple(row)


def test_a_snapshot_chunk_redone_after_a_crash_has_the_same_event_ids(
        sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    registry = SchemaRegistry.load(settings.schemas_dir)
    CdcProducer(settings, registry).run(until_idle=True)  # the slot, the empty snapshot
    with sync_env.crm() as crm:
        keys = [crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                            "VALUES ('张', %s, '138xxxx5678') RETURNING customer_id",
                            (f"三{i}",)).fetchone()[0] for i in range(3)]
    CdcProducer(settings, registry).run(until_idle=True)  # their CREATE events
    with sync_env.crm() as crm:
        snapshot_id = request_snapshot(crm, CdcProducer(settings, registry).profile,
                                       "customer", chunk_size=2)

    crashed = CdcProducer(settings, registry)
    seen = _crash_after(crashed, lambda e: e.record["source"]["snapshot"])
    with pytest.raises(Crash):
        crashed.run(until_idle=True)
    first_chunk = {e.event_id for e in seen[0] if e.record["source"]["snapshot"]}
    assert len(first_chunk) == 2
    assert _progress(sync_env, snapshot_id) == (0, "pending")  # published, not recorded

    CdcProducer(settings, registry).run(until_idle=True)
    assert _progress(sync_env, snapshot_id) == (2, "done")
    reads = [(ev["key"], ev["event_id"]) for _, _, ev, _ in decoded_events(settings)
             if ev["source"]["snapshot"]]
    copies = Counter(reads)
    # every row read once more for the redone chunk, under the same id as the first time
    assert sorted(copies.values()) == [1, 2, 2]
    assert {eid for (_, eid), n in copies.items() if n == 2} == first_chunk
    assert {key for key, _ in copies} == {str(k) for k in keys}
    assert len({eid for _, eid in reads}) == len(keys)  # one id per row


def test_a_capture_letter_resent_after_a_crash_is_one_letter(sync_env: SyncEnv) -> None:
    """The letter is on the dead-letter topic and its marker acknowledged, the slot not yet
    confirmed: the restarted producer reads the change again. Its letter is the same letter
    (same event id), on the dead-letter topic once, and `dlq list` shows one."""
    settings = sync_env.settings
    registry = SchemaRegistry.load(settings.schemas_dir)
    CdcProducer(settings, registry).run(until_idle=True)  # the slot, the empty snapshot
    with sync_env.crm() as crm:
        nan = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                          "purchase_amount) VALUES ('李', '娜', '13912345678', 'NaN') "
                          "RETURNING customer_id").fetchone()[0]

    crashed = CdcProducer(settings, registry)
    crashed.on_acknowledged = _crash_always  # the first batch: the NaN's transaction
    with pytest.raises(Crash):
        crashed.run(until_idle=True)
    assert crashed.stats.dead_letters == 1
    again = CdcProducer(settings, registry)
    again.run(until_idle=True)
    assert again.stats.transactions >= 1  # the NaN's transaction was read again

    markers = [r for r in read_topic(settings, settings.sales_topic)
               if capture_letters.is_marker(r.value)]
    assert len(markers) == 2  # the marker is re-sent: at-least-once, as every event
    letters = read_topic(settings, settings.dlq_topic)
    assert len(letters) == 1, [dict(r.headers) for r in letters]
    # both markers point at that one letter
    places = {(m.dlq_partition, m.dlq_offset)
              for m in (capture_letters.read_marker(r.value) for r in markers)}
    assert places == {(letters[0].partition, letters[0].offset)}
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.caught_up
    listed = operator_dlq.list_letters(settings, key=str(nan))
    assert [(d.stage, d.dlq_partition, d.dlq_offset) for d in listed] == [
        ("capture", letters[0].partition, letters[0].offset)]


def _crash_always(events: list[Outgoing]) -> None:
    raise Crash
