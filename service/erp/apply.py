"""Apply ERP changes in bulk, idempotently, inside the caller's transaction.

Idempotency is positional: every row keeps the (commit LSN, seq) of the change it reflects and
an upsert only wins when it is newer. Within a batch only the newest change per key is written
(equivalent to applying them one by one under that rule). Stock is kept in each SKU's base
unit: each touched order's effect is recomputed from its status and its lines' base
quantities, compared with the effect stored for it, and only the difference is added to the
SKU totals - so duplicates and replays (which change no stored effect) cannot count twice, and
the cost does not grow with the number of orders in the ERP. ``service.operator.stock``
recounts everything from scratch (an operator command, and part of ``reconcile``).

Bulk writes: small batches (real-time) use ``executemany``, pipelined by psycopg 3; from
``COPY_THRESHOLD`` rows on, rows are COPYed into a per-session staging table and upserted with
one ``INSERT ... SELECT ... ON CONFLICT``. bench/apply.py measured 35k rows/s against 62k rows/s
for 48k partner upserts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeVar

import psycopg

from service.erp.changes import (
    DemandRow,
    ErpChange,
    OrderCurrency,
    OrderHeaderRow,
    OrderItemRow,
    PartnerRow,
    Position,
    TruncateRow,
)
from service.erp.mappings import Mappings
from service.errors import ConfigError, ErpNotSetUp
from service.pg import PgConn

T = TypeVar("T", PartnerRow, OrderHeaderRow, OrderItemRow, DemandRow)

_GUARD = "({t}.source_lsn, {t}.source_seq) < (EXCLUDED.source_lsn, EXCLUDED.source_seq)"

PARTNER_UPSERT = f"""
INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, birth_date, age,
    phone_e164, email, province, city, district, street, purchase_frequency, purchase_amount,
    amount_currency, product_preference, notes, deleted, source_lsn, source_seq, event_id,
    crm_commit_time, phone_extension, phone_others, division_code)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
        %s, %s, %s)
ON CONFLICT (crm_customer_id) DO UPDATE SET
    full_name = CASE WHEN EXCLUDED.deleted THEN erp.business_partners.full_name
                     ELSE EXCLUDED.full_name END,
    gender_code = CASE WHEN EXCLUDED.deleted THEN erp.business_partners.gender_code
                       ELSE EXCLUDED.gender_code END,
    birth_date = EXCLUDED.birth_date, age = EXCLUDED.age, phone_e164 = EXCLUDED.phone_e164,
    email = EXCLUDED.email, province = EXCLUDED.province, city = EXCLUDED.city,
    district = EXCLUDED.district, street = EXCLUDED.street,
    purchase_frequency = EXCLUDED.purchase_frequency,
    purchase_amount = EXCLUDED.purchase_amount, amount_currency = EXCLUDED.amount_currency,
    product_preference = EXCLUDED.product_preference, notes = EXCLUDED.notes,
    deleted = EXCLUDED.deleted, source_lsn = EXCLUDED.source_lsn,
    source_seq = EXCLUDED.source_seq, event_id = EXCLUDED.event_id,
    crm_commit_time = EXCLUDED.crm_commit_time, applied_at = clock_timestamp(),
    phone_extension = EXCLUDED.phone_extension, phone_others = EXCLUDED.phone_others,
    division_code = EXCLUDED.division_code
WHERE {_GUARD.format(t="erp.business_partners")}
"""

HEADER_UPSERT = f"""
INSERT INTO erp.sales_orders (crm_order_id, order_no, crm_customer_id, order_date, status_code,
    currency, deleted, source_lsn, source_seq, event_id, crm_commit_time, total_amount)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (crm_order_id) DO UPDATE SET
    order_no = CASE WHEN EXCLUDED.deleted THEN erp.sales_orders.order_no
                    ELSE EXCLUDED.order_no END,
    order_date = CASE WHEN EXCLUDED.deleted THEN erp.sales_orders.order_date
                      ELSE EXCLUDED.order_date END,
    status_code = CASE WHEN EXCLUDED.deleted THEN erp.sales_orders.status_code
                       ELSE EXCLUDED.status_code END,
    currency = CASE WHEN EXCLUDED.deleted THEN erp.sales_orders.currency
                    ELSE EXCLUDED.currency END,
    total_amount = CASE WHEN EXCLUDED.deleted THEN erp.sales_orders.total_amount
                        ELSE EXCLUDED.total_amount END,
    crm_customer_id = EXCLUDED.crm_customer_id, deleted = EXCLUDED.deleted,
    source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq,
    event_id = EXCLUDED.event_id, crm_commit_time = EXCLUDED.crm_commit_time,
    applied_at = clock_timestamp()
WHERE {_GUARD.format(t="erp.sales_orders")}
"""

ITEM_UPSERT = f"""
INSERT INTO erp.sales_order_items (crm_order_id, crm_line_id, sku, product_name, quantity,
    unit_code, unit_price, deleted, source_lsn, source_seq, base_quantity, base_unit)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (crm_order_id, crm_line_id) DO UPDATE SET
    sku = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.sku ELSE EXCLUDED.sku END,
    product_name = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.product_name
                        ELSE EXCLUDED.product_name END,
    quantity = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.quantity
                    ELSE EXCLUDED.quantity END,
    unit_code = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.unit_code
                     ELSE EXCLUDED.unit_code END,
    unit_price = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.unit_price
                      ELSE EXCLUDED.unit_price END,
    base_quantity = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.base_quantity
                         ELSE EXCLUDED.base_quantity END,
    base_unit = CASE WHEN EXCLUDED.deleted THEN erp.sales_order_items.base_unit
                     ELSE EXCLUDED.base_unit END,
    deleted = EXCLUDED.deleted, source_lsn = EXCLUDED.source_lsn,
    source_seq = EXCLUDED.source_seq
WHERE {_GUARD.format(t="erp.sales_order_items")}
"""

DEMAND_UPSERT = f"""
INSERT INTO erp.demand_signals (crm_demand_id, signal_type, product_category, content,
    observed_at, deleted, source_lsn, source_seq, event_id, crm_commit_time)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (crm_demand_id) DO UPDATE SET
    signal_type = CASE WHEN EXCLUDED.deleted THEN erp.demand_signals.signal_type
                       ELSE EXCLUDED.signal_type END,
    product_category = CASE WHEN EXCLUDED.deleted THEN erp.demand_signals.product_category
                            ELSE EXCLUDED.product_category END,
    content = CASE WHEN EXCLUDED.deleted THEN erp.demand_signals.content
                   ELSE EXCLUDED.content END,
    observed_at = EXCLUDED.observed_at, deleted = EXCLUDED.deleted,
    source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq,
    event_id = EXCLUDED.event_id, crm_commit_time = EXCLUDED.crm_commit_time,
    applied_at = clock_timestamp()
WHERE {_GUARD.format(t="erp.demand_signals")}
"""

# An order's effect on stock: its live lines' base quantities per SKU, under the effect of its
# status; an order whose status does nothing to stock, or a deleted one, has no effect rows.
ORDER_EFFECTS = """
    SELECT o.crm_order_id, i.sku, e.effect, sum(i.base_quantity) AS quantity,
           min(i.base_unit) AS base_unit
    FROM erp.sales_orders o
    JOIN erp.sales_order_items i ON i.crm_order_id = o.crm_order_id AND NOT i.deleted
         AND i.base_quantity IS NOT NULL
    JOIN erp.status_effects e ON e.status_code = o.status_code
         AND e.effect IN ('reserve', 'issue')
    WHERE NOT o.deleted {scope}
    GROUP BY 1, 2, 3
"""


def effect_diff(orders: str | None) -> str:
    """``WITH ...`` that rewrites the stored effect of ``orders`` (an SQL array of order ids;
    None: every order) where it differs from the order as it now is; its ``diff`` holds the
    differences per (order, SKU, effect): ``new_q``/``old_q`` (NULL = no such row)."""
    scope = "TRUE" if orders is None else f"crm_order_id = ANY({orders})"
    return f"""
WITH new AS ({ORDER_EFFECTS.format(scope="" if orders is None else "AND o." + scope)}
), old AS (
    SELECT crm_order_id, sku, effect, quantity FROM erp.order_stock_effects
    WHERE {scope}
), diff AS (
    SELECT crm_order_id, sku, effect, n.quantity AS new_q, o.quantity AS old_q, n.base_unit
    FROM new n FULL JOIN old o USING (crm_order_id, sku, effect)
    WHERE n.quantity IS DISTINCT FROM o.quantity
), gone AS (
    DELETE FROM erp.order_stock_effects x USING diff d
    WHERE d.new_q IS NULL AND x.crm_order_id = d.crm_order_id AND x.sku = d.sku
      AND x.effect = d.effect
), kept AS (
    INSERT INTO erp.order_stock_effects (crm_order_id, sku, effect, quantity)
    SELECT crm_order_id, sku, effect, new_q FROM diff WHERE new_q IS NOT NULL
    ON CONFLICT (crm_order_id, sku, effect) DO UPDATE SET quantity = EXCLUDED.quantity
)"""


_EFFECT_DIFF = effect_diff("%(orders)s")

# One statement, one round trip: rewrite the touched orders' effects where they changed and
# add the difference to the SKU totals. The difference is taken from the stored effect, so an
# event applied twice (or a stale one the position guard refused) finds nothing changed and
# adds nothing. SKU rows are written in SKU order: two consumers cannot deadlock on them. A
# difference in another unit than the total's violates stock_delta_in_base_unit (the event
# is isolated and dead-lettered as an ApplyError) instead of being added.
STOCK_DELTA = _EFFECT_DIFF + """
INSERT INTO erp.stock AS s (sku, reserved, issued, base_unit, delta_unit)
SELECT sku,
       coalesce(sum(coalesce(new_q, 0) - coalesce(old_q, 0)) FILTER (WHERE effect = 'reserve'), 0),
       coalesce(sum(coalesce(new_q, 0) - coalesce(old_q, 0)) FILTER (WHERE effect = 'issue'), 0),
       min(base_unit), min(base_unit)
FROM diff GROUP BY sku ORDER BY sku
ON CONFLICT (sku) DO UPDATE SET reserved = s.reserved + EXCLUDED.reserved,
    issued = s.issued + EXCLUDED.issued, base_unit = coalesce(s.base_unit, EXCLUDED.base_unit),
    delta_unit = EXCLUDED.delta_unit
"""

# The old way, kept for the benchmark's before/after (apply_changes(..., full_recount=True)):
# the same effect rewrite, then each touched SKU's totals summed over every order's effect -
# a cost that grows with the ERP (10.8 ms per batch at 45k orders, 125 ms at 450k).
_TOUCHED_SKUS = _EFFECT_DIFF + "\nSELECT DISTINCT sku FROM diff ORDER BY sku"
RECOUNT_SKUS = """
UPDATE erp.stock s
SET reserved = coalesce(t.reserved, 0), issued = coalesce(t.issued, 0)
FROM (
    SELECT k.sku,
           sum(e.quantity) FILTER (WHERE e.effect = 'reserve') AS reserved,
           sum(e.quantity) FILTER (WHERE e.effect = 'issue') AS issued
    FROM unnest(%s::text[]) AS k(sku)
    LEFT JOIN erp.order_stock_effects e ON e.sku = k.sku
    GROUP BY k.sku
) t
WHERE s.sku = t.sku
"""


# From this many rows on, COPY + one INSERT ... SELECT costs less than executemany's one
# INSERT per row, on both sides. Measured on the local stack (partner upserts of random keys
# into 20,000 partners, a commit per batch, three rounds), ERP backend / consumer CPU us per
# row: 16 rows 43-50 / 27-31 executemany vs 47-60 / 30-36 COPY; 24 rows even; 32 rows 37-44 /
# 20-25 vs 30-37 / 16-18; 63 rows 34 / 16-19 vs 20-24 / 10-12. The consumer's batches at
# 1,000 changes/s put 24-63 rows in one table about one upsert in six (it was 64).
COPY_THRESHOLD = 32
_INSERT = re.compile(r"INSERT INTO (\S+) \((.*?)\)\s*VALUES \(.*?\)\s*(ON CONFLICT.*)", re.S)


def bulk_upsert(cur: psycopg.Cursor[Any], upsert: str, rows: list[tuple[Any, ...]]) -> None:
    """Run an ``INSERT ... VALUES ... ON CONFLICT`` statement for many rows, the fast way."""
    if len(rows) == 1:  # a low rate's usual batch: executemany's pipeline costs more
        cur.execute(upsert, rows[0])
        return
    if len(rows) < COPY_THRESHOLD:
        cur.executemany(upsert, rows)
        return
    match = _INSERT.match(upsert.strip())
    if match is None:
        raise ValueError("not an INSERT ... VALUES ... ON CONFLICT statement")
    table, columns, conflict = match.groups()
    staging = "stage_" + table.replace(".", "_")
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} "
                f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    # Rows of an earlier bulk upsert in this transaction (held events released after the
    # batch) are still there; a rolled-back savepoint's are invisible anyway. DELETE, not
    # TRUNCATE: a TRUNCATE of a table this transaction did not create gives it a new file
    # (catalog update, file create and unlink at commit), which cost the ERP's backend about
    # 1-2 ms of CPU per table per batch; the rows DELETE leaves dead go at commit (ON COMMIT
    # DELETE ROWS empties the file).
    cur.execute(f"DELETE FROM {staging}")
    with cur.copy(f"COPY {staging} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    # Rows arrive sorted by key: locks are taken in key order, so replicas cannot deadlock.
    cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} {conflict}")


def newest_per_key(rows: Iterable[T], key: Any) -> list[T]:
    """Keep, per key, the row with the highest position; later wins a tie (same event)."""
    best: dict[Any, T] = {}
    for row in rows:
        k = key(row)
        held = best.get(k)
        if held is None or (held.pos.lsn, held.pos.seq) <= (row.pos.lsn, row.pos.seq):
            best[k] = row
    return list(best.values())


def _pos(p: Any) -> tuple[Any, ...]:
    return (p.lsn, p.seq, p.event_id, p.commit_time)


def load_status_effects(conn: PgConn, mappings: Mappings) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO erp.status_effects (status_code, effect) VALUES (%s, %s) "
            "ON CONFLICT (status_code) DO UPDATE SET effect = EXCLUDED.effect",
            list(mappings.status_stock_effect.items()),
        )


def check_schema(conn: PgConn) -> None:
    """Refuse an ERP database without the ``erp.*`` tables (nobody ran ``setup`` on it) or
    whose tables predate a column this version writes (``setup`` adds it in place): raises
    ErpNotSetUp (a ConfigError) naming what is missing, where every batch would otherwise
    fail with UndefinedTable or UndefinedColumn."""
    columns = {r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'erp' "
        "AND table_name = 'sales_orders'").fetchall()}
    if not columns:
        raise ErpNotSetUp("erp.sales_orders table")
    if "total_amount" not in columns:
        raise ErpNotSetUp("erp.sales_orders.total_amount column")


def check_stock_units(conn: PgConn, mappings: Mappings) -> None:
    """Refuse to add to stock totals kept in another unit than the mappings' base unit.

    Deltas are only exact while every total is in its SKU's current base unit. A stock row
    without a unit was written before base units existed; one with another unit means a base
    unit was changed in the mappings. Both need ``crm-erp-sync stock recount`` first: raises
    ``ConfigError`` naming the SKUs and both units.
    """
    wrong = [(sku, unit, mappings.sku_units[sku].base) for sku, unit in conn.execute(
        "SELECT sku, base_unit FROM erp.stock ORDER BY sku").fetchall()
        if sku in mappings.sku_units and unit != mappings.sku_units[sku].base]
    if wrong:
        shown = ", ".join(f"{sku} {unit or 'no unit'} -> {base}" for sku, unit, base in wrong[:5])
        raise ConfigError(
            "erp.stock", f"{len(wrong)} SKU total(s) are not in the base unit of "
            f"{mappings.source} ({shown}{' ...' if len(wrong) > 5 else ''}): run "
            "`crm-erp-sync stock recount` before starting consumers")


def existing_customers(conn: PgConn, ids: Iterable[str]) -> set[str]:
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    rows = conn.execute(
        "SELECT crm_customer_id FROM erp.business_partners WHERE crm_customer_id = ANY(%b)",
        (wanted,),  # binary (%b): no quoting of each id into an array literal
    ).fetchall()
    return {r[0] for r in rows}


def stored_order_currencies(conn: PgConn, ids: Iterable[str]) -> dict[str, OrderCurrency]:
    """CRM order key -> ``erp.sales_orders.currency`` (an ISO code) with the header's
    position, for the orders the ERP holds with one (a delete that arrived before its
    order stores none): one query."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = conn.execute(
        "SELECT crm_order_id, currency, source_lsn, source_seq FROM erp.sales_orders "
        "WHERE crm_order_id = ANY(%b) AND currency <> ''", (wanted,)).fetchall()
    return {r[0]: OrderCurrency(r[1], (r[2], r[3])) for r in rows}


# ---- TRUNCATE: position-guarded soft delete + per-entity watermark -----------------------
PARTNERS, ORDERS, ITEMS, DEMANDS = ("erp.business_partners", "erp.sales_orders",
                                    "erp.sales_order_items", "erp.demand_signals")
# Every transaction that writes these tables locks them in this order (a truncate in SHARE
# ROW EXCLUSIVE mode, an upsert in ROW EXCLUSIVE, which it takes anyway): two consumers
# cannot deadlock over them.
LOCK_ORDER = (PARTNERS, ORDERS, ITEMS, DEMANDS)
# The tables a truncate of each entity marks deleted.
TRUNCATED_TABLES = {"customer": (PARTNERS,), "order": (ORDERS, ITEMS),
                    "order_line": (ITEMS,), "market_demand": (DEMANDS,)}
_OLDER = "NOT deleted AND (source_lsn, source_seq) < (%(lsn)s, %(seq)s)"


def _lock(cur: psycopg.Cursor[Any], modes: dict[str, str]) -> None:
    """Lock the tables in LOCK_ORDER. Why: a truncate must not miss a row another consumer
    inserts concurrently with a position older than the truncate (it read the watermark
    before the truncate committed). SHARE ROW EXCLUSIVE (the truncate) conflicts with ROW
    EXCLUSIVE (every upsert): whichever comes second waits for the first to commit, and then
    sees its rows (the truncate) or its watermark (the upsert, which reads it after locking).
    """
    statements = [f"LOCK TABLE {t} IN {modes[t]} MODE" for t in LOCK_ORDER if t in modes]
    if statements:  # one round trip
        cur.execute("; ".join(statements))


def apply_truncate(cur: psycopg.Cursor[Any], truncate: TruncateRow) -> int:
    """Mark every ERP row of the entity older than the truncate deleted (with the truncate's
    position), its orders' stock effects undone, and raise the entity's watermark in
    ``sync.truncations``; returns the rows marked. Idempotent: a truncate at or below the
    watermark (a replay, or an older one after a newer one) changes nothing. The caller
    holds the entity's tables (``_lock``)."""
    pos = truncate.pos
    cur.execute("INSERT INTO sync.truncations (entity) VALUES (%s) ON CONFLICT DO NOTHING",
                (truncate.entity,))
    mark = cur.execute("SELECT source_lsn, source_seq FROM sync.truncations WHERE entity = %s "
                       "FOR UPDATE", (truncate.entity,)).fetchone()
    if mark is not None and (mark[0], mark[1]) >= (pos.lsn, pos.seq):
        return 0
    at = {"lsn": pos.lsn, "seq": pos.seq, "event_id": pos.event_id, "time": pos.commit_time}
    marked = 0
    orders: set[Any] = set()
    if truncate.entity in ("customer", "market_demand"):
        table = PARTNERS if truncate.entity == "customer" else DEMANDS
        cur.execute(f"UPDATE {table} SET deleted = true, source_lsn = %(lsn)s, "
                    "source_seq = %(seq)s, event_id = %(event_id)s, crm_commit_time = %(time)s,"
                    f" applied_at = clock_timestamp() WHERE {_OLDER}", at)
        marked = cur.rowcount
    if truncate.entity == "order":
        rows = cur.execute(
            f"UPDATE {ORDERS} SET deleted = true, source_lsn = %(lsn)s, source_seq = %(seq)s, "
            "event_id = %(event_id)s, crm_commit_time = %(time)s, "
            f"applied_at = clock_timestamp() WHERE {_OLDER} RETURNING crm_order_id",
            at).fetchall()
        marked = len(rows)
        orders.update(r[0] for r in rows)
    if truncate.entity in ("order", "order_line"):
        rows = cur.execute(
            f"UPDATE {ITEMS} SET deleted = true, source_lsn = %(lsn)s, source_seq = %(seq)s "
            f"WHERE {_OLDER} RETURNING crm_order_id", at).fetchall()
        if truncate.entity == "order_line":
            marked = len(rows)
        orders.update(r[0] for r in rows)
    if orders:
        apply_stock_delta(cur, sorted(orders))
    cur.execute("UPDATE sync.truncations SET source_lsn = %s, source_seq = %s, event_id = %s, "
                "crm_table = %s, crm_commit_time = %s, applied_at = clock_timestamp(), "
                "truncates = truncates + 1, rows_marked = rows_marked + %s WHERE entity = %s",
                (pos.lsn, pos.seq, pos.event_id, truncate.table, pos.commit_time, marked,
                 truncate.entity))
    return marked


def _watermarks(cur: psycopg.Cursor[Any], entities: set[str]) -> dict[str, tuple[int, int]]:
    """The truncation watermark of each entity that has one."""
    if not entities:
        return {}
    rows = cur.execute("SELECT entity, source_lsn, source_seq FROM sync.truncations "
                       "WHERE entity = ANY(%s) AND source_lsn > 0", (sorted(entities),))
    return {r[0]: (r[1], r[2]) for r in rows.fetchall()}


# Every watermark (one row per truncated entity, four at most): no parameters, so it can
# share the LOCK statement's round trip (several statements are one simple query).
_ALL_WATERMARKS = ("SELECT entity, source_lsn, source_seq FROM sync.truncations "
                   "WHERE source_lsn > 0")


def _lock_and_read_watermarks(cur: psycopg.Cursor[Any], modes: dict[str, str],
                              entities: set[str]) -> dict[str, tuple[int, int]]:
    """``_lock`` then ``_watermarks`` in one round trip (a batch without truncates: at a low
    rate, one event per batch, each round trip is a noticeable share of its cost). The
    watermarks are read after the locks are granted, as ``_lock`` needs."""
    statements = [f"LOCK TABLE {t} IN {modes[t]} MODE" for t in LOCK_ORDER if t in modes]
    if entities:
        statements.append(_ALL_WATERMARKS)
    if not statements:
        return {}
    cur.execute("; ".join(statements))
    if not entities:
        return {}
    while cur.nextset():  # the last result is the watermarks'
        pass
    return {r[0]: (r[1], r[2]) for r in cur.fetchall() if r[0] in entities}


def _after(mark: tuple[int, int] | None, pos: Position) -> bool:
    """Whether an event at ``pos`` is newer than the truncation watermark (or there is none)."""
    return mark is None or (pos.lsn, pos.seq) > mark


def apply_changes(conn: PgConn, changes: list[ErpChange], *, full_recount: bool = False
                  ) -> None:
    """Write a batch of changes (already ordered and checked) in the open transaction.

    Truncates first, then every row newer than its entity's truncation watermark (an older
    one was truncated in the CRM: applying it now, late from a lagging partition or a
    release, would bring it back). The result does not depend on where the truncate was in
    the batch: a row older than it is refused or marked deleted either way.
    ``full_recount`` is for benchmarks only (see ``apply_stock_delta``).
    """
    truncates = sorted((c.truncate for c in changes if c.truncate),
                       key=lambda t: (t.pos.lsn, t.pos.seq))
    partners = newest_per_key((c.partner for c in changes if c.partner),
                              lambda r: r.crm_customer_id)
    headers = newest_per_key((c.header for c in changes if c.header), lambda r: r.crm_order_id)
    items = newest_per_key((i for c in changes for i in c.items),
                           lambda r: (r.crm_order_id, r.crm_line_id))
    demands = newest_per_key((c.demand for c in changes if c.demand), lambda r: r.crm_demand_id)
    modes = {table: "ROW EXCLUSIVE" for table, rows in (
        (PARTNERS, partners), (ORDERS, headers), (ITEMS, items), (DEMANDS, demands)) if rows}
    for t in truncates:
        modes.update(dict.fromkeys(TRUNCATED_TABLES[t.entity], "SHARE ROW EXCLUSIVE"))
    entities = {e for e, rows in (
        ("customer", partners), ("order", headers or items), ("order_line", items),
        ("market_demand", demands)) if rows}
    with conn.cursor() as cur:
        if truncates:
            _lock(cur, modes)
            for t in truncates:
                apply_truncate(cur, t)
            marks = _watermarks(cur, entities)
        else:
            marks = _lock_and_read_watermarks(cur, modes, entities)
        partners = [p for p in partners if _after(marks.get("customer"), p.pos)]
        headers = [h for h in headers if _after(marks.get("order"), h.pos)]
        items = [i for i in items if _after(marks.get("order"), i.pos)
                 and _after(marks.get("order_line"), i.pos)]
        demands = [d for d in demands if _after(marks.get("market_demand"), d.pos)]
        if partners:
            bulk_upsert(cur, PARTNER_UPSERT, [
                (p.crm_customer_id, p.full_name, p.gender_code, p.birth_date, p.age,
                 p.phone_e164, p.email, p.province, p.city, p.district, p.street,
                 p.purchase_frequency, p.purchase_amount, p.amount_currency,
                 p.product_preference, p.notes, p.deleted, *_pos(p.pos), p.phone_extension,
                 list(p.phone_others) or None, p.division_code)
                for p in sorted(partners, key=lambda p: p.crm_customer_id)])
        if headers:
            bulk_upsert(cur, HEADER_UPSERT, [
                (h.crm_order_id, h.order_no, h.crm_customer_id, h.order_date, h.status_code,
                 h.currency, h.deleted, *_pos(h.pos), h.total_amount)
                for h in sorted(headers, key=lambda h: h.crm_order_id)])
        if items:
            bulk_upsert(cur, ITEM_UPSERT, [
                (i.crm_order_id, i.crm_line_id, i.sku, i.product_name, i.quantity, i.unit_code,
                 i.unit_price, i.deleted, i.pos.lsn, i.pos.seq, i.base_quantity, i.base_unit)
                for i in sorted(items, key=lambda i: (i.crm_order_id, i.crm_line_id))])
        if demands:
            bulk_upsert(cur, DEMAND_UPSERT, [
                (d.crm_demand_id, d.signal_type, d.product_category, d.content, d.observed_at,
                 d.deleted, *_pos(d.pos))
                for d in sorted(demands, key=lambda d: d.crm_demand_id)])
        order_ids = sorted({h.crm_order_id for h in headers} | {i.crm_order_id for i in items})
        if order_ids:
            apply_stock_delta(cur, order_ids, full_recount=full_recount)


def apply_stock_delta(cur: psycopg.Cursor[Any], order_ids: list[Any], *,
                      full_recount: bool = False) -> None:
    """Bring the stock up to date with the touched orders (ids as stored, any key type).

    Each order's effect is kept in ``erp.order_stock_effects``; the new effect is computed
    from the order as it now is (base quantities), and only the difference is added to the
    SKUs' totals, in the caller's transaction: the cost depends on the batch, not on the size
    of the ERP. ``full_recount`` re-sums the touched SKUs over every order instead (the old
    way, for benchmarks).
    """
    if not full_recount:
        cur.execute(STOCK_DELTA, {"orders": order_ids})
        return
    skus = [r[0] for r in cur.execute(_TOUCHED_SKUS, {"orders": order_ids}).fetchall()]
    if not skus:
        return
    cur.execute("INSERT INTO erp.stock (sku) SELECT unnest(%s::text[]) "
                "ON CONFLICT (sku) DO NOTHING", (skus,))
    cur.execute("SELECT sku FROM erp.stock WHERE sku = ANY(%s) ORDER BY sku FOR UPDATE", (skus,))
    cur.execute(RECOUNT_SKUS, (skus,))
