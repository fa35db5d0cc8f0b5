"""A truncate and a concurrent upsert of a row older than it, in two consumers' transactions
on the real ERP database: whichever commits first, the older row ends up deleted or never
written (apply._lock): no row older than the truncate survives it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import psycopg

from service.erp.apply import apply_changes
from service.erp.changes import DemandRow, ErpChange, Position, TruncateRow
from tests.conftest import SyncEnv
from tests.helpers import wait_until

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
TRUNCATE = ErpChange("truncate", None, truncate=TruncateRow(
    "market_demand", "crm.market_demand", Position(100, 0, "64/0", NOW)))


def _older_demand(key: str) -> ErpChange:
    """A demand created before the truncate (position 50 < 100): a lagging partition's."""
    return ErpChange("market_demand", None, demand=DemandRow(
        key, "TREND", "手机", "5G手机市场增长迅速", NOW, False, Position(50, 0, "32/0", NOW)))


def _waiting(sync_env: SyncEnv) -> bool:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d "
                          "ON d.oid = l.database WHERE d.datname = current_database() "
                          "AND NOT l.granted AND l.relation = 'erp.demand_signals'::regclass"
                          ).fetchone()
    return bool(row and row[0])


def _in_thread(dsn: str, changes: list[ErpChange]) -> tuple[threading.Thread, list[Any]]:
    errors: list[Any] = []

    def run() -> None:
        try:
            with psycopg.connect(dsn) as conn, conn.transaction():
                apply_changes(conn, changes)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _demands(sync_env: SyncEnv) -> dict[str, bool]:
    with sync_env.erp() as erp:
        return dict(erp.execute("SELECT crm_demand_id, deleted FROM erp.demand_signals"))


def test_a_truncate_waits_for_an_older_upsert_in_flight_and_deletes_it(
        sync_env: SyncEnv) -> None:
    dsn = sync_env.settings.erp_dsn
    with psycopg.connect(dsn) as upserting:
        with upserting.transaction():
            apply_changes(upserting, [_older_demand("9")])
            thread, errors = _in_thread(dsn, [TRUNCATE])
            wait_until(lambda: _waiting(sync_env), timeout=30, message="the truncate waits")
        thread.join(30)
    assert not thread.is_alive() and not errors
    assert _demands(sync_env) == {"9": True}


def test_an_older_upsert_waits_for_a_truncate_in_flight_and_is_refused(
        sync_env: SyncEnv) -> None:
    dsn = sync_env.settings.erp_dsn
    with psycopg.connect(dsn) as truncating:
        with truncating.transaction():
            apply_changes(truncating, [TRUNCATE])
            thread, errors = _in_thread(dsn, [_older_demand("9")])
            wait_until(lambda: _waiting(sync_env), timeout=30, message="the upsert waits")
        thread.join(30)
    assert not thread.is_alive() and not errors
    assert _demands(sync_env) == {}
