"""A replication slot or publication dropped under a running producer: capture stops, named,
the producer stays up (not ready), `status` says so with the recovery, and `crm-erp-sync
resync` recovers, including rows deleted in the CRM while nothing was captured."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from service.cdc import pgoutput
from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running, caught_up

NAMES = [("张", "三"), ("李", "四"), ("王", "五")]


def start(sync_env: SyncEnv, running: Running) -> tuple[CdcProducer, dict[str, int]]:
    with sync_env.crm() as crm:
        ids = {f + g: crm.execute("INSERT INTO crm.customers (family_name, given_name) "
                                  "VALUES (%s, %s) RETURNING customer_id", (f, g)).fetchone()[0]
               for f, g in NAMES}
    producer = running.start_producer(sync_env.settings)
    running.start_consumer(sync_env.settings)
    caught_up(sync_env)
    return producer, ids


def erp_partners(sync_env: SyncEnv) -> dict[str, bool]:
    """crm_customer_id -> deleted"""
    with sync_env.erp() as erp:
        return dict(erp.execute("SELECT crm_customer_id, deleted FROM erp.business_partners"
                                ).fetchall())


def stopped_with(producer: CdcProducer, problem: str) -> dict[str, Any] | None:
    ready, body = producer.health.readiness()
    return body if not ready and body.get("problem") == problem else None


def drop_slot_under(sync_env: SyncEnv) -> None:
    """What a DBA does to drop an active slot: end its walsender, drop it before the producer
    reconnects (retried until it wins)."""
    slot = sync_env.settings.slot_name
    deadline = time.monotonic() + 30
    with sync_env.crm() as crm:
        while True:
            crm.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            try:
                crm.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                assert time.monotonic() < deadline, "could not drop the slot"
                time.sleep(0.05)


def drop_publication_then_change(sync_env: SyncEnv, ids: dict[str, int]) -> int:
    """DROP PUBLICATION, then a delete (王五) and an insert nobody captures; the insert's id."""
    with sync_env.crm() as crm:
        crm.execute(sql.SQL("DROP PUBLICATION {}").format(
            sql.Identifier(sync_env.settings.publication_name)))
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (ids["王五"],))
        (added,) = crm.execute("INSERT INTO crm.customers (family_name, given_name) "
                               "VALUES ('赵', '六') RETURNING customer_id").fetchone()
    return int(added)


def recovers(sync_env: SyncEnv, cli: Cli, ids: dict[str, int], deleted: str, added: int,
             named: str) -> None:
    status = cli(sync_env.settings, "status", "--json")
    assert status.code == 1
    stopped = [a for a in status.json["attention"] if a.startswith("capture stopped")]
    assert len(stopped) == 1 and named in stopped[0] and "crm-erp-sync resync" in stopped[0]

    done = cli(sync_env.settings, "resync", "--wait", "120")
    assert done.code == 0, done.out + done.err
    assert "Delete pass done: 1 ERP row(s)" in done.out

    caught_up(sync_env)
    want = {str(i): k == deleted for k, i in ids.items()} | {str(added): False}
    wait_until(lambda: erp_partners(sync_env) == want, timeout=60,
               message="ERP: the gap's delete and insert applied, the rest intact")
    healthy = cli(sync_env.settings, "status", "--json")
    assert healthy.code == 0, healthy.json["attention"]
    again = cli(sync_env.settings, "resync")
    assert again.code == 0 and "Nothing to resync" in again.out
    # newcomer6 F18: the pass reached only this ERP; another group's ERP needs reconcile
    assert "reached only the ERP that `resync` ran against" in again.out
    assert "`reconcile --repair`" in again.out


def test_a_slot_dropped_while_running_is_named_and_resync_deletes_what_the_gap_deleted(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    producer, ids = start(sync_env, running)
    drop_slot_under(sync_env)
    with sync_env.crm() as crm:  # nobody captures these
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (ids["李四"],))
        (added,) = crm.execute("INSERT INTO crm.customers (family_name, given_name) "
                               "VALUES ('赵', '六') RETURNING customer_id").fetchone()

    body = wait_until(lambda: stopped_with(producer, "slot_dropped"), timeout=60,
                      message="producer stopped capture, named")
    assert body["state"] == "capture_stopped" and "crm-erp-sync resync" in body["recover"]
    assert producer.health.liveness()[0]  # up and looping, not crashed
    recovers(sync_env, cli, ids, "李四", added, "was dropped")


def test_a_publication_dropped_while_running_is_named_and_recovered_by_resync(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    producer, ids = start(sync_env, running)
    added = drop_publication_then_change(sync_env, ids)

    wait_until(lambda: stopped_with(producer, "publication_dropped"), timeout=60,
               message="producer stopped capture, named")
    recovers(sync_env, cli, ids, "王五", added, "publication")


def test_a_slot_replaced_under_a_lost_stream_is_named_not_read_from_its_new_position(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    producer, ids = start(sync_env, running)
    slot = sync_env.settings.slot_name
    deadline = time.monotonic() + 30
    with sync_env.crm() as crm:
        while True:  # end the walsender; drop and create the slot again in one statement
            crm.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            try:
                crm.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            except psycopg.errors.ObjectInUse:
                assert time.monotonic() < deadline, "could not drop the slot"
                time.sleep(0.05)
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (ids["张三"],))
        (added,) = crm.execute("INSERT INTO crm.customers (family_name, given_name) "
                               "VALUES ('赵', '六') RETURNING customer_id").fetchone()
        crm.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))

    body = wait_until(lambda: stopped_with(producer, "slot_replaced")
                      or stopped_with(producer, "slot_dropped"), timeout=60,
                      message="producer stopped capture, named")
    assert body["state"] == "capture_stopped"
    recovers(sync_env, cli, ids, "张三", added, "slot")


def _slot_positions(sync_env: SyncEnv) -> tuple[int, int, int | None]:
    """The slot's confirmed_flush_lsn, restart_lsn and walsender pid."""
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn::text, restart_lsn::text, active_pid "
                          "FROM pg_replication_slots WHERE slot_name = %s",
                          (sync_env.settings.slot_name,)).fetchone()
    assert row is not None
    return pgoutput.str_to_lsn(row[0]), pgoutput.str_to_lsn(row[1]), row[2]


def test_a_publication_dropped_after_an_idle_reconnect_is_not_taken_for_a_replaced_slot(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    """newcomer9's F5: after the stream was lost and opened again, psycopg2 confirmed the idle
    slot up to keepalives' WAL end (restart_lsn following), past the bound the producer kept
    from the reconnect; a DROP PUBLICATION then ended the stream and was named slot_replaced."""
    producer, ids = start(sync_env, running)
    _, _, walsender = _slot_positions(sync_env)
    with sync_env.crm() as crm:  # the stream is lost; the producer opens it again
        crm.execute("SELECT pg_terminate_backend(%s)", (walsender,))
    wait_until(lambda: (p := _slot_positions(sync_env)[2]) is not None and p != walsender,
               timeout=60, message="the stream opened again")
    confirmed_then, _, _ = _slot_positions(sync_env)
    # Idle CRM; another database of the cluster writes WAL: keepalives move the slot.
    with sync_env.erp() as erp:
        erp.execute("CREATE TABLE wal_filler (pad text)")
        erp.execute("INSERT INTO wal_filler SELECT repeat(md5(i::text), 32) "
                    "FROM generate_series(1, 20000) i")
        erp.execute("DROP TABLE wal_filler")
    wait_until(lambda: _slot_positions(sync_env)[1] > confirmed_then, timeout=120,
               message="the idle slot's restart_lsn moved past the reconnect's position")
    added = drop_publication_then_change(sync_env, ids)

    wait_until(lambda: stopped_with(producer, "publication_dropped"), timeout=60,
               message="producer stopped capture, named publication_dropped")
    recovers(sync_env, cli, ids, "王五", added, "publication")
