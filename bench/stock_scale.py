"""Does applying cost more in a big ERP? (make bench-stock; or python -m bench.stock_scale)

The same events (demo CRM through the real producer, already in Kafka) are applied by the real
consumer into four ERPs, in one run:

- an empty ERP, and one already holding ``--orders`` orders (1,000,000 by default, two lines
  each, on the demo's SKUs, built with SQL ``generate_series`` in about a minute, not through
  the pipeline), each
- with the incremental stock update (each order's stored effect -> new effect, the difference
  added to the SKU totals), and with the old full recount of every touched SKU
  (``apply_changes(..., full_recount=True)``), for the before/after.

Printed per ERP: events/s (wall, from the consumer's first batch to its last), the time spent
inside ERP transactions, and ratios big/empty. Finally the full operator recount
(``crm-erp-sync stock recount --check``) on the big ERP.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench.apply import fill_topic
from bench.common import bench_settings
from service.consumer.pipeline import ErpConsumer
from service.erp import sql_target
from service.erp.apply import ORDER_EFFECTS, apply_changes, load_status_effects
from service.erp.mappings import Mappings
from service.operator.stock import recount
from service.settings import Settings
from tests.helpers import wait_until

# Far above the demo's ids, so the prebuilt orders and the applied ones never meet (written as
# text, the ERP's key type; a line's key is the JSON array of its order's and its number).
BASE_ID = 100_000_000


def build_big_erp(dsn: str, mappings: Mappings, orders: int) -> float:
    """``orders`` orders (2 lines each) with their effects and totals, straight in SQL."""
    skus = sorted(s for s in mappings.sku_units if s <= "SKU-100010")  # the demo's SKUs
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            load_status_effects(conn, mappings)
        conn.execute("SET synchronous_commit = off")
        customers = max(1, orders // 3)
        conn.execute(
            "INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, "
            "source_lsn, source_seq, event_id, crm_commit_time) "
            "SELECT %s + g, '客户' || g, 'U', 1, 0, 'bench/' || g, now() "
            "FROM generate_series(1, %s) g", (BASE_ID, customers))
        conn.execute(
            "INSERT INTO erp.sales_orders (crm_order_id, order_no, crm_customer_id, order_date, "
            "status_code, currency, source_lsn, source_seq, event_id, crm_commit_time) "
            "SELECT %s + g, 'BENCH' || g, %s + 1 + g %% %s, date '2023-01-01' + g %% 365, "
            "(ARRAY['PENDING_PAYMENT', 'PAID', 'SHIPPED', 'COMPLETED', 'CANCELLED'])"
            "[1 + g %% 5], 'CNY', 1, 0, 'bench/' || g, now() FROM generate_series(1, %s) g",
            (BASE_ID, BASE_ID, customers, orders))
        conn.execute(
            "INSERT INTO erp.sales_order_items (crm_order_id, crm_line_id, sku, product_name, "
            "quantity, unit_code, unit_price, source_lsn, source_seq, base_quantity, base_unit) "
            "SELECT %s + g, format('[\"%%s\",\"%%s\"]', %s + g, l), s.sku, '商品', 1 + g %% 5, "
            "s.base, 100, 1, 0, 1 + g %% 5, s.base "
            "FROM generate_series(1, %s) g CROSS JOIN generate_series(1, 2) l "
            "JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS s(sku, base, n) "
            "ON s.n = 1 + (g + l) %% %s",
            (BASE_ID, BASE_ID, orders, skus, [mappings.sku_units[s].base for s in skus],
             len(skus)))
        effects = ORDER_EFFECTS.format(scope="")
        conn.execute("INSERT INTO erp.order_stock_effects (crm_order_id, sku, effect, quantity) "
                     f"SELECT crm_order_id, sku, effect, quantity FROM ({effects}) e")
        conn.execute(
            "INSERT INTO erp.stock (sku, reserved, issued, base_unit) "
            "SELECT sku, coalesce(sum(quantity) FILTER (WHERE effect = 'reserve'), 0), "
            "coalesce(sum(quantity) FILTER (WHERE effect = 'issue'), 0), "
            "(SELECT base FROM unnest(%s::text[], %s::text[]) AS b(sku, base) "
            " WHERE b.sku = e.sku) FROM erp.order_stock_effects e GROUP BY sku",
            (skus, [mappings.sku_units[s].base for s in skus]))
        conn.execute("ANALYZE")
    return time.perf_counter() - started


@contextmanager
def databases(settings: Settings, names: list[str], template: str) -> Iterator[None]:
    admin = settings.crm_dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names:
            # FILE_COPY: a copy of the files after a checkpoint, not all of it through the WAL.
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclasses.dataclass
class Run:
    label: str
    events: int
    wall_s: float
    in_erp_s: float
    batches: int

    @property
    def rate(self) -> float:
        return self.events / self.wall_s


def apply_all(settings: Settings, label: str, erp_db: str, *, full_recount: bool,
              total: int) -> Run:
    prefix = settings.erp_dsn.rsplit("/", 1)[0]
    run_settings = dataclasses.replace(settings, erp_dsn=f"{prefix}/{erp_db}",
                                       consumer_group=f"{settings.consumer_group}.{erp_db}")
    consumer = ErpConsumer(run_settings)
    first_batch: list[float] = []
    last_batch = [0.0]
    applier_batch = consumer.applier.apply_batch

    def timed(batch: Any) -> None:
        if not first_batch:  # from here: the group join before it is not the ERP's cost
            first_batch.append(time.perf_counter())
        applier_batch(batch)
        last_batch[0] = time.perf_counter()

    consumer.applier.apply_batch = timed  # type: ignore[method-assign]
    original = sql_target.apply_changes
    if full_recount:
        sql_target.apply_changes = functools.partial(apply_changes, full_recount=True)  # type: ignore[assignment]
    thread = threading.Thread(target=consumer.run)
    try:
        thread.start()
        wait_until(lambda: consumer.stats.messages >= total or not thread.is_alive(),
                   timeout=900, message=f"{label}: all events applied")
    finally:
        consumer.stop()
        thread.join()
        sql_target.apply_changes = original  # type: ignore[assignment]
    stats = consumer.stats
    assert stats.messages == total, (label, stats.messages, total)
    assert consumer.applier.dead_lettered == 0, label
    in_erp = consumer.metrics.batch_duration._sum.get()
    return Run(label, total, last_batch[0] - first_batch[0], in_erp, stats.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--orders", type=int, default=1_000_000,
                        help="orders already in the big ERP")
    parser.add_argument("--no-old-path", action="store_true",
                        help="skip the before/after runs with the old full recount")
    args = parser.parse_args()
    with bench_settings() as settings:
        mappings = Mappings.load(settings.mappings_file)
        template = settings.erp_dsn.rsplit("/", 1)[1]  # set up, still empty
        big = f"{template}_big"
        t0 = time.perf_counter()
        total = fill_topic(settings, args.events)
        print(f"{total:,} events in Kafka ({time.perf_counter() - t0:.0f}s to prepare)")
        modes = [False] if args.no_old_path else [False, True]
        empties = [f"{template}_empty_{i}" for i in range(len(modes))]
        with databases(settings, [big, *empties], template):
            built = build_big_erp(f"{settings.erp_dsn.rsplit('/', 1)[0]}/{big}", mappings,
                                  args.orders)
            print(f"big ERP: {args.orders:,} orders built with generate_series in {built:.0f}s")
            copies = [f"{big}_{i}" for i in range(1, len(modes))]
            with databases(settings, copies, big):
                # Warm-up (not reported): the first run pays for cold caches.
                apply_all(settings, "warm-up", template, full_recount=False, total=total)
                runs: list[tuple[Run, Run]] = []
                for mode, empty, full in zip(modes, empties, [big, *copies], strict=True):
                    name = "old: full recount of touched SKUs" if mode else \
                        "new: incremental (stored effect -> new)"
                    e = apply_all(settings, "empty", empty, full_recount=mode, total=total)
                    b = apply_all(settings, "1M", full, full_recount=mode, total=total)
                    runs.append((e, b))
                    print(f"\n{name}")
                    for r in (e, b):
                        erp = "empty ERP" if r is e else f"ERP with {args.orders:,} orders"
                        print(f"  into {erp:<28} {r.rate:>8,.0f} events/s  ({r.wall_s:.1f}s; "
                              f"{r.in_erp_s:.1f}s in {r.batches} ERP transactions, "
                              f"{1000 * r.in_erp_s / r.batches:.1f} ms each)")
                    print(f"  big / empty: throughput {b.rate / e.rate:.2f}, time in ERP "
                          f"transactions {b.in_erp_s / e.in_erp_s:.2f}")
                if len(runs) == 2:
                    (_, new_big), (_, old_big) = runs
                    print(f"\nnew vs old into the big ERP: {new_big.rate / old_big.rate:.1f}x "
                          "the events/s")
            with psycopg.connect(f"{settings.erp_dsn.rsplit('/', 1)[0]}/{big}",
                                 autocommit=True) as conn:
                rc = recount(conn, mappings, repair=False)
            print(f"\nfull recount (stock recount --check) of the big ERP: {rc.seconds:.1f}s, "
                  f"{rc.lines:,} lines, {len(rc.drift)} SKU(s) drifting")


if __name__ == "__main__":
    main()
