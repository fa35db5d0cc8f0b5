"""Apply throughput into Tryton beside the sql target (make bench-tryton; or
python -m bench.apply_tryton [--sales N] [--batch B] from the repo root).

The same canonical rows (N customers, N paid orders of two lines each) are applied:
1. to the `sql` target (service/erp/apply.py ``apply_changes``, one transaction per batch)
   on a fresh ERP database;
2. to the `tryton` target (TrytonTarget over JSON-RPC, one call per step per batch) on a
   Tryton database cloned from the template, served by deploy/tryton/server.sh; a paid
   order becomes a confirmed sale that Tryton processes into a shipment with its moves;
3. to the `tryton` target again (every event stale: the positional no-op path).

Needs `make up` and `make tryton`. Prints one line per run: sales/s, ms per sale, RPC calls.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib import resources

import psycopg

from service.demo.tryton import template_name
from service.erp.apply import apply_changes, load_status_effects
from service.erp.changes import ErpChange, OrderHeaderRow, OrderItemRow, PartnerRow, Position
from service.erp.mappings import Mappings
from service.erp.tryton import PositionStore, Status, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.settings import REPO_ROOT, Settings

SKUS = [f"SKU-1000{n:02d}" for n in range(1, 13)]


def rows(n: int) -> tuple[list[PartnerRow], list[OrderHeaderRow], list[OrderItemRow]]:
    now = datetime.now(UTC)
    customers, headers, items = [], [], []
    for i in range(1, n + 1):
        customers.append(PartnerRow(
            900_000 + i, False, f"客户{i}", "U", None, None, f"+86138{i:08d}",
            f"c{i}@example.cn", "北京市", "北京市", "朝阳区", f"建国路{i}号", None, None, None,
            None, None, Position(1000 + i, 0, f"c{i}", now)))
        pos = Position(100_000 + i, 0, f"o{i}", now)
        headers.append(OrderHeaderRow(800_000 + i, f"SO-{i}", 900_000 + i, date.today(), "PAID",
                                      "CNY", False, pos))
        for line in (1, 2):
            items.append(OrderItemRow(800_000 + i, line, SKUS[(i + line) % len(SKUS)], "商品",
                                      Decimal(line * 2), "UNIT", Decimal("999.00"), False, pos))
    return customers, headers, items


def chunks(seq: list[int], size: int) -> list[list[int]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def bench_sql(admin: str, customers: list[PartnerRow], headers: list[OrderHeaderRow],
              items: list[OrderItemRow], batch: int) -> float:
    db = f"bench_erp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        dsn = admin.rsplit("/", 1)[0] + f"/{db}"
        with psycopg.connect(dsn) as conn:
            for name in ("schema.sql", "sync_schema.sql"):  # the sql ERP, the sync state
                conn.execute(resources.files("service.erp").joinpath(name).read_text("utf-8"))
            load_status_effects(conn, Mappings.load())
            conn.commit()
            with conn.transaction():
                apply_changes(conn, [ErpChange("customer", c.crm_customer_id, partner=c)
                                     for c in customers])
            by_order: dict[int, list[OrderItemRow]] = {}
            for it in items:
                by_order.setdefault(it.crm_order_id, []).append(it)
            started = time.perf_counter()
            for part in chunks(list(range(len(headers))), batch):
                with conn.transaction():
                    apply_changes(conn, [ErpChange("order", headers[i].crm_customer_id,
                                                   header=headers[i],
                                                   items=by_order[headers[i].crm_order_id])
                                         for i in part])
            return time.perf_counter() - started
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sales", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    admin = Settings.from_env().crm_dsn
    customers, headers, items = rows(args.sales)
    n = args.sales

    sql_s = bench_sql(admin, customers, headers, items, args.batch)

    tag = uuid.uuid4().hex[:8]
    tryton_db, state_db = f"bench_tryton_{tag}", f"bench_state_{tag}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{tryton_db}" TEMPLATE "{template_name()}"')
        conn.execute(f'CREATE DATABASE "{state_db}"')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = str(REPO_ROOT / "deploy" / "tryton" / "server.sh")
    try:
        subprocess.run(["bash", server, "start", tryton_db, str(port)], check=True,
                       capture_output=True, timeout=300)
        password = (REPO_ROOT / ".stack" / "tryton" / "sync.pass").read_text().strip()
        rpc = TrytonRPC(f"http://127.0.0.1:{port}", tryton_db, "crm_sync", password)
        target = TrytonTarget(rpc, PositionStore(admin.rsplit("/", 1)[0] + f"/{state_db}"))
        started = time.perf_counter()
        for part in chunks(list(range(n)), args.batch):
            outcomes = target.apply_customers([customers[i] for i in part])
            assert {o.status for o in outcomes} == {Status.APPLIED}, outcomes
        customers_s = time.perf_counter() - started

        def apply_all() -> tuple[float, int, set[Status]]:
            calls, seen = rpc.calls, set()
            started = time.perf_counter()
            for part in chunks(list(range(n)), args.batch):
                wanted = {headers[i].crm_order_id for i in part}
                outcomes = target.apply_orders([headers[i] for i in part],
                                               [it for it in items
                                                if it.crm_order_id in wanted])
                seen |= {o.status for o in outcomes}
            return time.perf_counter() - started, rpc.calls - calls, seen

        rpc.seconds.clear()
        tryton_s, tryton_calls, first = apply_all()
        per_call = sorted(rpc.seconds.items(), key=lambda kv: -kv[1])
        stale_s, stale_calls, second = apply_all()
        states = {s.state for s in target.read_sales([str(h.crm_order_id) for h in headers])
                  .values()}
        target.close()
    finally:
        subprocess.run(["bash", server, "stop", tryton_db], capture_output=True, timeout=60)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{tryton_db}" WITH (FORCE)')
            conn.execute(f'DROP DATABASE IF EXISTS "{state_db}" WITH (FORCE)')

    print(f"{n} paid orders x 2 lines, batches of {args.batch}")
    print(f"  sql target            {n / sql_s:9.1f} sales/s  {1000 * sql_s / n:8.1f} ms/sale")
    print(f"  tryton target         {n / tryton_s:9.1f} sales/s  {1000 * tryton_s / n:8.1f} "
          f"ms/sale  {tryton_calls} RPC calls  outcomes {sorted(s.value for s in first)}  "
          f"states {sorted(states)}")
    print(f"  tryton, all stale     {n / stale_s:9.1f} sales/s  {1000 * stale_s / n:8.1f} "
          f"ms/sale  {stale_calls} RPC calls  outcomes {sorted(s.value for s in second)}")
    print(f"  (tryton customers: {n / customers_s:.1f} parties/s)")
    print("  tryton wall time per call: " + ", ".join(
        f"{method.removeprefix('model.')} {seconds:.1f} s" for method, seconds in per_call))


if __name__ == "__main__":
    main()
