"""Producer benchmark (make bench-produce; or python -m bench.produce from the repo root).

1. Throughput: N CRM changes committed as fast as PostgreSQL takes them (``--txn-size`` per
   transaction, 1,000 by default; 1 is the burst of bench.compare), then the producer's rate
   from the WAL to broker acknowledgement and its CPU seconds per 1,000 changes (user +
   system of this process, all its threads, while the producer alone runs in it), beside
   kafka-python alone producing the same number of events of the same bytes (acks=all,
   idempotent) in the same run. ``--throughput-only`` skips the latency run.
2. Latency: commit-to-acknowledgement p50/p99 at a fixed rate of 1,000 changes a second.
3. With ``--big-txn N`` (make bench-big-txn: N = 1,000,000) instead: the peak RSS (VmHWM, from
   /proc) of a producer process that publishes one transaction of N inserted rows, beside a
   producer process that publishes a 1,000-row transaction (the baseline), in the same run.
   Fails when the big run's peak is over ``--max-rss-mb`` (300).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bench.common import CUSTOMER_INSERT as INSERT
from bench.common import bench_settings, load_arguments, percentile
from service.avro import SchemaRegistry
from service.cdc.events import Outgoing
from service.cdc.producer import CdcProducer
from service.kafka_io import make_consumer, make_producer
from service.settings import Settings
from tests.helpers import read_topic, settings_env


def _commit(settings: Settings, n: int, txn_size: int) -> None:
    """n inserts in transactions of txn_size; one-change transactions are pipelined (as the
    burst of bench.compare) with asynchronous commit, so the load itself is quick."""
    with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
        if txn_size == 1:
            conn.execute("SET synchronous_commit TO off")
            with conn.pipeline():
                for i in range(1, n):
                    conn.execute(INSERT, (i, i))
            # the last one synchronous: it flushes the WAL of all before it, so the producer
            # started next sees every change as flushed (its until-idle check)
            conn.execute("SET synchronous_commit TO on")
            conn.execute(INSERT, (n, n))
            return
        for lo in range(1, n + 1, txn_size):
            conn.execute(INSERT, (lo, min(n, lo + txn_size - 1)))


def throughput(n: int, txn_size: int) -> None:
    with bench_settings() as settings:
        registry = SchemaRegistry.load(settings.schemas_dir)
        CdcProducer(settings, registry).run(until_idle=True)  # slot + empty snapshot
        started = time.perf_counter()
        _commit(settings, n, txn_size)
        commit_s = time.perf_counter() - started
        producer = CdcProducer(settings, registry)
        started = time.perf_counter()
        cpu_started = time.process_time()
        producer.run(until_idle=True)
        ours_cpu = time.process_time() - cpu_started
        ours_s = time.perf_counter() - started
        assert producer.stats.events == n, producer.stats
        values = [(r.key, r.value) for r in read_topic(settings, settings.sales_topic)]
        raw = make_producer(settings)
        started = time.perf_counter()
        futures = [raw.send(settings.market_topic, key=k, value=v) for k, v in values]
        raw.flush()
        for f in futures:
            f.get(timeout=30)
        raw_s = time.perf_counter() - started
        raw.close()
        size = sum(len(v) for _, v in values) / len(values)
        print(f"throughput, {n:,} changes of ~{size:.0f} bytes each "
              f"({txn_size:,} per transaction)")
        print(f"  CRM commits (PostgreSQL alone)      {n / commit_s:>10,.0f} changes/s")
        print(f"  crm-erp-sync produce (WAL -> acked) {n / ours_s:>10,.0f} events/s")
        print(f"  producer CPU per 1,000 changes      {ours_cpu * 1000 / n:>10.3f} s "
              f"({ours_cpu:.1f} s in all)")
        print(f"  kafka-python alone, same bytes      {n / raw_s:>10,.0f} events/s (baseline)")
        print(f"  ratio ours / baseline               {raw_s / ours_s:>10.2f}")


def latency(rate: int, seconds: int) -> None:
    with bench_settings(producer_poll_ms=10) as settings:
        registry = SchemaRegistry.load(settings.schemas_dir)
        producer = CdcProducer(settings, registry)
        latencies: list[float] = []

        def acked(events: list[Outgoing]) -> None:
            now = datetime.now(UTC)
            latencies.extend((now - e.record["source"]["commit_time"]).total_seconds() * 1000
                             for e in events)

        producer.on_acknowledged = acked
        runner = threading.Thread(target=producer.run)
        runner.start()
        time.sleep(2)  # slot created, snapshot done
        with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
            start = time.perf_counter()
            total = rate * seconds
            for i in range(total):
                deadline = start + i / rate
                delay = deadline - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(INSERT, (i + 1, i + 1))
            achieved = total / (time.perf_counter() - start)
        end = time.monotonic() + 30
        while len(latencies) < total and time.monotonic() < end:
            time.sleep(0.05)
        producer.stop()
        runner.join()
        print(f"latency at {rate:,} changes/s for {seconds}s (achieved {achieved:,.0f}/s, "
              f"{len(latencies):,} events acknowledged)")
        print(f"  commit -> broker ack  p50 {percentile(latencies, 50):7.1f} ms   "
              f"p99 {percentile(latencies, 99):7.1f} ms   max {max(latencies):7.1f} ms")


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set size (VmHWM in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _published(settings: Settings) -> int:
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(settings.sales_topic) or set()
        from kafka import TopicPartition

        return sum(consumer.end_offsets([TopicPartition(settings.sales_topic, p)
                                         for p in parts]).values())
    finally:
        consumer.close()


def _one_transaction(settings: Settings, first_id: int, rows: int) -> tuple[int, float, int]:
    """A producer process of its own publishes one transaction of ``rows`` inserts: its peak
    RSS (KiB), the seconds from the commit until the slot was confirmed past it, and the
    events it published."""
    env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "produce"], env=env)
    try:
        with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
            def slot_confirmed(lsn: str) -> bool:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                    "WHERE slot_name = %s", (lsn, settings.slot_name)).fetchone()
                return bool(row and row[0])

            def wait(lsn: str, what: str, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while not slot_confirmed(lsn):
                    if proc.poll() is not None:
                        raise SystemExit(f"the producer exited ({proc.returncode}) {what}")
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the producer did not confirm {what} in {timeout:.0f}s")
                    time.sleep(0.5)

            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            wait(row[0], "its start", 120)  # slot created (first run: empty snapshot)
            before = _published(settings)
            conn.execute(INSERT, (first_id, first_id + rows - 1))  # one transaction
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            committed = time.perf_counter()
            wait(row[0], f"the {rows:,}-row transaction", 3600)
            seconds = time.perf_counter() - committed
            peak = _vm_hwm_kib(proc.pid)
        return peak, seconds, _published(settings) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def big_transaction(rows: int, max_rss_mb: float, transport: str) -> None:
    with bench_settings(capture_transport=transport) as settings:
        base_kib, base_s, base_events = _one_transaction(settings, 1, 1000)
        big_kib, big_s, big_events = _one_transaction(settings, 1001, rows)
    assert (base_events, big_events) == (1000, rows), (base_events, big_events)
    print(f"one big CRM transaction ({settings.capture_transport} transport, "
          f"producer_max_changes {settings.producer_max_changes:,})")
    base_mb, big_mb = base_kib * 1024 / 1e6, big_kib * 1024 / 1e6
    print(f"  baseline: 1,000-row transaction  producer peak RSS (VmHWM) {base_mb:7.1f} MB "
          f"(published in {base_s:.1f}s)")
    print(f"  {rows:>9,}-row transaction  producer peak RSS (VmHWM) {big_mb:7.1f} MB "
          f"(published in {big_s:.1f}s, {big_events / big_s:,.0f} events/s)")
    if big_mb > max_rss_mb:
        raise SystemExit(f"peak RSS {big_mb:.1f} MB is over {max_rss_mb:g} MB")
    print(f"  under the {max_rss_mb:g} MB limit")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--big-txn", type=int, default=0, metavar="ROWS")
    parser.add_argument("--max-rss-mb", type=float, default=300.0)
    parser.add_argument("--transport", choices=("stream", "sql"), default="stream")
    parser.add_argument("--txn-size", type=int, default=1000)
    parser.add_argument("--throughput-only", action="store_true")
    big, rest = parser.parse_known_args()
    if big.big_txn:
        big_transaction(big.big_txn, big.max_rss_mb, big.transport)
        return
    sys.argv[1:] = rest
    args = load_arguments(__doc__)
    throughput(args.changes, big.txn_size)
    if not big.throughput_only:
        latency(args.rate, args.seconds)


if __name__ == "__main__":
    main()
