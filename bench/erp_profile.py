"""Where does the ERP side spend its time at a low, steady rate? (python -m bench.erp_profile)

The demo CRM's change mix (orders moving through statuses, quantity corrections, customer
edits) at ``--rate`` changes/s for ``--seconds``, through one producer and one consumer process.
Printed: the CPU seconds of the ERP's PostgreSQL backends and of the consumer per 10 s
(from /proc), the consumer's hottest functions (py-spy, when installed), and the ERP's
statements by total time (``pg_stat_statements``).

``pg_stat_statements`` needs ``shared_preload_libraries``: give ``--erp-server`` a DSN of a
PostgreSQL server of your own that preloads it (the shared stack's is not restarted for
this); without it the ERP is on the stack's server and statement figures are skipped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import bench_settings
from bench.proc import total_cpu_seconds
from service.demo.load import load_demo
from service.ops import group_lag
from service.settings import REPO_ROOT, Settings
from tests.helpers import settings_env, wait_until


def erp_backends(settings: Settings) -> list[int]:
    db = settings.erp_dsn.rsplit("/", 1)[1]
    with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (db,))]


def private_erp(settings: Settings, server: str) -> Settings:
    db = settings.erp_dsn.rsplit("/", 1)[1]
    with psycopg.connect(f"{server.rsplit('/', 1)[0]}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
        conn.execute(f'CREATE DATABASE "{db}"')
    out = dataclasses.replace(settings, erp_dsn=f"{server.rsplit('/', 1)[0]}/{db}")
    with psycopg.connect(out.erp_dsn, autocommit=True) as conn:
        for name in ("schema.sql", "sync_schema.sql"):  # the sql target's ERP, the sync state
            conn.execute((REPO_ROOT / "service/erp" / name).read_text(encoding="utf-8"))
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return out


def erp_orders(settings: Settings) -> int:
    with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM erp.sales_orders").fetchone()
    return int(row[0]) if row else 0


def caught_up(settings: Settings) -> bool:
    lag = group_lag(settings)
    return bool(lag) and all(p.lag == 0 for p in lag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--erp-server", help="DSN of a server that preloads pg_stat_statements")
    args = parser.parse_args()
    with bench_settings(producer_poll_ms=10) as settings:
        if args.erp_server:
            settings = private_erp(settings, args.erp_server)
        env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
        procs = [subprocess.Popen([sys.executable, "-m", "service.cli", c], env=env)
                 for c in ("produce", "consume")]
        spy = out = None
        try:
            wait_until(lambda: bool(group_lag(settings)) and erp_backends(settings),
                       timeout=120, message="the consumer to join and connect")
            # Some thousand customers and orders inserted at once (so that the demo's few
            # invalid customers get few changes each), then the changes at the rate; the
            # measurement starts once the inserts are applied.
            done: list[Any] = []
            loader = threading.Thread(target=lambda: done.append(load_demo(
                settings.crm_dsn, customers=3000, orders=6000, rate=args.rate, seed=4,
                changes=int(args.rate * (args.seconds + 30)), market_demand=0)))
            loader.start()
            wait_until(lambda: erp_orders(settings) >= 5000 and caught_up(settings),
                       timeout=120, message="the inserts to be applied")
            backends = erp_backends(settings)
            if args.erp_server:
                with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
                    conn.execute("SELECT pg_stat_statements_reset()")
            consumer = procs[1].pid
            if shutil.which("py-spy"):
                out = Path(tempfile.mkdtemp()) / "consumer.txt"
                spy = subprocess.Popen(["py-spy", "record", "--format", "raw", "-r", "200",
                                        "-o", str(out), "-p", str(consumer)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            erp0, ours0 = total_cpu_seconds(backends), total_cpu_seconds([consumer])
            t0 = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - t0
            erp1, ours1 = total_cpu_seconds(backends), total_cpu_seconds([consumer])
            lag = sum(p.lag for p in group_lag(settings))
            print(f"changes at {args.rate:g}/s; measured {elapsed:.1f}s (lag at the end {lag}): "
                  f"ERP PostgreSQL {10 * (erp1 - erp0) / elapsed:.2f} CPU-s per 10 s, "
                  f"consumer {10 * (ours1 - ours0) / elapsed:.2f} CPU-s per 10 s")
            if spy is not None and out is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                _print_profile(out)
            if args.erp_server:
                _print_statements(settings)
            loader.join()
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)


def _print_profile(path: Path, top: int = 25) -> None:
    """Inclusive share of samples per function of ours (service.*), from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            if "service/" in frame or "psycopg/" in frame:
                name = frame.split(" (")[0] + " (" + frame.split("/")[-1].split(":")[0]
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += n
    print(f"\nconsumer, py-spy, {total} samples; inclusive share (ours and psycopg):")
    for name, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name})")


def _print_statements(settings: Settings, top: int = 15) -> None:
    with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT calls, total_exec_time, mean_exec_time, rows, "
            "regexp_replace(left(query, 110), '\\s+', ' ', 'g') FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT %s", (top,)).fetchall()
        total = conn.execute("SELECT sum(total_exec_time), sum(calls) FROM pg_stat_statements "
                             "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = "
                             "current_database())").fetchone()
    print(f"\nERP statements (pg_stat_statements): {total[1]:,} calls, {total[0]:,.0f} ms")
    print(f"  {'calls':>7} {'total ms':>9} {'mean ms':>8} {'rows':>7}  query")
    for calls, tot, mean, n, query in rows:
        print(f"  {calls:>7} {tot:>9.1f} {mean:>8.3f} {n:>7}  {query}")


if __name__ == "__main__":
    main()
