"""No process exits on a transient fault: the broker killed and started again, PostgreSQL
restarted in immediate mode, under running producers (active and standby) and consumers,
with CRM changes written throughout. Needs the local stack of this worktree (it restarts
its servers) and STACK_TESTS_MAY_RESTART=1 (nobody else uses that stack): run
your own with STACK_KAFKA_PORT/STACK_PG_PORT and point the tests at it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.runtime.test_endpoints import free_port, get


class TolerantWriter(threading.Thread):
    """Inserts, updates (notes) and deletes customers until stopped; a lost session is
    reconnected (whether the statement in flight committed does not matter: the check
    compares the CRM's final state with the ERP's)."""

    def __init__(self, sync_env: SyncEnv) -> None:
        super().__init__(daemon=True)
        self.sync_env = sync_env
        self.stop = threading.Event()
        self.committed = 0
        self.reconnects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(11)
        conn: psycopg.Connection[Any] | None = None
        customers: list[int] = []
        try:
            while not self.stop.is_set():
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = psycopg.connect(self.sync_env.settings.crm_dsn, autocommit=True,
                                               connect_timeout=3)
                    self._one(conn, rng, customers)
                    self.committed += 1
                    time.sleep(0.02)
                except psycopg.OperationalError:
                    self.reconnects += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.stop.wait(0.5)
        except BaseException as exc:
            self.error = exc
        finally:
            if conn is not None:
                conn.close()

    def _one(self, conn: psycopg.Connection[Any], rng: random.Random,
             customers: list[int]) -> None:
        roll = rng.random()
        if roll < 0.35 or len(customers) < 5:
            row = conn.execute("INSERT INTO crm.customers (family_name, given_name, phone, notes)"
                               " VALUES ('张', '三', '13800000000', 'v0') RETURNING customer_id"
                               ).fetchone()
            assert row is not None
            customers.append(row[0])
        elif roll < 0.9:
            conn.execute("UPDATE crm.customers SET notes = %s WHERE customer_id = %s",
                         (f"v{rng.randint(1, 10**9)}", rng.choice(customers)))
        else:
            conn.execute("DELETE FROM crm.customers WHERE customer_id = %s",
                         (customers.pop(rng.randrange(len(customers))),))

    def finish(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(30)
        error, self.error = self.error, None
        if error is not None:
            raise error


def _spawn(sync_env: SyncEnv, command: str, port: int, log: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(sync_env.settings),
           "CRM_ERP_SYNC_HTTP_PORT": str(port), "CRM_ERP_SYNC_HTTP_HOST": "127.0.0.1"}
    return subprocess.Popen([sys.executable, "-m", "service.cli", command], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _crm_state(sync_env: SyncEnv) -> dict[int, str | None]:
    with psycopg.connect(sync_env.settings.crm_dsn, autocommit=True) as crm:
        return dict(crm.execute("SELECT customer_id, notes FROM crm.customers").fetchall())


def _erp_state(sync_env: SyncEnv) -> dict[int, str | None]:
    with psycopg.connect(sync_env.settings.erp_dsn, autocommit=True) as erp:
        return {int(k): v for k, v in erp.execute(
            "SELECT crm_customer_id, notes FROM erp.business_partners WHERE NOT deleted")}


def _readiness(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(port, "/readyz")
    return status, (json.loads(body) if body else {})


def test_broker_kill_and_postgres_immediate_restart_end_no_process_and_lose_nothing(
        sync_env: SyncEnv, tmp_path: Any) -> None:
    stack = sync_env.stack
    reason = stack.why_not_restartable()
    if reason:
        pytest.skip(reason)
    names = ["producer-a", "producer-b", "consumer-1", "consumer-2"]
    ports = {name: free_port() for name in names}
    log_path = tmp_path / "processes.log"
    writer = TolerantWriter(sync_env)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    broker_down = False
    codes: dict[str, int] = {}
    with log_path.open("ab") as log:
        try:
            for name in names:
                command = "produce" if name.startswith("producer") else "consume"
                procs[name] = _spawn(sync_env, command, ports[name], log)
                if name == "producer-a":  # the active one first: b is the standby
                    wait_until(lambda: _readiness(ports["producer-a"])[0] == 200, timeout=60,
                               message="the first producer to be ready")

            def all_ready() -> bool:
                return all(_readiness(ports[n])[0] == 200 for n in names)

            def alive() -> None:
                exited = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                assert not exited, f"processes exited: {exited}"

            wait_until(all_ready, timeout=90, message="every process ready")
            writer.start()
            wait_until(lambda: len(_erp_state(sync_env)) >= 5, timeout=90,
                       message="changes flowing into the ERP")

            # 1. The broker dies without a clean shutdown, and stays down a while.
            stack.script("kill-kafka")
            broker_down = True
            down = wait_until(
                lambda: [n for n in names if _readiness(ports[n])[1].get("state")
                         == "reconnecting"],
                timeout=60, message="a process to report reconnecting on /readyz")
            reasons = {n: _readiness(ports[n])[1] for n in down}
            assert all(_readiness(ports[n])[0] == 503 for n in down), reasons
            assert any("broker" in r.get("reason", "") for r in reasons.values()), reasons
            alive()
            stack.script("start-kafka")
            broker_down = False
            wait_until(all_ready, timeout=180, message="every process ready after the broker")
            alive()
            before_pg = len(_erp_state(sync_env))

            # 2. PostgreSQL (CRM and ERP) restarted in immediate mode: crash recovery.
            stack.script("restart-pg", "immediate")
            wait_until(all_ready, timeout=180, message="every process ready after PostgreSQL")
            alive()
            wait_until(lambda: writer.committed > 0 and len(_erp_state(sync_env)) > before_pg,
                       timeout=120, message="changes flowing again after the restart")
            writer.finish()
            wait_until(lambda: _erp_state(sync_env) == _crm_state(sync_env), timeout=240,
                       message="the ERP to hold every CRM customer with its last notes")
            alive()
        finally:
            writer.finish()
            if broker_down:
                stack.script("start-kafka")
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            codes = {n: p.wait(timeout=60) for n, p in procs.items()}
    output = log_path.read_text(errors="replace")
    assert codes == dict.fromkeys(names, 0), output[-4000:]
    assert writer.reconnects >= 1, "the PostgreSQL restart did not reach the writer"
    assert "Traceback" not in output
    assert "crm_connection_lost" in output  # the producers saw the restart and rode it out
    assert "13800000000" not in output
