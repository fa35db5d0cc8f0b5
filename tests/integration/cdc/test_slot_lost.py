"""A slot whose WAL PostgreSQL removed (max_slot_wal_keep_size): fail loudly, or resync.

These tests lose their slot on purpose, so their CRM database lives on a private, throwaway
cluster whose max_slot_wal_keep_size is 16MB (``small_wal_env``, tests/conftest.py): the
setting is cluster-wide, and shrinking it on a shared server would invalidate everyone else's
idle or lagging slots there too. The ERP, broker and topics are the shared stack's as usual."""

from __future__ import annotations

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.errors import SlotLost
from tests.conftest import SMALL_WAL_KEEP, SyncEnv
from tests.helpers import decoded_events, wait_until
from tests.integration.conftest import Cli, Running


def lose_the_slot(sync_env: SyncEnv) -> None:
    """Write ~80 MB of WAL past the test's slot and checkpoint: the server removes WAL the slot
    still needs and marks it 'lost'. Only on small_wal_env's private cluster: it refuses to run
    (before writing anything) on a server whose max_slot_wal_keep_size is not SMALL_WAL_KEEP,
    where its CHECKPOINT would act on slots that are not the test's."""
    with sync_env.crm() as crm:
        keep = crm.execute("SHOW max_slot_wal_keep_size").fetchone()
        assert keep == (SMALL_WAL_KEEP,), (
            f"max_slot_wal_keep_size is {keep and keep[0]}: lose_the_slot runs only on "
            "small_wal_env's private cluster, never on a shared server")
        crm.execute("CREATE TEMP TABLE pad (t text)")
        for _ in range(4):
            crm.execute("INSERT INTO pad SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
            crm.execute("SELECT pg_switch_wal()")
        crm.execute("CHECKPOINT")
        (status,) = crm.execute("SELECT wal_status FROM pg_replication_slots "
                                "WHERE slot_name = %s", (sync_env.settings.slot_name,)).fetchone()
    assert status == "lost"


def producer(sync_env: SyncEnv, **overrides: str) -> CdcProducer:
    settings = sync_env.with_(**overrides)
    return CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))


def test_a_lost_slot_fails_loudly_or_resyncs_with_a_new_snapshot(
        small_wal_env: SyncEnv) -> None:
    sync_env = small_wal_env
    producer(sync_env).run(until_idle=True)
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES ('张', '三')")
    producer(sync_env).run(until_idle=True)
    lose_the_slot(sync_env)
    with sync_env.crm() as crm:  # a change nobody captured: its WAL is gone too
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES ('李', '四')")

    with pytest.raises(SlotLost, match="resnapshot"):
        producer(sync_env).run(until_idle=True)

    resync = producer(sync_env, on_slot_lost="resnapshot")
    resync.run(until_idle=True)
    assert resync.stats.snapshot_rows == 2
    reads = sorted(ev["after"]["given_name"] for _, _, ev, _ in decoded_events(sync_env.settings)
                   if ev["op"] == "READ")
    assert reads == ["三", "四"]


def test_a_lost_slot_stops_an_always_on_producer_until_resync_which_recovers_deletes(
        small_wal_env: SyncEnv, cli: Cli, running: Running) -> None:
    sync_env = small_wal_env
    settings = sync_env.settings
    with sync_env.crm() as crm:
        ids = [crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES "
                           "(%s, %s) RETURNING customer_id", name).fetchone()[0]
               for name in (("张", "三"), ("李", "四"))]
    producer(sync_env).run(until_idle=True)
    consumer = running.start_consumer(settings)
    wait_until(lambda: erp_live(sync_env) == {str(i) for i in ids}, timeout=60,
               message="both customers in the ERP")
    lose_the_slot(sync_env)
    with sync_env.crm() as crm:  # deleted while the slot was lost
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (ids[1],))

    always_on = running.start_producer(settings)
    body = wait_until(lambda: (lambda r: r[1] if not r[0] and r[1].get("problem") == "slot_lost"
                               else None)(always_on.health.readiness()), timeout=60,
                      message="capture stopped on the lost slot")
    assert body["state"] == "capture_stopped" and "crm-erp-sync resync" in body["recover"]
    status = cli(settings, "status", "--json")
    assert status.code == 1
    assert any(a.startswith("capture stopped") and "is lost" in a
               for a in status.json["attention"])

    done = cli(settings, "resync", "--wait", "120")
    assert done.code == 0, done.out + done.err
    wait_until(lambda: erp_live(sync_env) == {str(ids[0])}, timeout=60,
               message="the customer deleted while the slot was lost is deleted in the ERP")
    assert consumer is not None


def erp_live(sync_env: SyncEnv) -> set[str]:
    with sync_env.erp() as erp:
        return {r[0] for r in erp.execute("SELECT crm_customer_id FROM erp.business_partners "
                                           "WHERE NOT deleted").fetchall()}
