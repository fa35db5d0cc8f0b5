"""Graceful shutdown with a real SIGTERM to a real `crm-erp-sync consume` process, during a
load: exit 0 within the bound, offsets committed, the group left, nothing lost."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.demo.load import load_demo
from service.erp.mappings import Mappings
from service.kafka_io import make_admin
from service.ops import group_lag
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import (
    actual_erp,
    consume_until_caught_up,
    expected_erp,
    settings_env,
    wait_until,
)

REPO = Path(__file__).resolve().parents[3]
SHUTDOWN_BOUND_S = 20.0


def cli(settings: Settings, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO,
        env={**os.environ, **settings_env(settings), **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def partners(sync_env: SyncEnv) -> int:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT count(*) FROM erp.business_partners").fetchone()
    return int(row[0]) if row else 0


def group_members(settings: Settings) -> int:
    admin = make_admin(settings)
    try:
        described = admin.describe_groups([settings.consumer_group])
    finally:
        admin.close()
    info = described[settings.consumer_group] if isinstance(described, dict) else described[0]
    members = info["members"] if isinstance(info, dict) else info.members
    return len(members)


def test_sigterm_during_a_load_exits_0_in_bound_and_loses_nothing(sync_env: SyncEnv) -> None:
    # Small batches: the signal lands with work in flight and more to come.
    settings = dataclasses.replace(sync_env.settings, batch_max_events=20,
                                   shutdown_timeout_s=SHUTDOWN_BOUND_S)
    registry = SchemaRegistry.load(settings.schemas_dir)
    producer = CdcProducer(settings, registry)
    producing = threading.Thread(target=producer.run, daemon=True)
    # The CRM keeps changing (a paced stream of changes) while the consumer runs.
    loading = threading.Thread(target=load_demo, daemon=True, kwargs=dict(
        conn_or_dsn=settings.crm_dsn, customers=300, orders=600, rate=150.0, seed=8,
        changes=450))
    loading.start()
    producing.start()
    consumer = cli(settings, "consume", CRM_ERP_SYNC_LOG_FORMAT="json")
    try:
        wait_until(lambda: consumer.poll() is not None or partners(sync_env) > 0, timeout=60,
                   message="the consumer to apply its first batches")
        assert consumer.poll() is None, "the consumer exited before the signal"
        time.sleep(0.5)
        sent = time.monotonic()
        consumer.send_signal(signal.SIGTERM)
        code = consumer.wait(timeout=SHUTDOWN_BOUND_S + 15)
        took = time.monotonic() - sent
    finally:
        if consumer.poll() is None:
            consumer.kill()
        assert consumer.stderr is not None
        stderr = consumer.stderr.read().decode()
    assert code == 0, stderr[-3000:]
    assert took < SHUTDOWN_BOUND_S, f"took {took:.1f}s"
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.strip()]
    assert "stopping" in events and events[-1] == "consumer_stopped", events[-5:]
    assert "shutdown_timeout" not in events
    # It committed what it applied and left the group (close() sends LeaveGroup).
    committed = sum(p.committed or 0 for p in group_lag(settings))
    assert committed > 0
    assert group_members(settings) == 0

    loading.join(120)
    assert not loading.is_alive()
    producer.stop()
    producing.join(60)
    CdcProducer(settings, registry).run(until_idle=True)  # whatever is left in the slot
    # A restarted member finishes the work: no lag, and the ERP is exactly the CRM.
    assert consume_until_caught_up(ErpConsumer(settings)).caught_up
    assert all(p.lag == 0 for p in group_lag(settings))
    with sync_env.crm() as crm, sync_env.erp() as erp:
        assert actual_erp(erp) == expected_erp(crm, Mappings.load(settings.mappings_file))


def test_the_watchdog_exits_non_zero_when_shutdown_overruns(sync_env: SyncEnv) -> None:
    """A consumer that cannot finish (its ERP transaction waits on a lock) is ended by the
    watchdog after CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S, with a non-zero exit."""
    settings = dataclasses.replace(sync_env.settings, shutdown_timeout_s=2.0)
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES ('王', '五')")
    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    with sync_env.erp() as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE erp.business_partners IN ACCESS EXCLUSIVE MODE")
        consumer = cli(settings, "consume", CRM_ERP_SYNC_LOG_FORMAT="json")
        try:
            # The consumer's apply waits on the lock: signal it while it waits.
            wait_until(lambda: _waiting_on_lock(sync_env), timeout=60,
                       message="the consumer's batch to wait on the lock")
            sent = time.monotonic()
            consumer.send_signal(signal.SIGTERM)
            code = consumer.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            if consumer.poll() is None:
                consumer.kill()
            blocker.execute("ROLLBACK")
        assert consumer.stderr is not None
        stderr = consumer.stderr.read().decode()
    assert code != 0
    assert 2.0 <= took < 15, f"took {took:.1f}s"
    assert '"shutdown_timeout"' in stderr


def _waiting_on_lock(sync_env: SyncEnv) -> bool:
    with sync_env.erp() as erp:
        row = erp.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                          "current_database() AND wait_event_type = 'Lock'").fetchone()
    return bool(row and row[0])
