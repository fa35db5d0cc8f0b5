"""The comparison bench of issue #13: our pipeline, phase by phase, beside do-nothing baselines.

Run: ``make bench`` or ``python -m bench.compare [--quick] [--burst N] [--seconds S]``.

One producer and two consumer processes (``crm-erp-sync produce`` / ``consume``, as in
production, default settings) on private CRM/ERP databases and topics of the local stack, the
demo CRM's workload (``service.demo.load.DemoWorkload``), in this order:

1. bulk load: the demo's inserts, 30,000 customers and 50,000 orders with their lines and
   market demand (about 170k rows in 66 COPY transactions): rows/s from the first insert to
   the ERP's last apply;
2. steady 200 changes/s, then 3. steady 1,000 changes/s (one-change transactions, one CRM
   session per 100/s, committed synchronously as PostgreSQL's default is; the bulk load and
   the burst commit asynchronously, as the demo loader does, so the load is not what limits
   them): measured over ``--seconds`` after a warm-up; the rate achieved is
   printed (a busy machine can hold the load itself back);
4. burst: ``--burst`` one-change transactions pipelined from one session as fast as the CRM
   takes them: changes/s from the first commit to the ERP's last apply;
5. steady 200 changes/s right after the burst.

Per phase: changes (or rows) per second; commit -> ERP row latency p50/p95/p99 in ms (each
ERP row's ``applied_at``, the ERP's clock at apply, minus the CRM commit time its event
carries; one sample per ERP row whose last change was committed in the window, so a change
overwritten later in the window is not sampled); CPU seconds per 10 s (user + system, from
``/proc/<pid>/stat``) of the CRM's backends serving capture (the producer's session, lock
session and walsender: every client backend and walsender of the CRM database except the
load's and the bench's own), the ERP's backends (every client backend of the ERP database but
the bench's), the broker's JVM, and our three processes; the peak RSS (``VmHWM``, reset
at each phase's start) of our three processes added up, which is what the 250 MiB target is
checked against (the issue's Debezium figure is RSS); and beside it, for information, their
peak PSS added up (``smaps_rollup``, sampled every 0.2 s): RSS counts every shared library
page once per process, PSS shares it among them.

A phase ends when a marker row committed after its last change has reached the ERP and the
consumer group has no lag left.

Baselines, in the same run: the bulk load's rows COPYed in the same transactions into plain
tables (no keys, no publication) of a database of their own, before the pipeline starts; and,
after it has stopped, kafka-python reading the burst's records and doing nothing with them.

The broker is the shared stack's: its CPU includes whatever else uses it meanwhile (other
sessions' tests), as does the machine's load. PostgreSQL and the broker must run on this
machine (their ``/proc`` is read); the local stack does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from kafka import TopicPartition

from bench.common import PacedLoad, bench_settings, percentile
from bench.proc import (
    listening_pid,
    peak_rss_mib,
    pss_mib,
    reset_peak_rss,
    total_cpu_seconds,
)
from service import log
from service.demo.generator import Change, DemoGenerator
from service.demo.load import DemoWorkload, InsertBatch, copy_batch, ensure_crm_schema
from service.kafka_io import make_consumer
from service.operator.status import broker_members
from service.ops import group_lag
from service.settings import Settings
from tests.helpers import settings_env

ISSUE_CUSTOMERS, ISSUE_ORDERS = 30_000, 50_000  # ~170k rows in 66 transactions
LOW, HIGH = 200, 1000
SEED = 13

# Every ERP table that records when a change was applied (order lines ride on their order).
ERP_APPLIED = ("(SELECT applied_at, crm_commit_time FROM erp.business_partners UNION ALL "
               "SELECT applied_at, crm_commit_time FROM erp.sales_orders UNION ALL "
               "SELECT applied_at, crm_commit_time FROM erp.demand_signals) t")
MARKER_INSERT = ("INSERT INTO crm.market_demand (kind, product_category, content, observed_at) "
                 "VALUES (%s, %s, %s, %s) RETURNING demand_id")


@dataclasses.dataclass
class Result:
    """One phase's figures. CPU in seconds per 10 s, by group (crm, erp, broker, ours)."""

    name: str
    unit: str               # "rows/s" or "changes/s"
    rate: float
    count: int
    seconds: float
    latencies_ms: list[float]
    cpu: dict[str, float]
    rss_mib: float
    note: str = ""
    wanted: int | None = None  # a steady phase's rate: the load may fall short of it
    rss_by: dict[str, float] = dataclasses.field(default_factory=dict)  # MiB per process
    pss_mib: float = float("nan")  # summed sampled peak PSS; not compared with the target
    pss_by: dict[str, float] = dataclasses.field(default_factory=dict)  # MiB per process


class System:
    """Our three processes on private databases and topics, and the PIDs the meters read."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, command in (("producer", "produce"), ("consumer-1", "consume"),
                              ("consumer-2", "consume")):
            with (logs / f"{name}.log").open("wb") as out:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", command], env=env, stdout=out,
                    stderr=subprocess.STDOUT)
        self.crm = psycopg.connect(settings.crm_dsn, autocommit=True)
        self.erp = psycopg.connect(settings.erp_dsn, autocommit=True)
        port = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
        self.broker = listening_pid(port)
        self.load_pids: set[int] = set()  # CRM backends of the load, not of capture

    @property
    def ours(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-3:]
                raise SystemExit(f"{name} exited ({proc.returncode}); see {self.logs}; its "
                                 "last lines:\n" + "\n".join(tail))

    def crm_capture_backends(self) -> list[int]:
        rows = self.crm.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type IN ('client backend', 'walsender') "
            "AND pid <> pg_backend_pid()").fetchall()
        return [r[0] for r in rows if r[0] not in self.load_pids]

    def erp_backends(self) -> list[int]:
        rows = self.erp.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()
        return [r[0] for r in rows]

    def groups(self) -> dict[str, list[int]]:
        """PIDs by group; no "broker" when its process is not found on this machine."""
        groups = {"crm": self.crm_capture_backends(), "erp": self.erp_backends(),
                  "ours": self.ours}
        if self.broker:
            groups["broker"] = [self.broker]
        return groups

    def wait_ready(self, timeout: float = 180) -> None:
        """Slot created, initial snapshot done, both consumers in the group."""
        deadline = time.monotonic() + timeout
        while not (self._capturing() and self._members() == 2):
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"the pipeline did not start within {timeout:.0f} s; "
                                 f"see {self.logs}")
            time.sleep(0.2)

    def _capturing(self) -> bool:
        row = self.crm.execute(
            # Streaming: the walsender attached; SQL peeks hold the slot only while they run.
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s "
            "AND (active OR %s)), to_regclass('crm_erp_sync.snapshots') IS NOT NULL",
            (self.settings.slot_name, self.settings.capture_transport == "sql")).fetchone()
        if row != (1, True):
            return False
        pending = self.crm.execute(
            "SELECT count(*) FROM crm_erp_sync.snapshots WHERE state = 'pending'").fetchone()
        return pending == (0,)

    def _members(self) -> int:
        """Members of the group with partitions assigned, as the broker lists them."""
        return sum(1 for m in broker_members(self.settings) if m["partitions"])

    def end_offsets(self) -> dict[TopicPartition, int]:
        return {TopicPartition(p.topic, p.partition): p.end for p in group_lag(self.settings)}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.crm.close()
        self.erp.close()


class Meter:
    """CPU seconds per group of processes and our peak RSS and PSS over one window.

    Peak RSS is the kernel's high-water mark (``VmHWM``), exact. PSS has no high-water mark:
    a sampler thread reads each of our processes' ``smaps_rollup`` every `pss_every_s` and
    keeps the largest, so a spike shorter than that can be missed (PSS is at most RSS)."""

    def __init__(self, system: System, pss_every_s: float = 0.2) -> None:
        self.system = system
        self.t0 = 0.0
        self.cpu0: dict[str, dict[int, float]] = {}
        self.rss_by: dict[str, float] = {}  # after stop(): each of our processes' peak, MiB
        self.pss_by: dict[str, float] = {}  # after stop(): each one's largest PSS sample, MiB
        self.pss_every_s = pss_every_s
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample_pss(self) -> None:
        while True:
            for name, proc in self.system.procs.items():
                self.pss_by[name] = max(self.pss_by.get(name, 0.0), pss_mib(proc.pid))
            if self._stop.wait(self.pss_every_s):
                return

    def start(self) -> None:
        for pid in self.system.ours:
            reset_peak_rss(pid)
        self.cpu0 = {g: {pid: total_cpu_seconds([pid]) for pid in pids}
                     for g, pids in self.system.groups().items()}
        self.pss_by = {}
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample_pss, name="pss", daemon=True)
        self._sampler.start()
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[dict[str, float], float, float]:
        """(CPU seconds per 10 s by group, our summed peak RSS in MiB, window seconds).
        A process that started inside the window counts whole; one that ended is lost.
        The summed PSS peak is :attr:`pss_mib` afterwards."""
        groups = self.system.groups()
        elapsed = time.perf_counter() - self.t0
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        cpu = {}
        for g, pids in groups.items():
            used = sum(total_cpu_seconds([pid]) - self.cpu0[g].get(pid, 0.0) for pid in pids)
            cpu[g] = 10 * used / elapsed
        self.rss_by = {name: peak_rss_mib(proc.pid)
                       for name, proc in self.system.procs.items()}
        return cpu, sum(self.rss_by.values()), elapsed

    @property
    def pss_mib(self) -> float:
        """Sum of our processes' largest PSS samples in the last window, MiB."""
        return sum(self.pss_by.values())


def connect_writer(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit session with asynchronous commit, as the demo loader's."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET synchronous_commit TO off")
    return conn


class Bench:
    def __init__(self, system: System, workload: DemoWorkload, writer: psycopg.Connection[Any],
                 warmup: float) -> None:
        self.system = system
        self.workload = workload
        self.writer = writer
        self.warmup = warmup
        self.markers = DemoGenerator(SEED + 1)
        system.load_pids.add(writer.info.backend_pid)

    # ---- end of a phase ---------------------------------------------------------------
    def drain(self, timeout: float) -> None:
        """A marker row committed now has reached the ERP and no partition has lag left:
        everything committed before is applied (the producer publishes in commit order)."""
        row = self.writer.execute(MARKER_INSERT, tuple(self.markers.market_demand())).fetchone()
        assert row is not None
        marker = str(row[0])
        deadline = time.monotonic() + timeout
        while self.system.erp.execute("SELECT 1 FROM erp.demand_signals "
                                      "WHERE crm_demand_id = %s", (marker,)).fetchone() is None:
            self._check(deadline, "the marker to reach the ERP")
            time.sleep(0.05)
        while not all(p.lag == 0 for p in group_lag(self.system.settings)):
            self._check(deadline, "the consumer group's lag to reach 0")
            time.sleep(0.2)

    def _check(self, deadline: float, what: str) -> None:
        self.system.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; see {self.system.logs}")

    def applied(self, since: datetime, until: datetime) -> tuple[list[float], datetime | None]:
        """(commit -> ERP ms of the ERP rows whose change was committed in [since, until),
        the last applied_at among them)."""
        rows = self.system.erp.execute(
            f"SELECT extract(epoch FROM applied_at - crm_commit_time) * 1000, applied_at "
            f"FROM {ERP_APPLIED} WHERE crm_commit_time >= %s AND crm_commit_time < %s",
            (since, until)).fetchall()
        return [float(r[0]) for r in rows], max((r[1] for r in rows), default=None)

    # ---- phases -----------------------------------------------------------------------
    def bulk(self, batches: Sequence[InsertBatch]) -> Result:
        rows = sum(b.rows for b in batches)
        meter = Meter(self.system)
        meter.start()
        since = datetime.now(UTC)
        for batch in batches:
            self.workload.insert(self.writer, batch)
        until = datetime.now(UTC)
        self.drain(timeout=max(300.0, rows / 200))
        cpu, rss, _ = meter.stop()
        lat, last = self.applied(since, until)
        seconds = ((last or until) - since).total_seconds()
        return Result("1 bulk load", "rows/s", rows / seconds, rows, seconds, lat, cpu, rss,
                      f"{rows:,} rows in {len(batches)} transactions", rss_by=meter.rss_by,
                      pss_mib=meter.pss_mib, pss_by=dict(meter.pss_by))

    def burst(self, n: int) -> Result:
        changes = list(self.workload.changes(n))  # planned before the clock starts
        meter = Meter(self.system)
        meter.start()
        since = datetime.now(UTC)
        t0 = time.perf_counter()
        self.workload.apply_pipelined(self.writer, changes, len(changes))
        committed_s = time.perf_counter() - t0
        until = datetime.now(UTC)
        self.drain(timeout=max(300.0, n / 100))
        cpu, rss, _ = meter.stop()
        lat, last = self.applied(since, until)
        seconds = ((last or until) - since).total_seconds()
        return Result("2 burst", "changes/s", len(changes) / seconds, len(changes), seconds,
                      lat, cpu, rss,
                      f"{len(changes):,} one-change transactions, CRM committed them at "
                      f"{len(changes) / committed_s:,.0f}/s", rss_by=meter.rss_by,
                      pss_mib=meter.pss_mib, pss_by=dict(meter.pss_by))

    def steady(self, name: str, rate: int, seconds: float) -> Result:
        changes = self.workload.changes(10 ** 9)
        lock = threading.Lock()

        def one(conn: psycopg.Connection[Any], _: int) -> None:
            with lock:  # one planner: each change applies to a row that exists
                change: Change = next(changes)
                statements = self.workload.statements(change)
            # One round trip per change (BEGIN, statements, COMMIT pipelined): the load's own
            # latency must not cap the rate on a busy machine.
            with conn.pipeline(), conn.transaction():
                for query, params in statements:
                    conn.execute(query, params)

        # Committed as a CRM application does by default (synchronous_commit on). With it off
        # (the demo loader's bulk setting) a commit's WAL waits for the WAL writer, every
        # wal_writer_delay (200 ms), and a walsender sends only flushed WAL: up to 200 ms of
        # each change's latency would be the load's own setting, for any log-based capture.
        load = PacedLoad(self.system.settings.crm_dsn, rate, self.warmup + seconds, one,
                         synchronous_commit=True, per_session=100)
        self.system.load_pids |= load.pids
        meter = Meter(self.system)
        load.start()
        try:
            time.sleep(max(0.0, load.started + self.warmup - time.perf_counter()))
            meter.start()
            since, before = datetime.now(UTC), load.committed
            time.sleep(max(0.0, load.started + self.warmup + seconds - time.perf_counter()))
            cpu, rss, window = meter.stop()
            until, in_window = datetime.now(UTC), load.committed - before
        finally:
            load.join()
        self.drain(timeout=300)
        lat, _ = self.applied(since, until)
        return Result(name, "changes/s", in_window / window, in_window, window, lat, cpu,
                      rss, f"target rate {rate:,}/s", wanted=rate, rss_by=meter.rss_by,
                      pss_mib=meter.pss_mib, pss_by=dict(meter.pss_by))


# ---- baselines -------------------------------------------------------------------------
def copy_baseline(settings: Settings, batches: Sequence[InsertBatch]) -> tuple[float, int]:
    """(rows/s, rows): the batches COPYed, one transaction each, into plain tables (the CRM's
    columns, no keys, no indexes, no publication) of a fresh database."""
    prefix, crm_db = settings.crm_dsn.rsplit("/", 1)
    db = f"{crm_db}_copy"
    with psycopg.connect(settings.crm_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    try:
        with psycopg.connect(f"{prefix}/{db}", autocommit=True) as conn:
            ensure_crm_schema(conn)
            conn.execute("CREATE SCHEMA plain")
            for table in ("customers", "sales_orders", "order_lines", "market_demand"):
                conn.execute(f"CREATE TABLE plain.{table} "
                             f"(LIKE crm.{table} INCLUDING DEFAULTS INCLUDING IDENTITY)")
            conn.execute("SET synchronous_commit TO off")
            started = time.perf_counter()
            for batch in batches:
                copy_batch(conn, batch, schema="plain")
            elapsed = time.perf_counter() - started
    finally:
        with psycopg.connect(settings.crm_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    rows = sum(b.rows for b in batches)
    return rows / elapsed, rows


def consume_baseline(settings: Settings, start: dict[TopicPartition, int],
                     end: dict[TopicPartition, int]) -> tuple[float, int]:
    """(records/s, records): kafka-python reading the records between two offset maps (the
    burst's) and doing nothing with them; our consumers' connection options, no group."""
    consumer = make_consumer(settings, group_id=None)
    try:
        tps = [tp for tp in end if end[tp] > start.get(tp, 0)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start.get(tp, 0))
        count = 0
        started = time.perf_counter()
        deadline = time.monotonic() + 300
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=500).values():
                count += len(records)
            if time.monotonic() > deadline:
                raise SystemExit("the do-nothing consumer did not reach the burst's end")
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
    return count / elapsed, count


# ---- the table ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """A figure's target: at most (`le`) or at least (`ge`)."""

    bound: float
    le: bool = True

    def check(self, value: float) -> bool:
        return value <= self.bound if self.le else value >= self.bound

    def text(self, fmt: str) -> str:
        return f"{'<=' if self.le else '>='}{self.bound:{fmt}}"


def cell(value: float, fmt: str, target: Target | None = None,
         unit: str = "") -> tuple[str, bool | None]:
    """A figure with its target and verdict beside it, and the verdict (None: no target)."""
    text = f"{value:{fmt}}{' ' + unit if unit else ''}"
    if target is None:
        return text, None
    ok = target.check(value)
    return f"{text} ({target.text(fmt)} {'PASS' if ok else 'FAIL'})", ok


def within(after: float, before: float, share: float = 0.2,
           floor: float = 0.02) -> tuple[str, bool]:
    """After the burst the same as before within `share` (at least `floor` s per 10 s, two
    clock ticks of /proc's 10 ms resolution)."""
    ok = abs(after - before) <= max(share * before, floor)
    change = (after - before) / before * 100 if before else float("inf")
    return f"{change:+.0f}% vs before (<=20% {'PASS' if ok else 'FAIL'})", ok


def table(results: dict[str, Result], baselines: list[tuple[str, str]]) -> tuple[str, bool]:
    """The printed table and whether every target passed."""
    targets: dict[str, dict[str, Target]] = {
        "bulk": {"rate": Target(9000, le=False), "rss": Target(250)},
        "burst": {"rate": Target(5000, le=False), "rss": Target(250)},
        "low": {"p99": Target(100), "crm": Target(0.3), "erp": Target(1.5), "rss": Target(250)},
        "high": {"p99": Target(200), "crm": Target(0.8), "rss": Target(250)},
        "after": {"p99": Target(100), "crm": Target(0.3), "erp": Target(1.5),
                  "rss": Target(250)},
    }
    head = ["phase", "throughput", "p50 ms", "p95 ms", "p99 ms", "CRM capture CPU s/10s",
            "ERP PG CPU s/10s", "broker s/10s", "ours s/10s", "peak RSS MiB (ours, vs target)",
            "peak PSS MiB (ours, no target)"]
    lines: list[list[str]] = []
    verdicts: list[bool] = []
    for key, r in results.items():
        t = targets[key]
        row = [r.name]
        for text, ok in (
                cell(r.rate, ",.0f", t.get("rate"),
                     r.unit if r.wanted is None else f"of {r.wanted:,} {r.unit}"),
                cell(percentile(r.latencies_ms, 50), ".0f"),
                cell(percentile(r.latencies_ms, 95), ".0f"),
                cell(percentile(r.latencies_ms, 99), ".0f", t.get("p99")),
                cell(r.cpu["crm"], ".2f", t.get("crm")),
                cell(r.cpu["erp"], ".2f", t.get("erp")),
                cell(r.cpu["broker"], ".2f") if "broker" in r.cpu else ("n/a", None),
                cell(r.cpu["ours"], ".2f"),
                cell(r.rss_mib, ".0f", t.get("rss")),
                cell(r.pss_mib, ".0f")):
            row.append(text)
            if ok is not None:
                verdicts.append(ok)
        lines.append(row)
    if "low" in results and "after" in results:
        text, ok = within(results["after"].cpu["crm"], results["low"].cpu["crm"])
        verdicts.append(ok)
        lines.append(["  after vs before", "", "", "", "", text, "", "", "", "", ""])
    for name, figure in baselines:
        lines.append([name, figure, "", "", "", "", "", "", "", "", ""])
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in lines]
    return "\n".join(out), all(verdicts)


# ---- main ---------------------------------------------------------------------------------
@contextmanager
def running(settings: Settings) -> Iterator[System]:
    logs = Path(tempfile.mkdtemp(prefix="crm-erp-sync-bench-"))
    system = System(settings, logs)
    try:
        system.wait_ready()
        yield system
    finally:
        system.stop()


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="under 2 minutes: a tenth of the bulk load, --burst 5000, "
                             "--seconds 5")
    parser.add_argument("--customers", type=int, help=f"bulk load (default {ISSUE_CUSTOMERS:,})")
    parser.add_argument("--orders", type=int, help=f"bulk load (default {ISSUE_ORDERS:,})")
    parser.add_argument("--burst", type=int, help="one-change transactions (default 50,000)")
    parser.add_argument("--seconds", type=float,
                        help="measured seconds of each steady phase (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds before each steady window "
                                                     "(default 3)")
    parser.add_argument("--transport", choices=("stream", "sql"),
                        help="capture transport (default: the service's default)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (default: report only)")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (("customers", ISSUE_CUSTOMERS, 3000),
                              ("orders", ISSUE_ORDERS, 5000), ("burst", 50_000, 5000),
                              ("seconds", 10.0, 5.0), ("warmup", 3.0, 2.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    log.configure("warning", "console")  # the demo loader's progress lines are not figures
    overrides = {"capture_transport": args.transport} if args.transport else {}
    started = time.monotonic()
    print(f"bench.compare: 1 producer + 2 consumers, demo CRM workload; bulk "
          f"{args.customers:,} customers + {args.orders:,} orders, burst {args.burst:,}, "
          f"steady {LOW}/s and {HIGH:,}/s for {args.seconds:g} s (+{args.warmup:g} s warm-up); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, Result] = {}
    with bench_settings(**overrides) as settings:
        workload = DemoWorkload(SEED)
        with connect_writer(settings.crm_dsn) as writer:
            n_demand = max(10, (args.customers + args.orders) // 50)
            batches = list(workload.insert_batches(writer, args.customers, args.orders,
                                                   n_demand))
            copy_rate, copy_rows = copy_baseline(settings, batches)
            print(f"  baseline: raw COPY {copy_rate:,.0f} rows/s", flush=True)
            with running(settings) as system:
                bench = Bench(system, workload, writer, args.warmup)
                steps: list[tuple[str, Callable[[], Result]]] = [
                    ("bulk", lambda: bench.bulk(batches)),
                    ("low", lambda: bench.steady(f"3 steady {LOW}/s", LOW, args.seconds)),
                    ("high", lambda: bench.steady(f"4 steady {HIGH:,}/s", HIGH, args.seconds)),
                    ("burst", lambda: bench.burst(args.burst)),
                    ("after", lambda: bench.steady(f"5 {LOW}/s after burst", LOW,
                                                   args.seconds)),
                ]
                offsets: dict[str, dict[TopicPartition, int]] = {}
                for key, step in steps:
                    if key == "burst":
                        offsets["before"] = system.end_offsets()
                    results[key] = step()
                    if key == "burst":
                        offsets["after"] = system.end_offsets()
                    r = results[key]
                    print(f"  {r.name}: {r.rate:,.0f} {r.unit} ({r.note}); p99 "
                          f"{percentile(r.latencies_ms, 99):,.0f} ms of "
                          f"{len(r.latencies_ms):,} samples; peak RSS MiB "
                          + ", ".join(f"{k} {v:.0f}" for k, v in r.rss_by.items())
                          + "; peak PSS MiB "
                          + ", ".join(f"{k} {v:.0f}" for k, v in r.pss_by.items()), flush=True)
        read_rate, read_n = consume_baseline(settings, offsets["before"], offsets["after"])
        print(f"  baseline: kafka-python reads {read_rate:,.0f} records/s", flush=True)
    order = ["bulk", "burst", "low", "high", "after"]
    printed, passed = table(
        {k: results[k] for k in order},
        [("baseline: raw COPY", f"{copy_rate:,.0f} rows/s ({copy_rows:,} rows)"),
         ("baseline: kafka-python read", f"{read_rate:,.0f} records/s (the burst's "
                                         f"{read_n:,} records)")])
    print(f"\nissue #13 figures, {time.monotonic() - started:.0f} s run; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the broker and the machine are "
          f"shared)\n")
    print(printed)
    print("\nMemory: the <=250 MiB target is checked against the summed peak RSS (VmHWM) of "
          "our three processes, the measure of the issue's Debezium figure; RSS counts the "
          "shared libraries' pages (libpython, libssl, libpq...) once per process. Peak PSS, "
          "each process's fair share of shared pages (largest of 0.2 s samples of "
          "smaps_rollup), is printed beside it for information only.")
    print(f"\n{'all targets met' if passed else 'some targets missed (FAIL above)'}")
    return 0 if passed or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
