"""The slot guard's recorded ceiling stays ahead of what psycopg2 confirms by itself.

psycopg2 reports an idle stream as flushed up to a keepalive's WAL end, and the WAL end is the
cluster's: other databases' writes move it. A ceiling raised only by our own batches (and every
5 s) was passed when the cluster wrote a few dozen MiB quickly, and the next producer took its
own slot for a replaced one (``slot_replaced``: capture stopped until ``resync``)."""

from __future__ import annotations

from service.cdc import pgoutput
from service.cdc.slot_guard import CEILING_SLACK, STATE_TABLE
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Running, capture_ready

BYTES_OF_WAL = 3 * CEILING_SLACK  # written by another database of the cluster


def _ceiling_and_confirmed(sync_env: SyncEnv) -> tuple[int, int]:
    with sync_env.crm() as crm:
        row = crm.execute(
            f"SELECT s.confirmed_ceiling::text, r.confirmed_flush_lsn::text FROM {STATE_TABLE} s"
            " JOIN pg_replication_slots r USING (slot_name) WHERE slot_name = %s",
            (sync_env.settings.slot_name,)).fetchone()
    assert row is not None
    return pgoutput.str_to_lsn(row[0]), pgoutput.str_to_lsn(row[1])


def test_another_databases_wal_does_not_make_our_idle_slot_look_replaced(
        sync_env: SyncEnv, running: Running) -> None:
    producer = running.start_producer(sync_env.settings)
    wait_until(lambda: capture_ready(sync_env), timeout=60, message="capture ready")
    ceiling_before, _ = _ceiling_and_confirmed(sync_env)

    # Another database of the same cluster writes WAL quickly (the ERP's, here: a scratch
    # table there); our CRM stays idle.
    with sync_env.erp() as erp:
        erp.execute("CREATE TABLE wal_filler (pad text)")
        erp.execute("INSERT INTO wal_filler SELECT repeat(md5(i::text), 32) "
                    "FROM generate_series(1, %s) i", (BYTES_OF_WAL // 1100,))
        erp.execute("DROP TABLE wal_filler")

    # psycopg2 confirms the idle slot past the old ceiling by itself ...
    wait_until(lambda: _ceiling_and_confirmed(sync_env)[1] > ceiling_before, timeout=120,
               message="the idle slot confirmed past the old ceiling (keepalive WAL end)")
    # ... and the ceiling was raised ahead of it meanwhile, not after
    ceiling, confirmed = _ceiling_and_confirmed(sync_env)
    assert ceiling > confirmed, (ceiling, confirmed)

    running.stop(producer)
    again = running.start_producer(sync_env.settings)
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES ('张', '三')")
    wait_until(lambda: again.stats.events >= 1, timeout=60,
               message="the restarted producer publishing the next change")
    assert again.health.readiness()[0], again.health.readiness()[1]
    with sync_env.crm() as crm:
        problem = crm.execute(f"SELECT problem FROM {STATE_TABLE} WHERE slot_name = %s",
                              (sync_env.settings.slot_name,)).fetchone()
    assert problem == (None,)
