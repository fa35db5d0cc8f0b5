"""`status` on a consumer or producer that is there but does nothing (newcomer9 F1, F2).

F1: a consumer whose batch is blocked on an ERP row lock stays in its group (kafka-python's
heartbeat thread), so its partitions are applied by nobody; one healthy consumer beside it
made `status` say OK. F2: a frozen (SIGSTOP) active producer keeps the capture lock through
its idle session, so `status` said "Producer: running" while nothing was captured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli, Running


def _status(cli: Cli, settings: Any) -> Any:
    return cli(settings, "status", "--json")


def _end(proc: subprocess.Popen[bytes], *, frozen: bool) -> None:
    """Resume a process left SIGSTOPped by a failed assertion, then stop it."""
    if frozen:
        proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def test_status_names_a_consumer_blocked_on_an_erp_lock_beside_a_healthy_one(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.with_(membership_check_s=0.5)  # silent after max(30 s, 3 x 0.5 s)
    running.start_producer(settings)
    with sync_env.crm() as crm:
        key = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                          "('张', '三', '13812345678') RETURNING customer_id").fetchone()[0]
    first, second = running.start_consumer(settings), running.start_consumer(settings)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute("SELECT count(*) FROM erp.business_partners")
                   .fetchone()[0] == 1 and erp.execute(
                       "SELECT count(*) FROM sync.consumer_membership WHERE in_group "
                       "AND cardinality(assigned) > 0").fetchone()[0] == 2,
                   timeout=90, message="the customer applied, both consumers in the group")
    assert _status(cli, settings).code == 0
    ids = {first.membership.client_id, second.membership.client_id}

    # A DBA's forgotten transaction holds the partner's row: the next change of that
    # customer blocks whichever consumer owns its partition.
    lock = psycopg.connect(settings.erp_dsn)
    try:
        lock.execute("SELECT 1 FROM erp.business_partners WHERE crm_customer_id = %s "
                     "FOR UPDATE", (str(key),))
        with sync_env.crm() as crm:
            crm.execute("UPDATE crm.customers SET notes = '已发货' WHERE customer_id = %s",
                        (key,))

        def named() -> Any:
            st = _status(cli, settings)
            lines = [a for a in st.json["attention"] if "has not reported from its loop" in a]
            return (st, lines) if lines else None

        st, [line] = wait_until(named, timeout=90, interval=2.0,
                                message="status to name the blocked consumer")
        assert st.code == 1
        [waiting] = [p for p in st.json["lag"] if p["lag"] > 0]
        where = f"{waiting['topic']}[{waiting['partition']}]"
        [stuck] = [m for m in st.json["members"] if where in m["partitions"]]
        assert stuck["client_id"] in ids and stuck["in_group"]
        assert line.startswith(f"consumer {stuck['client_id']} (host {stuck['host']}, pid "
                               f"{os.getpid()}) is in group {settings.consumer_group}")
        assert f"{where} (lag {waiting['lag']})" in line
        assert "pg_stat_activity" in line and "/readyz" in line
        healthy = ids - {stuck["client_id"]}
        # (the ids of two consumers of one process differ by a suffix: matched with "(")
        assert not any(f"consumer {h} (" in a for h in healthy for a in st.json["attention"])
        text = cli(settings, "status")
        assert text.code == 1 and stuck["client_id"] in text.out
    finally:
        lock.rollback()  # the batch goes on
        lock.close()
    wait_until(lambda: _status(cli, settings).code == 0, timeout=60, interval=2.0,
               message="status OK once the consumer applied its batch")


def test_status_calls_a_frozen_producer_holding_the_capture_lock_hung(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    # heartbeat 1 s: the silence bound is its floor, 30 s (producer_silent_after_s)
    settings = sync_env.with_(heartbeat_interval_s=1.0, http_port=0)
    env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_FORMAT": "json"}
    with (tmp_path / "producer.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "produce"], env=env,
                                stdout=log, stderr=log)
    stopped = False
    try:
        ok = wait_until(lambda: (st := _status(cli, settings)).code == 0 and st,
                        timeout=90, interval=1.0, message="the producer capturing, status OK")
        assert ok.json["producer_running"]
        with sync_env.crm() as crm:  # the CRM session holding the capture lock
            [(holder,)] = crm.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database "
                "= (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
        proc.send_signal(signal.SIGSTOP)
        stopped = True

        def hung() -> Any:
            st = _status(cli, settings)
            lines = [a for a in st.json["attention"] if "capture lock" in a and "frozen" in a]
            return (st, lines) if lines else None

        st, [line] = wait_until(hung, timeout=90, interval=2.0,
                                message="status to call the frozen producer hung")
        assert st.code == 1 and st.json["producer_hung"]
        assert f"CRM backend pid {holder}" in line
        assert f"pg_terminate_backend({holder})" in line and "standby takes over" in line
        text = cli(settings, "status")
        assert text.code == 1
        assert f"Producer: HUNG (holds the capture lock, session pid {holder}" in text.out
        assert "\nOK" not in text.out
        proc.send_signal(signal.SIGCONT)
        stopped = False
        wait_until(lambda: _status(cli, settings).code == 0, timeout=60, interval=1.0,
                   message="status OK once the producer runs again")
    finally:
        _end(proc, frozen=stopped)


def test_status_says_a_frozen_consumer_stopped_reporting_not_that_it_reported_being_out(
        sync_env: SyncEnv, cli: Cli, running: Running, tmp_path: Path) -> None:
    """newcomer9 nit: a SIGSTOPped consumer, dropped by the broker after its session timeout,
    was said to have "reported … that it is NOT in group": its last report said "in"."""
    # reports every 10 s (the default): the broker drops it (10 s session) before it has
    # missed two reports, where the wrong wording was
    settings = sync_env.with_(membership_check_s=10.0, http_port=0)
    running.start_producer(settings)
    env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_FORMAT": "json"}
    with (tmp_path / "consumer.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "consume"], env=env,
                                stdout=log, stderr=log)
    stopped = False
    try:
        with sync_env.erp() as erp:
            wait_until(lambda: erp.execute(
                "SELECT count(*) FROM sync.consumer_membership WHERE pid = %s AND in_group "
                "AND cardinality(assigned) > 0", (proc.pid,)).fetchone()[0] == 1,
                timeout=90, message="the consumer reporting itself in the group")
        wait_until(lambda: _status(cli, settings).code == 0, timeout=60, interval=1.0,
                   message="status OK with the consumer running")
        proc.send_signal(signal.SIGSTOP)
        stopped = True

        def named() -> Any:
            st = _status(cli, settings)
            lines = [a for a in st.json["attention"] if f"pid {proc.pid})" in a]
            return (st, lines) if lines else None

        # before the session timeout: a silent member; after it: dropped by the broker
        st, [line] = wait_until(named, timeout=90, interval=1.0,
                                message="status to name the frozen consumer")
        assert st.code == 1
        assert "that it is NOT in group" not in line, line
        assert "stopped reporting" in line or "stopped or stuck" in line, line
        proc.send_signal(signal.SIGCONT)
        stopped = False
        wait_until(lambda: _status(cli, settings).code == 0, timeout=90, interval=1.0,
                   message="status OK once the consumer rejoined")
    finally:
        _end(proc, frozen=stopped)
