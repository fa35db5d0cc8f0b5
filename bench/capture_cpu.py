"""What capture costs the CRM's PostgreSQL: SQL peek vs streaming replication, one run.

For each capture transport (``sql``: ``pg_logical_slot_peek_binary_changes``; ``stream``: the
replication protocol), in its own CRM/ERP databases and topics, with the producer running:

1. a steady load of one-change transactions (none, 200/s, then 1,000/s by default; "none"
   shows what the rest of the cluster's WAL costs a walsender to read): after a short
   warm-up, for ``--seconds`` seconds, the CPU seconds (user + system, from
   ``/proc/<pid>/stat``) of the CRM backends that serve the producer process (its session,
   its capture-lock session and, when streaming, its walsender), beside the CPU of the
   backends that commit the load (what the CRM spends on its own writes), the cluster's WAL
   volume meanwhile (a walsender reads all of it), and commit -> broker latency of the
   changes committed in the window;
2. with ``--burst N``: N one-change transactions as fast as one session commits them, then,
   once the producer has caught up, the first steady rate again ("after the burst").

The whole pipeline (two consumers too, commit -> ERP row latency, the ERP's and the broker's
CPU, memory, targets) is ``python -m bench.compare`` (``--transport sql`` for the SQL peek).

PostgreSQL must run on this machine (``/proc`` of its backends is read); the local stack does.
Run: python -m bench.capture_cpu [--rates 200,1000] [--seconds 10] [--burst 20000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from bench.common import CUSTOMER_INSERT, PacedLoad, bench_settings, percentile
from bench.proc import cpu_seconds
from service.avro import SchemaRegistry
from service.kafka_io import make_admin, make_consumer
from service.settings import Settings
from tests.helpers import settings_env

WARMUP_S = 3.0


@dataclasses.dataclass
class Phase:
    name: str
    rate: int
    achieved: float
    producer_cpu: float
    walsender_cpu: float
    writer_cpu: float
    ack_ms: list[float]
    cluster_wal_mb: float


class Capture:
    """A producer process for one transport, and what the CRM spends on it.

    The producer runs as its own process (as in production, and so that it does not compete
    with the load for this process's interpreter lock). The sales topic stamps records with
    the broker's append time, so a record's timestamp minus the commit time it carries is
    commit -> broker latency (acks=all on one broker: appended is acknowledged)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = SchemaRegistry.load(settings.schemas_dir)
        admin = make_admin(settings)
        try:
            admin.alter_configs([ConfigResource(
                ConfigResourceType.TOPIC, settings.sales_topic,
                configs={"message.timestamp.type": "LogAppendTime", "retention.ms": "-1"})])
        finally:
            admin.close()
        env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "produce"], env=env)
        self.monitor = psycopg.connect(settings.crm_dsn, autocommit=True)
        self.consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
        self.partitions = [TopicPartition(settings.sales_topic, p) for p in
                           sorted(self.consumer.partitions_for_topic(settings.sales_topic))]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning(*self.partitions)
        self.acked: list[tuple[datetime, float]] = []  # (commit time, commit -> broker ms)

    def start(self) -> None:
        deadline = time.monotonic() + 120
        while not self._ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{self.settings.capture_transport}: producer not capturing")
            time.sleep(0.1)

    def _ready(self) -> bool:
        row = self.monitor.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s "
            "AND confirmed_flush_lsn IS NOT NULL), "
            "(SELECT count(*) FROM pg_tables WHERE schemaname = 'crm_erp_sync' "
            " AND tablename = 'snapshots')", (self.settings.slot_name,)).fetchone()
        if row != (1, 1):
            return False
        pending = self.monitor.execute(
            "SELECT count(*) FROM crm_erp_sync.snapshots WHERE state = 'pending'").fetchone()
        return pending == (0,)

    def published(self) -> int:
        return sum(self.consumer.end_offsets(self.partitions).values())

    def collect(self) -> None:
        """Read what the producer published since the last call."""
        ends = self.consumer.end_offsets(self.partitions)
        while any(self.consumer.position(tp) < ends[tp] for tp in self.partitions):
            for records in self.consumer.poll(timeout_ms=500, max_records=10_000).values():
                for record in records:
                    _, event = self.registry.decode(record.value)
                    committed = event["source"]["commit_time"]
                    appended = datetime.fromtimestamp(record.timestamp / 1000, UTC)
                    self.acked.append((committed,
                                       (appended - committed).total_seconds() * 1000))

    def backends(self, exclude: set[int]) -> tuple[list[int], list[int]]:
        """(every backend of this CRM database serving the producer, its walsenders)."""
        rows = self.monitor.execute(
            "SELECT pid, backend_type FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()").fetchall()
        pids = [pid for pid, _ in rows if pid not in exclude]
        return pids, [pid for pid, kind in rows if kind == "walsender" and pid not in exclude]

    def wal_position(self) -> int:
        row = self.monitor.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
        assert row is not None
        return int(row[0])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.consumer.close()
        self.monitor.close()


def steady(capture: Capture, name: str, rate: int, seconds: float,
           done: int) -> tuple[Phase, int]:
    """Commit `rate` one-row transactions a second (from one session per 250/s) for a
    warm-up and then the measured window; `done` counts the changes committed before."""
    settings = capture.settings

    def insert(conn: psycopg.Connection[Any], i: int) -> None:
        conn.execute(CUSTOMER_INSERT, (done + i + 1, done + i + 1))

    load = PacedLoad(settings.crm_dsn, rate, WARMUP_S + seconds, insert)
    writer_pids = load.pids
    load.start()
    try:
        time.sleep(max(0.0, load.started + WARMUP_S - time.perf_counter()))
        pids, walsenders = capture.backends(writer_pids)
        cpu0 = {pid: cpu_seconds(pid) for pid in [*pids, *writer_pids]}
        wal0 = capture.wal_position()
        window_start, window_t0, before = datetime.now(UTC), time.perf_counter(), load.committed
        time.sleep(max(0.0, load.started + WARMUP_S + seconds - time.perf_counter()))
        cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in cpu0}
        window_s, in_window = time.perf_counter() - window_t0, load.committed - before
        window_end = datetime.now(UTC)
        wal_mb = (capture.wal_position() - wal0) / 2**20
    finally:
        load.join()
    # CPU of the measured window, scaled to the nominal seconds so the figures compare.
    scale = seconds / window_s
    done += load.committed
    wait_for_acks(capture, done)
    ack = [ms for committed, ms in capture.acked if window_start <= committed <= window_end]
    phase = Phase(name, rate, in_window / window_s,
                  sum(cpu[pid] for pid in pids) * scale,
                  sum(cpu[pid] for pid in walsenders) * scale,
                  sum(cpu[pid] for pid in writer_pids) * scale, ack, wal_mb * scale)
    return phase, done


def wait_for_acks(capture: Capture, events: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (published := capture.published()) < events:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {published:,} of {events:,} events published")
        time.sleep(0.05)
    capture.collect()


def burst(capture: Capture, n: int, done: int) -> tuple[float, float, int]:
    """n one-row transactions as fast as one session commits; (commits/s, catch-up s)."""
    with psycopg.connect(capture.settings.crm_dsn, autocommit=True) as writer:
        started = time.perf_counter()
        for i in range(n):
            writer.execute(CUSTOMER_INSERT, (done + i + 1, done + i + 1))
        committed_s = time.perf_counter() - started
    wait_for_acks(capture, done + n, timeout=1200)
    return n / committed_s, time.perf_counter() - started, done + n


def run_transport(transport: str, args: argparse.Namespace) -> list[Phase]:
    phases: list[Phase] = []
    with bench_settings(capture_transport=transport) as settings:
        capture = Capture(settings)
        capture.start()
        try:
            next_id = 0
            for rate in args.rates:
                phase, next_id = steady(capture, f"{rate}/s", rate, args.seconds, next_id)
                phases.append(phase)
                print_phase(transport, phase)
            if args.burst:
                commits, catch_up, next_id = burst(capture, args.burst, next_id)
                print(f"  {transport:6} burst of {args.burst:,} one-change transactions: "
                      f"committed at {commits:,.0f}/s, all acknowledged after {catch_up:.1f} s",
                      flush=True)
                rate = next((r for r in args.rates if r), 200)
                phase, next_id = steady(capture, f"{rate}/s after burst", rate, args.seconds,
                                        next_id)
                phases.append(phase)
                print_phase(transport, phase)
        finally:
            capture.stop()
    return phases


def print_phase(transport: str, p: Phase) -> None:
    line = (f"  {transport:6} {p.name:>17} (achieved {p.achieved:5,.0f}/s): CRM CPU for capture "
            f"{p.producer_cpu:5.2f} s (walsender {p.walsender_cpu:5.2f} s), load's own "
            f"backend(s) {p.writer_cpu:5.2f} s, cluster WAL {p.cluster_wal_mb:5.1f} MB; "
            f"commit->broker p50 {percentile(p.ack_ms, 50):6.1f} ms "
            f"p99 {percentile(p.ack_ms, 99):6.1f} ms")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0,200,1000",
                        type=lambda s: [int(r) for r in s.split(",")],
                        help="changes/s of each steady phase; 0 = idle: what reading the "
                             "rest of the cluster's WAL costs (a walsender reads all of it)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--transports", default="sql,stream")
    args = parser.parse_args()
    print(f"CRM PostgreSQL CPU seconds per {args.seconds:g} s of steady load "
          f"(one change per transaction, one session per 250/s), per capture transport", flush=True)
    results = {t: run_transport(t, args) for t in args.transports.split(",")}
    print("\nsummary: CRM CPU s for capture per "
          f"{args.seconds:g} s (target: <= 0.3 at 200/s, <= 0.8 at 1,000/s)")
    for transport, phases in results.items():
        print(f"  {transport:6} " + "   ".join(f"{p.name}: {p.producer_cpu:.2f}"
                                              for p in phases))


if __name__ == "__main__":
    main()
