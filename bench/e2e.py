"""End-to-end benchmark: CRM commit -> ERP commit through the producer and two consumers.

Throughput: N changes committed as fast as PostgreSQL takes them, time until the ERP holds
them all. Latency: a fixed rate (1,000 changes a second by default); for each change, the ERP
row's applied_at minus the CRM commit time it carries (both clocks are the same machine's).
The pipeline runs as three processes (one producer, two consumers), as in production.
Run: python -m bench.e2e (from the repo root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg

from bench.common import CUSTOMER_INSERT as INSERT
from bench.common import bench_settings, load_arguments, percentile
from service.settings import Settings
from tests.helpers import settings_env


def erp_count(settings: Settings) -> int:
    with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM erp.business_partners").fetchone()
    return int(row[0]) if row else 0


def wait_for(settings: Settings, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while erp_count(settings) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"ERP did not reach {n} rows within {timeout}s")
        time.sleep(0.05)


def main() -> None:
    args = load_arguments(__doc__)
    with bench_settings(producer_poll_ms=10) as settings:
        # The pipeline runs as in production: one producer and two consumer processes.
        env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
        procs = [subprocess.Popen([sys.executable, "-m", "service.cli", command], env=env)
                 for command in ("produce", "consume", "consume")]
        try:
            time.sleep(5)  # slot, group, assignment
            total = args.rate * args.seconds
            with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
                start = time.perf_counter()
                for i in range(total):
                    delay = start + i / args.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    conn.execute(INSERT, (i + 1, i + 1))
                achieved = total / (time.perf_counter() - start)
            wait_for(settings, total)
            with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
                lat = [float(r[0]) for r in conn.execute(
                    "SELECT extract(epoch FROM applied_at - crm_commit_time) * 1000 "
                    "FROM erp.business_partners")]
            print(f"end to end at {args.rate:,} changes/s for {args.seconds}s (achieved "
                  f"{achieved:,.0f}/s): CRM commit -> ERP commit p50 "
                  f"{percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
                  f"max {max(lat):.1f} ms")
            # The burst second: the SQL decoding interface re-reads WAL from the slot's
            # restart_lsn, which lags up to ~15 s behind; a burst first would slow what follows.
            first = total + 1
            started = time.perf_counter()
            with psycopg.connect(settings.crm_dsn, autocommit=True) as conn:
                for lo in range(first, first + args.changes, 1000):
                    conn.execute(INSERT, (lo, min(first + args.changes - 1, lo + 999)))
            wait_for(settings, total + args.changes)
            elapsed = time.perf_counter() - started
            print(f"end to end, {args.changes:,} changes committed as fast as possible "
                  f"(1,000 per transaction): {args.changes / elapsed:,.0f} changes/s "
                  f"CRM commit -> ERP commit ({elapsed:.1f}s)")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
