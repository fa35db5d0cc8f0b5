"""Apply benchmark (make bench-apply; or python -m bench.apply from the repo root).

1. N events already in Kafka applied to the ERP by `crm-erp-sync consume`, beside, in the same
   run: consuming the same events with kafka-python doing nothing, and a raw COPY of the same
   resulting rows into tables of the same shape.
2. Bulk statement choice: the same partner upserts with executemany (pipelined) against COPY
   into a staging table then INSERT ... SELECT ... ON CONFLICT.
3. Peak memory (max RSS) of a consumer process working through a backlog.
End to end (CRM commit -> ERP row, phase by phase, with CPU and memory): bench.compare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.common import bench_settings
from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.demo.load import load_demo
from service.kafka_io import make_consumer
from service.ops import group_lag
from service.settings import Settings
from tests.helpers import settings_env

TABLES = ("business_partners", "sales_orders", "sales_order_items", "demand_signals")


def fill_topic(settings: Settings, events: int) -> int:
    """Demo CRM data through the real producer until about `events` events are in Kafka."""
    # Measured: an order with its lines is one event, and changes to one order inside one
    # transaction merge; these proportions give about `events` events.
    customers = max(100, events * 35 // 100)
    load_demo(settings.crm_dsn, customers=customers, orders=customers * 2, rate=None,
              seed=5, changes=customers)
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    producer.run(until_idle=True)
    return producer.stats.events


def consume_nothing(settings: Settings, total: int) -> float:
    consumer = make_consumer(settings, settings.sales_topic, settings.market_topic,
                             group_id=settings.consumer_group + ".baseline",
                             max_poll_records=5000)
    seen = 0
    started = time.perf_counter()
    while seen < total:
        for records in consumer.poll(timeout_ms=500).values():
            seen += len(records)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def raw_copy(settings: Settings) -> tuple[float, int]:
    with psycopg.connect(settings.erp_dsn, autocommit=True) as conn:
        rows = {t: conn.execute(f"SELECT * FROM erp.{t}").fetchall() for t in TABLES}
        cols = {t: [c.name for c in conn.execute(f"SELECT * FROM erp.{t} LIMIT 0").description]
                for t in TABLES}
        conn.execute("CREATE SCHEMA IF NOT EXISTS copy_bench")
        for t in TABLES:
            conn.execute(f"CREATE TABLE copy_bench.{t} (LIKE erp.{t} INCLUDING DEFAULTS)")
            generated = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'erp' "
                "AND table_name = %s AND is_generated = 'ALWAYS'", (t,))]
            keep = [i for i, c in enumerate(cols[t]) if c not in generated]
            cols[t] = [cols[t][i] for i in keep]
            rows[t] = [tuple(r[i] for i in keep) for r in rows[t]]
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for t in TABLES:
                with cur.copy(f"COPY copy_bench.{t} ({', '.join(cols[t])}) FROM STDIN") as copy:
                    for row in rows[t]:
                        copy.write_row(row)
        elapsed = time.perf_counter() - started
        conn.execute("DROP SCHEMA copy_bench CASCADE")
    return elapsed, sum(len(r) for r in rows.values())


def executemany_vs_copy(settings: Settings) -> tuple[float, float, int]:
    from service.erp.apply import PARTNER_UPSERT

    with psycopg.connect(settings.erp_dsn) as conn:
        rows = conn.execute(
            "SELECT crm_customer_id, full_name, gender_code, birth_date, age, phone_e164, email, "
            "province, city, district, street, purchase_frequency, purchase_amount, "
            "amount_currency, product_preference, notes, deleted, source_lsn + 1, source_seq, "
            "event_id, crm_commit_time FROM erp.business_partners").fetchall()
        conn.rollback()
        started = time.perf_counter()
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            cur.executemany(PARTNER_UPSERT, rows)
            many_s = time.perf_counter() - started
        started = time.perf_counter()
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE staging (LIKE erp.business_partners "
                        "INCLUDING DEFAULTS) ON COMMIT DROP")
            cols = ("crm_customer_id, full_name, gender_code, birth_date, age, phone_e164, "
                    "email, province, city, district, street, purchase_frequency, "
                    "purchase_amount, amount_currency, product_preference, notes, deleted, "
                    "source_lsn, source_seq, event_id, crm_commit_time")
            with cur.copy(f"COPY staging ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(PARTNER_UPSERT.split("VALUES")[0] + f"SELECT {cols} FROM staging "
                        + "ON CONFLICT" + PARTNER_UPSERT.split("ON CONFLICT")[1])
            copy_s = time.perf_counter() - started
    return many_s, copy_s, len(rows)


def peak_memory(settings: Settings) -> int:
    """Peak RSS (KiB) of a consumer process draining the backlog in a fresh group.

    Read from the child's own /proc/<pid>/status VmHWM while it runs: ru_maxrss of children
    would count the pages a forked child shares with this (large) process before exec.
    """
    env = {**os.environ, **settings_env(settings),
           "CRM_ERP_SYNC_CONSUMER_GROUP": settings.consumer_group + ".memory",
           "CRM_ERP_SYNC_LOG_LEVEL": "warning"}
    child = subprocess.Popen([sys.executable, "-m", "service.cli", "consume", "--until-idle",
                              "5"], env=env)
    status = Path(f"/proc/{child.pid}/status")
    peak = 0
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.2)
    if child.wait() != 0:
        raise SystemExit(f"the measured consumer exited with {child.returncode}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with bench_settings() as settings:
        t0 = time.perf_counter()
        total = fill_topic(settings, args.events)
        print(f"{total:,} events in Kafka (demo CRM through the producer, "
              f"{time.perf_counter() - t0:.0f}s to prepare)")
        consumer = ErpConsumer(settings)
        started = time.perf_counter()
        stats = consumer.run(until_idle_s=2)
        ours_s = time.perf_counter() - started - 2
        assert stats.messages == total, (stats, total)
        assert all(p.lag == 0 for p in group_lag(settings))
        nothing_s = consume_nothing(settings, total)
        copy_s, copy_rows = raw_copy(settings)
        print(f"apply {total:,} events (batch {settings.batch_max_events}):")
        print(f"  crm-erp-sync consume -> ERP          {total / ours_s:>10,.0f} events/s "
              f"({ours_s:.1f}s)")
        print(f"  kafka-python consume, do nothing     {total / nothing_s:>10,.0f} events/s "
              f"({nothing_s:.1f}s, baseline)")
        print(f"  raw COPY of the {copy_rows:,} resulting rows {total / copy_s:>8,.0f} events/s "
              f"equivalent ({copy_s:.1f}s, baseline)")
        many_s, staged_s, n = executemany_vs_copy(settings)
        print(f"bulk upsert of {n:,} partners: executemany {n / many_s:,.0f} rows/s, "
              f"COPY to staging + INSERT..SELECT {n / staged_s:,.0f} rows/s")
        peak = peak_memory(settings)
        print(f"consumer peak RSS draining a backlog of {total:,} events: {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
