"""A CRM `timestamp without time zone` is the CRM's wall-clock time: read in the CRM
session's own zone (here the database's), by the snapshot, the stream and `reconcile` alike."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg import sql

from service import ops
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running

INSERT = ("INSERT INTO crm.market_demand (kind, product_category, content, observed_at) "
          "VALUES ('市场趋势', '手机', %s, '2026-11-28 09:00:00') RETURNING demand_id")


def test_a_naive_0900_in_a_shanghai_crm_is_0100_utc_by_snapshot_stream_and_reconcile(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        database = crm.info.dbname
        crm.execute(sql.SQL("ALTER DATABASE {} SET timezone = 'Asia/Shanghai'").format(
            sql.Identifier(database)))
        crm.execute("ALTER TABLE crm.market_demand ALTER COLUMN observed_at "
                    "TYPE timestamp without time zone USING observed_at AT TIME ZONE 'UTC'")
        (snapshotted,) = crm.execute(INSERT, ("5G手机市场增长迅速",)).fetchone()

    running.start_producer(settings)
    running.start_consumer(settings)
    with sync_env.crm() as crm:  # a new session: Asia/Shanghai is its own zone
        assert crm.execute("SHOW timezone").fetchone() == ("Asia/Shanghai",)
        (streamed,) = crm.execute(INSERT, ("客户需求反馈",)).fetchone()
    lsn = ops.current_lsn(settings)
    # Caught up with the WAL is not enough: the initial snapshot's chunks may still be on
    # their way (the snapshotted row reaches the ERP through one).
    wait_until(lambda: ops.caught_up(settings, lsn) and not ops.pending_snapshots(settings),
               timeout=120, message="caught up, initial snapshot read")

    def both_rows() -> dict[str, datetime] | None:
        with sync_env.erp() as erp:
            rows = dict(erp.execute(
                "SELECT crm_demand_id, observed_at FROM erp.demand_signals").fetchall())
        return rows if len(rows) == 2 else None

    nine_in_shanghai = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
    got = wait_until(both_rows, timeout=120, message="both demand rows in the ERP")
    assert got == {str(snapshotted): nine_in_shanghai, str(streamed): nine_in_shanghai}

    clean = cli(settings, "reconcile", "--json", "--entity", "demand")
    assert clean.code == 0, clean.out
    assert clean.json["drift"] == 0
