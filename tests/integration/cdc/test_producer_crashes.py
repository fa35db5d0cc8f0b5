"""Crashes, failover and idle safety of the producer, as real processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SyncEnv
from tests.helpers import decoded_events, settings_env, wait_until

# A test-only audit of every committed change, written by triggers in the test's CRM: the
# truth the producer's output is checked against (the producer itself uses no triggers).
AUDIT = """
CREATE TABLE public.audit (
    audit_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid bigint NOT NULL DEFAULT txid_current(),
    table_name text NOT NULL, op text NOT NULL, customer_id bigint NOT NULL,
    row_key text NOT NULL);
CREATE FUNCTION public.audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    INSERT INTO public.audit (table_name, op, customer_id, row_key) VALUES (
        TG_TABLE_NAME, TG_OP, r.customer_id,
        CASE TG_TABLE_NAME WHEN 'customers' THEN r.customer_id::text
                           ELSE to_jsonb(r) ->> 'order_id' END);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_customers AFTER INSERT OR UPDATE OR DELETE ON crm.customers
    FOR EACH ROW EXECUTE FUNCTION public.audit_change();
CREATE TRIGGER audit_orders AFTER INSERT OR UPDATE OR DELETE ON crm.sales_orders
    FOR EACH ROW EXECUTE FUNCTION public.audit_change();
"""

OPS = {"INSERT": "CREATE", "UPDATE": "UPDATE", "DELETE": "DELETE"}


_spawned: list[subprocess.Popen[bytes]] = []


def spawn_producer(sync_env: SyncEnv, log: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "produce"],
                            env={**os.environ, **settings_env(sync_env.settings)},
                            stdout=log, stderr=subprocess.STDOUT)
    _spawned.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_producer_outlives_its_test(sync_env: SyncEnv) -> Iterator[None]:
    """A failed assertion skips a test's own SIGTERM: kill what it spawned before its
    databases are dropped, so no producer keeps running against a later test's stack."""
    yield
    while _spawned:
        proc = _spawned.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Writer(threading.Thread):
    """Commits a random mix of changes until stopped; re-raises its failure on join."""

    def __init__(self, sync_env: SyncEnv, seed: int) -> None:
        super().__init__()
        self.sync_env, self.seed = sync_env, seed
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            write_changes(self.sync_env, self.stop, self.seed)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error


def write_changes(sync_env: SyncEnv, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with sync_env.crm() as crm:
        customers: list[int] = []
        order_no = 0
        while not stop.is_set():
            roll = rng.random()
            with crm.transaction():
                if roll < 0.3 or not customers:
                    row = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone)"
                                      " VALUES ('赵', '六', '13800000000') RETURNING customer_id"
                                      ).fetchone()
                    customers.append(row[0])
                elif roll < 0.6:
                    crm.execute("UPDATE crm.customers SET phone = %s WHERE customer_id = %s",
                                (f"139{rng.randint(0, 99_999_999):08d}", rng.choice(customers)))
                elif roll < 0.9:
                    order_no += 1
                    crm.execute("INSERT INTO crm.sales_orders (order_no, customer_id, order_date,"
                                " status) VALUES (%s, %s, '2023-01-01', '待付款')",
                                (f"{seed}-{order_no}", rng.choice(customers)))
                    crm.execute("UPDATE crm.sales_orders SET status = '已付款' "
                                "WHERE order_no = %s", (f"{seed}-{order_no}",))
                else:
                    crm.execute("DELETE FROM crm.customers WHERE customer_id = %s",
                                (customers.pop(rng.randrange(len(customers))),))


def assert_every_audited_change_published_in_order(sync_env: SyncEnv) -> None:
    with sync_env.crm() as crm:
        audit = crm.execute("SELECT txid, table_name, op, customer_id, row_key FROM public.audit"
                            " ORDER BY audit_id").fetchall()
    assert len(audit) > 200, "the load was too small to mean anything"
    published: dict[int, list[tuple[str, str, str]]] = {}
    seen: set[str] = set()
    for key, kind, ev, _ in decoded_events(sync_env.settings):
        if ev["event_id"] in seen:
            continue  # a re-send after a crash is the same event: count it once
        seen.add(ev["event_id"])
        row_key = ev["key"]  # the customer's or the order's CRM key, as text
        published.setdefault(int(key), []).append((kind, ev["op"], row_key))
    expected: dict[int, list[tuple[str, str, str]]] = {}
    last: tuple[int, str, str] | None = None
    for txid, table, op, customer_id, row_key in audit:
        kind = "customer" if table == "customers" else "order"
        if kind == "order" and last == (txid, "order", row_key):
            continue  # insert + update of one order in one transaction: one event
        last = (txid, kind, row_key)
        expected.setdefault(customer_id, []).append((kind, OPS[op], row_key))
    for customer_id, changes in expected.items():
        got = [(k, "CREATE" if o == "CREATE" else o, r) for k, o, r in
               published.get(customer_id, [])]
        assert got == changes, f"customer {customer_id}: published {got}, committed {changes}"


def audited_writer(sync_env: SyncEnv, seed: int) -> Writer:
    with sync_env.crm() as crm:
        crm.execute(AUDIT)
    return Writer(sync_env, seed)


def test_kill_9_during_a_load_loses_nothing(sync_env: SyncEnv, tmp_path: Any) -> None:
    writer = audited_writer(sync_env, 1)
    with (tmp_path / "producer.log").open("ab") as log:
        proc = spawn_producer(sync_env, log)
        # Changes before the slot exists reach Kafka only through the initial snapshot.
        wait_until(lambda: _slot_drained(sync_env), timeout=60, message="slot created")
        writer.start()
        try:
            for _ in range(4):
                time.sleep(random.uniform(0.5, 2.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc = spawn_producer(sync_env, log)
        finally:
            writer.finish()
        wait_until(lambda: _slot_drained(sync_env), timeout=120, message="slot drained")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert_every_audited_change_published_in_order(sync_env)


def _slot_drained(sync_env: SyncEnv) -> bool:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn >= pg_current_wal_lsn() - 0 "
                          "FROM pg_replication_slots WHERE slot_name = %s",
                          (sync_env.settings.slot_name,)).fetchone()
        pending = crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                              "WHERE state = 'pending'").fetchone()
    return bool(row and row[0]) and pending == (0,)


def _active_pid(sync_env: SyncEnv) -> int | None:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                          (sync_env.settings.slot_name,)).fetchone()
        # Advisory locks are listed cluster-wide: only this test's CRM database counts.
        lock = crm.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                           "AND database = (SELECT oid FROM pg_database "
                           "WHERE datname = current_database())").fetchall()
    return lock[0][0] if lock else (row[0] if row else None)


def test_failover_between_two_producers(sync_env: SyncEnv, tmp_path: Any) -> None:
    writer = audited_writer(sync_env, 2)
    with (tmp_path / "producers.log").open("ab") as log:
        first = spawn_producer(sync_env, log)
        wait_until(lambda: _active_pid(sync_env), timeout=30, message="a leader")
        wait_until(lambda: _slot_drained(sync_env), timeout=60, message="slot created")
        second = spawn_producer(sync_env, log)
        writer.start()
        try:
            time.sleep(2)
            leader_backend = _active_pid(sync_env)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed_at = time.monotonic()
            wait_until(lambda: _active_pid(sync_env) not in (None, leader_backend),
                       timeout=30, message="the standby to take over")
            takeover_s = time.monotonic() - killed_at
            time.sleep(2)
        finally:
            writer.finish()
        wait_until(lambda: _slot_drained(sync_env), timeout=120, message="slot drained")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    assert takeover_s < 10
    assert_every_audited_change_published_in_order(sync_env)


def test_heartbeat_keeps_a_quiet_slot_from_retaining_wal(sync_env: SyncEnv,
                                                          tmp_path: Any) -> None:
    with (tmp_path / "producer.log").open("ab") as log:
        proc = spawn_producer(sync_env, log)
        try:
            wait_until(lambda: _slot_drained(sync_env), timeout=30, message="slot ready")
            with sync_env.crm() as crm:
                crm.execute("CREATE TABLE public.busy (id serial, pad text)")
                for _ in range(20):  # a busy database, quiet captured tables: ~20 MB of WAL
                    crm.execute("INSERT INTO public.busy (pad) SELECT repeat('x', 1000) "
                                "FROM generate_series(1, 1000)")

                def retained() -> int:
                    row = crm.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                        "FROM pg_replication_slots WHERE slot_name = %s",
                        (sync_env.settings.slot_name,)).fetchone()
                    return int(row[0])

                assert retained() > 10_000_000
                # Past the busy table's WAL, not up to the cluster's end: other databases on a
                # shared cluster keep writing, and a heartbeat only confirms up to itself.
                end_row = crm.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert end_row is not None
                busy_end = end_row[0]

                def confirmed_past_busy_wal() -> bool:
                    row = crm.execute(
                        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                        "WHERE slot_name = %s", (busy_end, sync_env.settings.slot_name)
                    ).fetchone()
                    return bool(row and row[0])

                wait_until(confirmed_past_busy_wal, timeout=30,
                           message="the heartbeat to advance the slot")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
