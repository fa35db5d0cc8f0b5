"""A slot whose WAL PostgreSQL removed (max_slot_wal_keep_size): fail loudly, or resync."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.errors import SlotLost
from tests.conftest import SyncEnv
from tests.helpers import decoded_events, wait_until
from tests.integration.conftest import Cli, Running


@pytest.fixture
def small_wal_keep(sync_env: SyncEnv) -> Iterator[None]:
    """Let the server drop WAL a slot needs after 16 MB. Cluster-wide, restored afterwards:
    the CHECKPOINT also invalidates any other idle slot far behind (e.g. a stopped demo's)."""
    with sync_env.crm() as crm:
        crm.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '16MB'")
        crm.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with sync_env.crm() as crm:
            crm.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            crm.execute("SELECT pg_reload_conf()")


def lose_the_slot(sync_env: SyncEnv) -> None:
    with sync_env.crm() as crm:
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
        sync_env: SyncEnv, small_wal_keep: None) -> None:
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
        sync_env: SyncEnv, small_wal_keep: None, cli: Cli, running: Running) -> None:
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
