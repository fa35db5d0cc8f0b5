"""The demo loader's pipelined changes (service.demo.load._apply_pipelined), on the real CRM
database: every change its own transaction, all of them applied, and a failing one reported
by its class with the session left usable."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from service.demo.generator import CustomerDelete, CustomerUpdate
from service.demo.load import PIPELINE_SYNC_EVERY, DemoWorkload, ensure_crm_schema
from tests.conftest import SyncEnv


def _loaded(sync_env: SyncEnv) -> tuple[psycopg.Connection[Any], DemoWorkload]:
    conn = psycopg.connect(sync_env.settings.crm_dsn, autocommit=True)
    ensure_crm_schema(conn)
    workload = DemoWorkload(7)
    for batch in workload.insert_batches(conn, 200, 300, 10):
        workload.insert(conn, batch)
    return conn, workload


def _decoding(sync_env: SyncEnv) -> psycopg.Connection[Any]:
    """A session holding a temporary logical slot on the test's own database: it counts that
    database's committed transactions exactly (xids are cluster-wide, and shared). A session
    of its own: a temporary slot is dropped on any error in its session."""
    watch = psycopg.connect(sync_env.settings.crm_dsn, autocommit=True)
    watch.execute("SELECT pg_create_logical_replication_slot("
                  "'demo_load_' || pg_backend_pid(), 'test_decoding', true)")
    return watch


def _committed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pg_logical_slot_get_changes("
                       "'demo_load_' || pg_backend_pid(), NULL, NULL) "
                       "WHERE data LIKE 'COMMIT%'").fetchone()
    assert row is not None
    return int(row[0])


def test_pipelined_changes_are_each_a_transaction_and_all_applied(sync_env: SyncEnv) -> None:
    conn, workload = _loaded(sync_env)
    with conn:
        changes = list(workload.changes(PIPELINE_SYNC_EVERY * 2 + 37))  # a group left over
        with _decoding(sync_env) as watch:
            workload.apply_pipelined(conn, changes, len(changes))
            assert _committed(watch) == len(changes)
        assert workload.tally.changes == len(changes)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

        deleted = {c.customer_id for c in changes if isinstance(c, CustomerDelete)}
        last: dict[tuple[int, str], object] = {}
        for c in changes:
            if isinstance(c, CustomerUpdate):
                for column, value in c.values:
                    last[(c.customer_id, column)] = value
        checked = 0
        for (customer_id, column), value in last.items():
            if customer_id in deleted:
                continue
            row = conn.execute(f"SELECT {column} FROM crm.customers WHERE customer_id = %s",
                               (customer_id,)).fetchone()
            assert row is not None and row[0] == value, (customer_id, column)
            checked += 1
        assert checked > 50

        # the same session runs the loader again (its prepared statements were released)
        again = list(workload.changes(20))
        workload.apply_pipelined(conn, again, len(again))
        assert workload.tally.changes == len(again)


def test_a_failing_change_raises_its_class_and_leaves_the_session_idle(
        sync_env: SyncEnv) -> None:
    conn, workload = _loaded(sync_env)
    with conn:
        good = list(workload.changes(PIPELINE_SYNC_EVERY + 200))
        customer = next(c.customer_id for c in good if isinstance(c, CustomerUpdate))
        bad = CustomerUpdate(customer, (("purchase_amount", "not a number"),))
        planned = [*good[:PIPELINE_SYNC_EVERY + 100], bad, *good[PIPELINE_SYNC_EVERY + 100:]]
        with _decoding(sync_env) as watch:
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                workload.apply_pipelined(conn, planned, len(planned))
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert workload.tally.changes == PIPELINE_SYNC_EVERY  # the first group's
            # the first group and the second's changes before the bad one were committed;
            # nothing after it was applied (the server skips to the Sync; no later group
            # is sent)
            assert _committed(watch) == PIPELINE_SYNC_EVERY + 100
        conn.execute("SELECT 1")
        assert not conn.execute("SELECT count(*) FROM pg_prepared_statements "
                                "WHERE name LIKE '_demo_load_%'").fetchall()[0][0]


def test_a_failure_early_in_a_group_fails_the_next_group_whole_and_is_what_is_raised(
        sync_env: SyncEnv) -> None:
    """The failing change in the first of three groups: the statements first prepared after
    it in that group never were (the server skipped their Parse), the group sent after it
    meets the aborted transaction, and the original error is raised, not a cleanup's."""
    conn, workload = _loaded(sync_env)
    with conn:
        good = list(workload.changes(PIPELINE_SYNC_EVERY * 3))
        customer = next(c.customer_id for c in good if isinstance(c, CustomerUpdate))
        planned = [*good[:100], CustomerUpdate(customer, (("purchase_amount", "x"),)),
                   *good[100:]]
        with _decoding(sync_env) as watch:
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                workload.apply_pipelined(conn, planned, len(planned))
            assert workload.tally.changes == 0
            assert _committed(watch) == 100
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert not conn.execute("SELECT count(*) FROM pg_prepared_statements "
                                    "WHERE name LIKE '_demo_load_%'").fetchall()[0][0]
