"""`make demo`: the whole pipeline on the local stack, end to end, then what the ERP holds.

Starts one producer and two consumer replicas as real processes, loads the demo CRM
(including a few records as messy as real CRMs hold: the brief's masked phone 138xxxx5678,
a product the ERP does not know), waits until everything is through, and prints the ERP's
tables, a few mapped examples with personal data masked, and the dead letters with reasons.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service import ops, pg
from service.demo.load import load_demo
from service.settings import REPO_ROOT, Settings
from service.setup import run_setup

MESSY_RECORDS = """
WITH c AS (
    INSERT INTO crm.customers (family_name, given_name, gender, phone, email, address)
    VALUES ('张', '三', '男', '138xxxx5678', 'zhangsan@example.com', '北京市朝阳区XX路XX号')
    RETURNING customer_id
), o AS (
    INSERT INTO crm.sales_orders (order_no, customer_id, order_date, status, currency)
    SELECT 'DEMO-' || customer_id, customer_id, DATE '2023-01-01', '已发货', '元' FROM c
    RETURNING order_id, customer_id
)
INSERT INTO crm.order_lines (order_id, line_no, customer_id, product_code, product_name,
                             quantity, unit_price)
SELECT order_id, 1, customer_id, 'P-HOVERBOARD', '平衡车', '10台', 5000.00 FROM o
"""


def _mask(text: str | None, keep: int = 1) -> str:
    if not text:
        return "-"
    return text[:keep] + "*" * max(1, len(text) - keep - 2) + text[-2:] if len(text) > 3 \
        else text[:keep] + "*" * (len(text) - keep)


def _spawn(
    args: list[str], log_path: Path, settings_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = log_path.open("ab")
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **settings_env})


def run_demo(settings: Settings, *, customers: int, orders: int) -> int:
    logs = REPO_ROOT / ".stack" / "demo"
    print(f"setup: topics, CRM capture objects, ERP schema (logs in {logs})")
    run_setup(settings)
    # A dev stack's slot may have been lost to other work's WAL: start over with a snapshot.
    resync = {"CRM_ERP_SYNC_ON_SLOT_LOST": "resnapshot"}
    procs = [_spawn(["produce"], logs / "producer.log", resync)]
    procs += [_spawn(["consume"], logs / f"consumer-{i}.log", {}) for i in (1, 2)]
    try:
        # Changes made before the slot exists would reach the ERP only as snapshot reads.
        deadline = time.monotonic() + 60
        while (ops.slot_state(settings) or {}).get("wal_status") in (None, "lost"):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                print(f"demo: the producer did not create its slot; see {logs}",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
        started = time.monotonic()
        report = load_demo(settings.crm_dsn, customers=customers, orders=orders, rate=None,
                           seed=int(time.time()), changes=None)
        with pg.connect(settings.crm_dsn, "CRM") as conn:
            conn.execute(MESSY_RECORDS)
        target = ops.current_lsn(settings)
        print(f"CRM: loaded {report}")
        print("waiting for the producer and both consumers to catch up ...")
        deadline = time.monotonic() + 300
        while not ops.caught_up(settings, target):
            if time.monotonic() > deadline:
                print("demo: the pipeline did not catch up within 300 s; see the logs in "
                      f"{logs}", file=sys.stderr)
                return 1
            if any(p.poll() is not None for p in procs):
                print(f"demo: a pipeline process exited early; see {logs}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"caught up in {time.monotonic() - started:.1f} s\n")
        print_erp_summary(settings)
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def print_erp_summary(settings: Settings) -> None:
    with pg.connect(settings.erp_dsn, "ERP") as conn:
        print("ERP tables (rows live / deleted):")
        for table in ("business_partners", "sales_orders", "sales_order_items",
                      "demand_signals"):
            row = conn.execute(f"SELECT count(*) FILTER (WHERE NOT deleted), "
                               f"count(*) FILTER (WHERE deleted) FROM erp.{table}").fetchone()
            assert row is not None
            print(f"  erp.{table:<20} {row[0]:>7} / {row[1]}")
        print("\nmapped partners (personal data masked):")
        for name, gender, phone, province, district, amount, ccy in conn.execute(
                "SELECT full_name, gender_code, phone_e164, province, district, "
                "purchase_amount, amount_currency FROM erp.business_partners "
                "WHERE NOT deleted ORDER BY crm_customer_id LIMIT 5"):
            print(f"  {_mask(name)}  gender={gender}  phone={_mask(phone, 4)}  "
                  f"{province or '-'} {district or '-'}  {amount or '-'} {ccy or ''}")
        print("\norders -> ERP status and items:")
        for order_no, status, items in conn.execute(
                "SELECT o.order_no, o.status_code, string_agg(i.quantity::text || ' ' || "
                "i.unit_code || ' ' || i.sku || ' @ ' || i.unit_price || ' ' || o.currency, "
                "'; ') FROM erp.sales_orders o JOIN erp.sales_order_items i USING (crm_order_id)"
                " WHERE NOT o.deleted AND NOT i.deleted GROUP BY 1, 2 ORDER BY 1 LIMIT 5"):
            print(f"  {order_no}  {status:<16} {items}")
        print("\nstock (top reserved):")
        for sku, on_hand, reserved in conn.execute(
                "SELECT sku, on_hand, reserved FROM erp.stock ORDER BY reserved DESC LIMIT 5"):
            print(f"  {sku:<12} on hand {on_hand:>12}  reserved {reserved:>8}")
        print("\ndead letters (open), and why:")
        rows = conn.execute(
            "SELECT stage, error_class, error_message, count(*) FROM sync.dead_letters "
            "WHERE state = 'open' GROUP BY 1, 2, 3 ORDER BY 4 DESC").fetchall()
        for stage, cls, message, count in rows:
            print(f"  {count:>4} x {stage}/{cls}: {message}")
        if not rows:
            print("  none")
        held = conn.execute("SELECT reason, count(*) FROM sync.held_events GROUP BY 1").fetchall()
        for reason, count in held:
            print(f"  held: {count} event(s) {reason}")
