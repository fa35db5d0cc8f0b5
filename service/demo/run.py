"""`make demo`: the whole pipeline on the local stack, end to end, then what the ERP holds.

Starts one producer and two consumer replicas as real processes, loads the demo CRM
(including a few records as messy as real CRMs hold: the brief's masked phone 138xxxx5678,
a product the ERP does not know), waits until everything is through, and prints the ERP's
tables, a few mapped examples with personal data masked, and the dead letters with reasons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from service import ops, pg
from service.cdc import slot_guard
from service.cdc.capture import OWN_SCHEMA
from service.demo import bottlecrm
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
# An office landline with its extension (kept in phone_extension), a full address (its
# GB/T 2260 division code).
OFFICE_RECORD = """
INSERT INTO crm.customers (family_name, given_name, gender, phone, email, address)
VALUES ('王', '五', '女', '010-65521234转123', 'wangwu@example.com', '北京市朝阳区建国路88号')
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


@contextlib.contextmanager
def running_pipeline(logs: Path, env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One producer and two consumers as real processes (logs in ``logs``), stopped with
    SIGTERM (and killed after 30 s) when the block ends, whatever happened in it."""
    procs = [_spawn(["produce"], logs / "producer.log", env)]
    procs += [_spawn(["consume"], logs / f"consumer-{i}.log", env) for i in (1, 2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_demo(settings: Settings, *, customers: int, orders: int,
             logs: Path | None = None) -> int:
    """`make demo` with these settings (the processes get exactly them); logs in ``logs``
    (default ``.stack/demo``). Returns the exit code."""
    logs = logs or REPO_ROOT / ".stack" / "demo"
    print(f"setup: topics, CRM capture objects, ERP schema (logs in {logs})")
    run_setup(settings)
    found = start_capture_over(settings)
    if found is not None:
        print(f"capture: {found}; the demo owns its databases: new slot, full snapshot (rows "
              "deleted in the CRM meanwhile stay live in the ERP: `crm-erp-sync reconcile "
              "--repair` marks them)")
    # A slot lost while this run goes on: the producer starts over with a snapshot too.
    resync = {**_environment(settings), "CRM_ERP_SYNC_ON_SLOT_LOST": "resnapshot"}
    with running_pipeline(logs, resync) as procs:
        # Changes made before the slot exists, or while the initial snapshot still reads,
        # would reach the ERP as snapshot reads (rows deleted meanwhile not at all, and a bad
        # row dead-lettered twice): load once the snapshot of the (empty) tables is done.
        if not wait_for_slot(settings, procs, logs, snapshots_done=True):
            return 1
        earlier = _demo_customers(settings)
        if earlier:
            print(f"the demo CRM already holds {earlier:,} customers from earlier runs: the "
                  "ERP's totals below include what they became")
        started = time.monotonic()
        report = load_demo(settings.crm_dsn, customers=customers, orders=orders, rate=None,
                           seed=int(time.time()), changes=None)
        with pg.connect(settings.crm_dsn, "CRM") as conn:
            conn.execute(MESSY_RECORDS)
            conn.execute(OFFICE_RECORD)
        print(f"CRM: loaded {report}")
        print("waiting for the producer and both consumers to catch up ...")
        if not wait_caught_up(settings, procs, logs, "the changes", started=started):
            return 1
        print()
        print_erp_summary(settings, earlier_runs=earlier > 0)
        return 0


def _demo_customers(settings: Settings) -> int:
    """Customers in the demo CRM before this run loads (0 when its tables are new): a
    second `make demo` on the same databases adds to the first's rows."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        row = conn.execute("SELECT CASE WHEN to_regclass('crm.customers') IS NULL THEN 0 "
                           "ELSE (SELECT count(*) FROM crm.customers) END").fetchone()
    return int(row[0]) if row is not None else 0


def start_capture_over(settings: Settings) -> str | None:
    """Before the demo's producer starts: when its slot was lost (a shared dev stack's other
    work pushed it past ``max_slot_wal_keep_size``), dropped or replaced, or its publication
    replaced, since the demo last ran, start capture over, as on a first run: drop the slot
    and forget the recorded capture state, so the producer creates a new slot with a full
    snapshot. A producer would otherwise stop capture until `crm-erp-sync resync` (right
    for a CRM someone else owns; the demo owns its databases). A slot a running process
    reads is left alone (its producer is the active one; ours waits as a standby).

    Returns what was found, for the operator (no values), or None when capture is fine."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        slot = conn.execute("SELECT wal_status, active FROM pg_replication_slots "
                            "WHERE slot_name = %s", (settings.slot_name,)).fetchone()
        if slot is not None and slot[1]:
            return None
        problem = slot_guard.inspect(conn, settings, slot_guard.load(conn, settings.slot_name))
        if problem is None and (slot is None or slot[0] != "lost"):
            return None
        found = (f"replication slot {settings.slot_name!r} is lost (PostgreSQL removed WAL it "
                 "needed)" if slot is not None and slot[0] == "lost" and (
                     problem is None or problem.kind == "slot_lost")
                 else problem.detail if problem is not None else "")
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND NOT active", (settings.slot_name,))
        slot_guard.ensure_table(conn)  # a lost slot of a demo older than the table
        conn.execute(f"DELETE FROM {slot_guard.STATE_TABLE} WHERE slot_name = %s",
                     (settings.slot_name,))
        # an initial snapshot the old slot never finished: the new slot requests its own
        conn.execute(f"UPDATE {OWN_SCHEMA}.snapshots SET state = 'done', finished_at = now() "
                     "WHERE state = 'pending' AND reason = 'initial'")
    return found


def print_sync_state(conn: pg.PgConn, *, earlier_runs: bool = False) -> None:
    """Open dead letters grouped by stage, class and reason, then held events by reason (the
    sync-state tables, whichever ERP target applied the events). ``earlier_runs``: the
    header says earlier demo runs' letters are counted too (they stay open)."""
    print("\ndead letters (open" + ("; earlier demo runs' included" if earlier_runs else "")
          + "), and why:")
    # an order line's letter names its line (`lines.quantity: line ["9001","2"]: ...`):
    # grouped without it, the same reason on many lines is one entry
    rows = conn.execute(
        "SELECT stage, error_class, regexp_replace(error_message, ': line \\[[^]]*\\]', ''), "
        "count(*) FROM sync.dead_letters WHERE state = 'open' GROUP BY 1, 2, 3 "
        "ORDER BY 4 DESC, 3").fetchall()
    for stage, cls, message, count in rows:
        print(f"  {count:>4} x {stage}/{cls}: {message}")
    if not rows:
        print("  none")
    for reason, count in conn.execute(
            "SELECT reason, count(*) FROM sync.held_events GROUP BY 1").fetchall():
        print(f"  held: {count} event(s) {reason}")


def print_erp_summary(settings: Settings, *, earlier_runs: bool = False) -> None:
    with pg.connect(settings.erp_dsn, "ERP") as conn:
        print("ERP tables (rows live / deleted" +
              ("; earlier demo runs' rows included):" if earlier_runs else "):"))
        for table in ("business_partners", "sales_orders", "sales_order_items",
                      "demand_signals"):
            row = conn.execute(f"SELECT count(*) FILTER (WHERE NOT deleted), "
                               f"count(*) FILTER (WHERE deleted) FROM erp.{table}").fetchone()
            assert row is not None
            print(f"  erp.{table:<20} {row[0]:>7} / {row[1]}")
        # The generator is seeded: each demo run writes the same people again under new CRM
        # keys (distinct CRM rows). A sample showing one person five times reads as a
        # duplication bug, so it shows each person once, under the lowest key.
        print("\nmapped partners (personal data masked; each person once, under the lowest "
              "CRM key" + (", as earlier demo runs wrote the same generated people" if
                           earlier_runs else "") + "; one with an extension first):")
        shown = ("full_name, gender_code, phone_e164, phone_extension, province, district, "
                 "division_code, purchase_amount, amount_currency")
        for (key, name, gender, phone, extension, province, district, division, amount,
             ccy) in conn.execute(
                f"SELECT crm_customer_id, {shown} FROM (SELECT DISTINCT ON ({shown}) "
                f"crm_customer_id, {shown} FROM erp.business_partners WHERE NOT deleted "
                f"ORDER BY {shown}, length(crm_customer_id), crm_customer_id) AS person "
                "ORDER BY phone_extension IS NULL, length(crm_customer_id), crm_customer_id "
                "LIMIT 5"):
            # An extension alone identifies no one (the number is masked); the division code
            # is the district's, already shown by name.
            print(f"  CRM key {key}: {_mask(name)}  gender={gender}  phone={_mask(phone, 4)}"
                  f"{' ext ' + extension if extension else ''}  {province or '-'} "
                  f"{district or '-'} ({division or '-'})"
                  f"{f'  {amount} {ccy}' if amount is not None else ''}")
        print("\norders -> ERP status and items:")
        for order_no, status, items in conn.execute(
                "SELECT o.order_no, o.status_code, string_agg(i.quantity::text || ' ' || "
                "i.unit_code || ' ' || i.sku || ' @ ' || i.unit_price || ' ' || o.currency, "
                "'; ' ORDER BY length(i.crm_line_id), i.crm_line_id) "
                "FROM erp.sales_orders o JOIN erp.sales_order_items i USING (crm_order_id)"
                " WHERE NOT o.deleted AND NOT i.deleted GROUP BY 1, 2 ORDER BY 1 LIMIT 5"):
            print(f"  {order_no}  {status:<16} {items}")
        print("\nstock in each SKU's base unit (top reserved):")
        for sku, unit, on_hand, reserved in conn.execute(
                "SELECT sku, base_unit, on_hand, reserved FROM erp.stock "
                "ORDER BY reserved DESC LIMIT 5"):
            print(f"  {sku:<12} on hand {on_hand:>12} {unit:<4} reserved {reserved:>8} {unit}")
        print_sync_state(conn, earlier_runs=earlier_runs)


# ---- the same pipeline on a real CRM: BottleCRM ------------------------------------------------
BOTTLECRM_DB = "bottlecrm_demo"
BOTTLECRM_TABLES = ("accounts", "orders", "order_line_item", "product")


def _environment(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    return {Settings.env_var(f.name): str(getattr(settings, f.name))
            for f in dataclasses.fields(settings)}


def _bottlecrm_data(writer: bottlecrm.Writer) -> tuple[str, dict[str, str]]:
    """The brief's data, written through BottleCRM's own models: one tenant's accounts,
    products and orders, and a second tenant whose rows must never reach the ERP."""
    org = writer.create_org("演示贸易有限公司")
    other = writer.create_org("另一家公司")
    ids = {"org": org}
    ids["zhang"] = writer.create_account(
        org, "张三五金店", phone="138 1234 5678", email="Zhang.San@Example.cn ",
        address_line="建国路88号", city="北京市", state="北京市", country="CN", currency="CNY")
    ids["li"] = writer.create_account(org, "李四电器", phone="010-65521234",
                                      city="上海市", state="上海市", country="CN")
    phone = writer.create_product(org, "P-PHONE-5G", "5G手机", "5000")
    laptop = writer.create_product(org, "P-LAPTOP", "笔记本电脑", "8000")
    ids["order"], lines = writer.create_order(
        org, ids["zhang"], [{"product": phone, "quantity": 10},
                            {"product": laptop, "quantity": 2}],
        status="ACTIVATED", order_number="SO-0001", currency="CNY", order_date="2023-01-01")
    ids["line"] = lines[1]
    writer.create_order(org, ids["li"], [{"product": phone, "quantity": 3}], status="DRAFT",
                        order_number="SO-0002", currency="CNY", order_date="2023-01-02")
    stranger = writer.create_account(other, "别家客户", phone="139 0000 0000")
    tablet = writer.create_product(other, "P-TABLET", "平板电脑", "3000")
    writer.create_order(other, stranger, [{"product": tablet, "quantity": 1}],
                        status="ACTIVATED", order_number="X-1", currency="CNY",
                        order_date="2023-01-01")
    return org, ids


def run_bottlecrm_demo(settings: Settings) -> int:
    """`make demo-bottlecrm`: install BottleCRM (its own venv, a migrated template), write
    data through its models, capture it with the shipped ``bottlecrm`` profile (one tenant),
    apply it to the ERP with one producer and two consumers, then change things while it
    runs, and print what the ERP holds."""
    logs = REPO_ROOT / ".stack" / "demo-bottlecrm"
    print("installing BottleCRM (django-crm 1.35.0; minutes the first time) ...")
    bottlecrm.ensure_installed(settings.crm_dsn)
    with pg.connect(settings.crm_dsn, "CRM") as admin:
        for db in (BOTTLECRM_DB, f"erp_{BOTTLECRM_DB}"):
            admin.execute(f"SELECT pg_drop_replication_slot(slot_name) FROM "
                          f"pg_replication_slots WHERE database = '{db}' AND NOT active")
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{BOTTLECRM_DB}" TEMPLATE "{bottlecrm.TEMPLATE}"')
        admin.execute(f'CREATE DATABASE "erp_{BOTTLECRM_DB}"')
    crm_dsn = _with_database(settings.crm_dsn, BOTTLECRM_DB)
    writer = bottlecrm.Writer(crm_dsn)
    try:
        org, ids = _bottlecrm_data(writer)
        logs.mkdir(parents=True, exist_ok=True)
        profile = logs / "bottlecrm.toml"
        shipped = (REPO_ROOT / "service" / "profiles" / "bottlecrm.toml").read_text("utf-8")
        profile.write_text(shipped.replace("00000000-0000-0000-0000-000000000000", org),
                           "utf-8")
        with pg.connect(crm_dsn, "CRM") as conn:  # what `setup --check` asks the DBA for
            for table in BOTTLECRM_TABLES:
                conn.execute(f"ALTER TABLE public.{table} REPLICA IDENTITY FULL")
        demo = dataclasses.replace(
            settings, crm_dsn=crm_dsn, erp_dsn=_with_database(settings.erp_dsn,
                                                              f"erp_{BOTTLECRM_DB}"),
            source_profile=str(profile), sales_topic="bottlecrm.crm.sales",
            market_topic="bottlecrm.crm.market-demand", dlq_topic="bottlecrm.dlq",
            consumer_group="bottlecrm-demo-erp", slot_name="bottlecrm_demo",
            publication_name="bottlecrm_demo")
        print(f"BottleCRM database {BOTTLECRM_DB}: tenant {org} captured, another tenant not")
        run_setup(demo)
        with running_pipeline(logs, _environment(demo)) as procs:
            if not wait_caught_up(demo, procs, logs, "the initial snapshot"):
                return 1
            print("initial snapshot applied; now changing BottleCRM while the sync runs:")
            print("  SO-0001 completed, one of its lines deleted; 李四电器 deactivated")
            writer.delete_line(org, ids["line"])
            writer.set_order_status(org, ids["order"], "COMPLETED")
            writer.deactivate_account(org, ids["li"])
            if not wait_caught_up(demo, procs, logs, "the changes"):
                return 1
            print_erp_summary(demo)
            return 0
    finally:
        writer.close()


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def wait_for_slot(settings: Settings, procs: list[subprocess.Popen[bytes]], logs: Path, *,
                  snapshots_done: bool = False, timeout_s: float = 120) -> bool:
    """Wait until the producer (``procs[0]``) holds a usable slot and, with
    ``snapshots_done``, has finished every pending snapshot. False (reason printed to stderr)
    when the producer exits or ``timeout_s`` seconds pass."""
    deadline = time.monotonic() + timeout_s
    while (ops.slot_state(settings) or {}).get("wal_status") in (None, "lost") \
            or (snapshots_done and ops.pending_snapshots(settings)):
        stopped = _capture_problem(settings)
        if stopped is not None:  # the producer waits for a person: say what to run now
            print(f"demo: the producer stopped capture: {stopped}", file=sys.stderr)
            return False
        if time.monotonic() > deadline or procs[0].poll() is not None:
            print(f"demo: the producer did not create its slot"
                  f"{' or finish its initial snapshot' if snapshots_done else ''}; see {logs}",
                  file=sys.stderr)
            return False
        time.sleep(0.2)
    return True


def _capture_problem(settings: Settings) -> str | None:
    """What the producer recorded as stopping capture (and its recovery), or None."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        state = slot_guard.load(conn, settings.slot_name)
    if state is None or state.problem is None:
        return None
    return (f"{state.problem_detail or state.problem}; recover with "
            f"`{slot_guard.RESYNC_COMMAND}`")


def wait_caught_up(settings: Settings, procs: list[subprocess.Popen[bytes]], logs: Path,
                   what: str, *, started: float | None = None, timeout_s: float = 300) -> bool:
    """Wait until everything the CRM committed so far is in the ERP (the producer confirmed the
    current WAL position, the consumers' lag is zero, no snapshot pending). Prints how long
    ``what`` took since ``started`` (a ``time.monotonic()``; default now); False (reason on
    stderr) when a process exits or ``timeout_s`` seconds pass."""
    began = time.monotonic() if started is None else started
    if not wait_for_slot(settings, procs, logs, timeout_s=timeout_s):
        return False
    target = ops.current_lsn(settings)
    deadline = time.monotonic() + timeout_s
    while not (ops.caught_up(settings, target) and not ops.pending_snapshots(settings)):
        if time.monotonic() > deadline:
            print(f"demo: {what} did not come through within {timeout_s:.0f} s; see {logs}",
                  file=sys.stderr)
            return False
        if any(p.poll() is not None for p in procs):
            print(f"demo: a pipeline process exited early; see {logs}", file=sys.stderr)
            return False
        time.sleep(0.5)
    print(f"  {what}: through in {time.monotonic() - began:.1f} s")
    return True
