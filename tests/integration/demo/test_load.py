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
from tests.integration.conftest import Cli


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
    # skip-empty-xacts: an autovacuum ANALYZE of the loaded tables commits in the database too
    # (catalog rows only, which test_decoding shows as an empty BEGIN/COMMIT)
    row = conn.execute("SELECT count(*) FROM pg_logical_slot_get_changes("
                       "'demo_load_' || pg_backend_pid(), NULL, NULL, "
                       "'skip-empty-xacts', '1') WHERE data LIKE 'COMMIT%'").fetchone()
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


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM crm.{table}").fetchone()
    assert row is not None
    return int(row[0])


def _keyed_rows(conn: psycopg.Connection[Any], ids: range) -> None:
    """Customers and orders (with a line) inserted with explicit keys: an identity BY
    DEFAULT takes them, and its sequence does not move (a CRM import keeping its ids)."""
    for i in ids:
        conn.execute("INSERT INTO crm.customers (customer_id, family_name, given_name) "
                     "VALUES (%s, '张', '三')", (i,))
        conn.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                     "order_date, status) VALUES (%s, %s, %s, '2026-11-30', '已发货')",
                     (i, f"IMPORT-{i}", i))
        conn.execute("INSERT INTO crm.order_lines (order_id, line_no, customer_id, "
                     "product_code, product_name, quantity, unit_price) VALUES "
                     "(%s, 1, %s, 'P-1', '手机', '10台', 5000)", (i, i))


def _last_value(conn: psycopg.Connection[Any], table: str, column: str) -> int | None:
    row = conn.execute("SELECT last_value FROM pg_sequences WHERE format('%%I.%%I', schemaname, "
                       "sequencename)::regclass = pg_get_serial_sequence(%s, %s)::regclass",
                       (f"crm.{table}", column)).fetchone()
    assert row is not None
    return None if row[0] is None else int(row[0])


def test_a_load_into_a_crm_with_explicitly_keyed_customers_and_orders_skips_their_ids(
        sync_env: SyncEnv, cli: Cli) -> None:
    """F9 (newcomer7): rows inserted with explicit ids 1..8 (the sequences behind them)
    made `demo load` crash as `unexpected_error` UniqueViolation. The loader now takes ids
    from the sequences as before but skips those in use: the load works, the keyed rows are
    untouched, and the sequences were only drawn from (nextval), never set."""
    with psycopg.connect(sync_env.settings.crm_dsn, autocommit=True) as conn:
        _keyed_rows(conn, range(1, 9))
        assert _last_value(conn, "customers", "customer_id") is None  # never drawn from
    done = cli(sync_env.settings, "demo", "load", "--customers", "200", "--orders", "400",
               "--changes", "300")
    assert done.code == 0, (done.out, done.err)
    report = done.json
    assert report["customers"]["inserted"] == 200 and report["changes"] == 300, report
    with psycopg.connect(sync_env.settings.crm_dsn, autocommit=True) as conn:
        kept = conn.execute("SELECT count(*) FROM crm.customers c JOIN crm.sales_orders o "
                            "USING (customer_id) WHERE c.customer_id <= 8 AND o.order_no LIKE "
                            "'IMPORT-%' AND c.family_name = '张'").fetchone()
        assert kept == (8,)
        customers = 208 - report["customers"]["deleted"]
        assert _count(conn, "customers") == customers
        # drawn from only: the first 8 values met the keyed rows and were skipped
        assert _last_value(conn, "customers", "customer_id") == 208
        assert _last_value(conn, "sales_orders", "order_id") == 408


def test_a_load_into_a_crm_with_market_demand_keys_ahead_of_its_sequence_skips_them(
        sync_env: SyncEnv, cli: Cli) -> None:
    """Market demand is inserted twice over: by COPY, and by follow-up changes that used to
    leave the key to the identity default. Keys 13 and 14 sit where those changes' ids
    fall (the COPY's ten rows take 1 and 3-11): the changes get reserved ids too, skipping
    them, instead of a UniqueViolation half-way through the load."""
    with psycopg.connect(sync_env.settings.crm_dsn, autocommit=True) as conn:
        for i in (2, 13, 14):
            conn.execute("INSERT INTO crm.market_demand (demand_id, kind, product_category, "
                         "content, observed_at) VALUES (%s, '市场趋势', '手机', "
                         "'5G手机市场增长迅速', now())", (i,))
    done = cli(sync_env.settings, "demo", "load", "--customers", "20", "--orders", "40",
               "--changes", "300")
    assert done.code == 0, (done.out, done.err)
    inserted = done.json["market_demand"]["inserted"]
    assert inserted >= 10 + 2, done.json  # the COPY's ten, and changes past 13 and 14
    with psycopg.connect(sync_env.settings.crm_dsn, autocommit=True) as conn:
        assert _count(conn, "market_demand") == 3 + inserted
        assert conn.execute("SELECT count(*) FROM crm.market_demand WHERE demand_id IN "
                            "(2, 13, 14) AND content = '5G手机市场增长迅速'").fetchone() == (3,)
        # drawn from only, every value once: the loader's rows and the three it skipped
        assert _last_value(conn, "market_demand", "demand_id") == inserted + 3
