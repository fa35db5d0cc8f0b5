"""Producer benchmark (make bench-produce; or python -m bench.produce from the repo root).

1. Throughput: N CRM changes committed as fast as PostgreSQL takes them, then the producer's
   rate from the WAL to broker acknowledgement, beside kafka-python alone producing the same
   number of events of the same bytes (acks=all, idempotent) in the same run.
2. Latency: commit-to-acknowledgement p50/p99 at a fixed rate of 1,000 changes a second.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import psycopg

from bench.common import CUSTOMER_INSERT as INSERT
from bench.common import bench_settings, load_arguments, percentile
from service.avro import SchemaRegistry
from service.cdc.events import Outgoing
from service.cdc.producer import CdcProducer
from service.kafka_io import make_producer
from tests.helpers import read_topic


def throughput(n: int) -> None:
    with bench_settings() as settings:
        registry = SchemaRegistry.load(settings.schemas_dir)
        CdcProducer(settings, registry).run(until_idle=True)  # slot + empty snapshot
        started = time.perf_counter()
        with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
            for lo in range(1, n + 1, 1000):  # 1,000-row transactions
                conn.execute(INSERT, (lo, min(n, lo + 999)))
        commit_s = time.perf_counter() - started
        producer = CdcProducer(settings, registry)
        started = time.perf_counter()
        producer.run(until_idle=True)
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
        print(f"throughput, {n:,} changes of ~{size:.0f} bytes each (1,000 per transaction)")
        print(f"  CRM commits (PostgreSQL alone)      {n / commit_s:>10,.0f} changes/s")
        print(f"  crm-erp-sync produce (WAL -> acked) {n / ours_s:>10,.0f} events/s")
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


def main() -> None:
    args = load_arguments(__doc__)
    throughput(args.changes)
    latency(args.rate, args.seconds)


if __name__ == "__main__":
    main()
