"""A big CRM transaction is published in pieces as pgoutput sends it (the producer never holds
it whole), while the slot is confirmed past it only once its last piece reached the broker: a
producer that stops after the first piece leaves the slot before the transaction, the next one
re-sends all of it, and the ERP ends with every change, in order per key."""

from __future__ import annotations

from typing import Any

from service.avro import SchemaRegistry
from service.cdc.events import Outgoing
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import read_topic

ROWS, UPDATED, PIECE = 1_000, 100, 200


def _confirmed_before(sync_env: SyncEnv, lsn: str) -> bool:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn < %s::pg_lsn FROM pg_replication_slots "
                          "WHERE slot_name = %s", (lsn, sync_env.settings.slot_name)).fetchone()
    assert row is not None
    return bool(row[0])


def test_a_big_transaction_is_published_in_pieces_and_confirmed_after_its_last(
        sync_env: SyncEnv) -> None:
    settings = sync_env.with_(producer_max_changes=PIECE)
    registry = SchemaRegistry.load(settings.schemas_dir)
    CdcProducer(settings, registry).run(until_idle=True)  # the slot, the empty snapshot
    with sync_env.crm() as crm:
        with crm.transaction():
            first_id = crm.execute(
                "INSERT INTO crm.customers (family_name, given_name, phone) "
                "SELECT '张', '三' || g, '138' || lpad(g::text, 8, '0') "
                "FROM generate_series(1, %s) g RETURNING customer_id", (ROWS,)).fetchall()[0][0]
            # later in the same transaction, the same keys again: order per key must hold
            crm.execute("UPDATE crm.customers SET notes = '已发货' WHERE customer_id < %s",
                        (first_id + UPDATED,))
        row = crm.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        after_commit = row[0]

    crashed = CdcProducer(settings, registry)
    pieces: list[list[Outgoing]] = []
    confirmed_before: list[bool] = []

    def stop_after_first_piece(events: list[Outgoing]) -> None:
        pieces.append(events)
        confirmed_before.append(_confirmed_before(sync_env, after_commit))
        crashed.stop()  # as if killed before the rest of the transaction was read

    crashed.on_acknowledged = stop_after_first_piece
    crashed.run()
    assert [len(p) for p in pieces] == [PIECE]  # one piece acknowledged, not the transaction
    assert confirmed_before == [True]
    assert crashed.stats.transactions == 0
    assert _confirmed_before(sync_env, after_commit)  # still before it after the stop

    again = CdcProducer(settings, registry)
    sizes: list[int] = []
    again.on_acknowledged = lambda events: sizes.append(len(events))
    again.run(until_idle=True)
    assert again.stats.transactions == 1 and again.stats.events == ROWS + UPDATED
    assert max(sizes) <= PIECE  # never more than a piece at a time
    assert not _confirmed_before(sync_env, after_commit)

    # the re-sent piece has the same event ids as the first time
    ids = [r.headers for r in read_topic(settings, settings.sales_topic)]
    event_ids = [dict(h)["event_id"] for h in ids]
    assert len(event_ids) == ROWS + UPDATED + PIECE
    assert len(set(event_ids)) == ROWS + UPDATED
    assert {e.event_id.encode() for e in pieces[0]} <= set(event_ids)

    ErpConsumer(settings).run(until_caught_up=True)
    with sync_env.erp() as erp:
        partners: dict[int, Any] = {int(k): n for k, n in erp.execute(
            "SELECT crm_customer_id, notes FROM erp.business_partners WHERE NOT deleted")}
    assert len(partners) == ROWS
    assert {k for k, n in partners.items() if n == "已发货"} == set(
        range(first_id, first_id + UPDATED))
