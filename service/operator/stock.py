"""A full stock recount (`crm-erp-sync stock recount`, and part of `reconcile`).

The consumers keep stock incrementally: each order's effect is stored and only its change is
added to the SKU totals. This recounts everything from the orders themselves, with the current
mappings, in three steps:

1. **Lines in base units.** Every live order line's base quantity is recomputed from its
   quantity as typed (``quantity``, ``unit_code``) with the current ``[measures]`` and
   ``[sku_units]``, one factor per (SKU, unit) pair. This is also the upgrade path for lines
   written before base units existed, and what follows a change of a SKU's base unit or a
   factor. A line that cannot be converted exactly is reported and, when repairing, counts
   nowhere (base quantity NULL) rather than in a wrong unit.
2. **Each order's effect**, rederived from its status and its lines, written where it differs.
3. **SKU totals** set to the sum of the effects, and each SKU's ``base_unit`` to the
   mappings' base unit.

Step 1 commits on its own (it keeps the invariant the consumers rely on: every total is the
sum of the stored effects). Steps 2 and 3 run in one transaction holding
``erp.order_stock_effects`` in EXCLUSIVE mode (reads go on), so no consumer applies a
difference while the totals are rebuilt; consumers wait for it, then go on from the rebuilt
effects. With ``repair=False`` nothing is written and nothing is locked: the same figures are
computed and reported (this is what ``reconcile`` runs without ``--repair``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg

from service.erp.apply import ORDER_EFFECTS, effect_diff, load_status_effects
from service.erp.mappings import Mappings
from service.erp.units import conversions, is_counted
from service.pg import PgConn

__all__ = ["SkuDrift", "StockRecount", "recount"]


@dataclass(frozen=True)
class SkuDrift:
    """A SKU whose totals differ from the recount (quantities in ``base_unit``)."""

    sku: str
    base_unit: str | None
    stored_unit: str | None
    reserved: Decimal
    issued: Decimal
    expected_reserved: Decimal
    expected_issued: Decimal


@dataclass(frozen=True)
class Unconvertible:
    sku: str
    unit: str
    lines: int
    reason: str


@dataclass
class StockRecount:
    repaired: bool
    lines: int = 0
    lines_converted: int = 0     # lines whose base quantity was (would be) rewritten
    unconvertible: list[Unconvertible] = field(default_factory=list)
    orders_fixed: int = 0        # orders whose stored effect was (would be) rewritten
    drift: list[SkuDrift] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def needs_attention(self) -> bool:
        """Drift found (and not repaired), or lines that count nowhere."""
        return bool(self.unconvertible) or (not self.repaired and bool(
            self.drift or self.lines_converted or self.orders_fixed))


# Lines whose base quantity differs from quantity x factor (exactly representable ones).
_LINE_CHANGES = """
{head} unnest(%(skus)s::text[], %(units)s::text[], %(factors)s::numeric[], %(bases)s::text[],
            %(counted)s::boolean[]) AS c(sku, unit_code, factor, base_unit, counted)
WHERE i.sku = c.sku AND i.unit_code = c.unit_code AND NOT i.deleted
  AND round(i.quantity * c.factor, 3) = i.quantity * c.factor
  AND NOT (c.counted AND trunc(i.quantity * c.factor) <> i.quantity * c.factor)
  AND (i.base_quantity IS DISTINCT FROM i.quantity * c.factor
       OR i.base_unit IS DISTINCT FROM c.base_unit)
"""

# Lines whose quantity x factor is finer than 0.001, or a fraction of a counted unit.
_INEXACT = """
{head} unnest(%(skus)s::text[], %(units)s::text[], %(factors)s::numeric[], %(bases)s::text[],
            %(counted)s::boolean[]) AS c(sku, unit_code, factor, base_unit, counted)
WHERE i.sku = c.sku AND i.unit_code = c.unit_code AND NOT i.deleted
  AND (round(i.quantity * c.factor, 3) <> i.quantity * c.factor
       OR (c.counted AND trunc(i.quantity * c.factor) <> i.quantity * c.factor))
{tail}
"""

# Totals as the orders say they are, beside the stored ones, for the SKUs that differ.
_DRIFT = f"""
WITH effects AS ({ORDER_EFFECTS.format(scope="")}
), totals AS (
    SELECT sku, coalesce(sum(quantity) FILTER (WHERE effect = 'reserve'), 0) AS reserved,
           coalesce(sum(quantity) FILTER (WHERE effect = 'issue'), 0) AS issued
    FROM effects GROUP BY sku
)
SELECT sku, s.base_unit, coalesce(s.reserved, 0), coalesce(s.issued, 0),
       coalesce(t.reserved, 0), coalesce(t.issued, 0)
FROM erp.stock s FULL JOIN totals t USING (sku)
WHERE coalesce(s.reserved, 0) <> coalesce(t.reserved, 0)
   OR coalesce(s.issued, 0) <> coalesce(t.issued, 0)
   OR s.base_unit IS DISTINCT FROM (SELECT b.base FROM unnest(%(skus)s::text[],
                                    %(bases)s::text[]) AS b(sku, base) WHERE b.sku = s.sku)
ORDER BY sku
"""

_FIX_TOTALS = """
WITH totals AS (
    SELECT sku, coalesce(sum(quantity) FILTER (WHERE effect = 'reserve'), 0) AS reserved,
           coalesce(sum(quantity) FILTER (WHERE effect = 'issue'), 0) AS issued
    FROM erp.order_stock_effects GROUP BY sku
), units AS (
    SELECT * FROM unnest(%(skus)s::text[], %(bases)s::text[]) AS b(sku, base)
), fixed AS (
    SELECT sku, coalesce(t.reserved, 0) AS reserved, coalesce(t.issued, 0) AS issued, u.base
    FROM (SELECT sku FROM erp.stock UNION SELECT sku FROM totals) k
    LEFT JOIN totals t USING (sku) LEFT JOIN units u USING (sku)
)
INSERT INTO erp.stock AS s (sku, reserved, issued, base_unit)
SELECT sku, reserved, issued, base FROM fixed ORDER BY sku
ON CONFLICT (sku) DO UPDATE SET reserved = EXCLUDED.reserved, issued = EXCLUDED.issued,
    base_unit = coalesce(EXCLUDED.base_unit, s.base_unit), delta_unit = NULL
WHERE (s.reserved, s.issued) <> (EXCLUDED.reserved, EXCLUDED.issued)
   OR s.base_unit IS DISTINCT FROM coalesce(EXCLUDED.base_unit, s.base_unit)
   OR s.delta_unit IS NOT NULL
"""


def recount(conn: PgConn, mappings: Mappings, *, repair: bool) -> StockRecount:
    """Recount the ERP's stock from its orders; with ``repair``, make it so.

    ``conn`` is an ERP connection in autocommit mode (each step opens its own transaction).
    Returns what differed: lines whose base quantity was stale, lines that cannot be
    converted (per SKU and unit, with the reason), orders whose stored effect was stale,
    and the SKUs whose totals or unit differed (with the stored and the recounted values,
    read before the repair). Raises ``psycopg.Error`` subclasses on database failures.
    """
    started = time.monotonic()
    out = StockRecount(repaired=repair)
    for attempt in range(1, 4):
        try:
            _convert_lines(conn, mappings, out, repair=repair)
            break
        except psycopg.errors.DeadlockDetected:
            # Rows a consumer was writing meanwhile, locked in another order: try again.
            if attempt == 3:
                raise
    units = {"skus": list(mappings.sku_units),
             "bases": [t.base for t in mappings.sku_units.values()]}
    with conn.transaction():
        if repair:
            # Consumers add differences to the effects; none may do so while they are rebuilt.
            conn.execute("LOCK TABLE erp.order_stock_effects IN EXCLUSIVE MODE")
        out.drift = [SkuDrift(sku, mappings.sku_units[sku].base if sku in mappings.sku_units
                              else None, unit, *values)
                     for sku, unit, *values in conn.execute(_DRIFT, units).fetchall()]
        if repair:
            row = conn.execute(effect_diff(None) + "\nSELECT count(DISTINCT crm_order_id) "
                               "FROM diff").fetchone()
            out.orders_fixed = int(row[0]) if row else 0
            conn.execute(_FIX_TOTALS, units)
        else:
            row = conn.execute(_effects_to_fix()).fetchone()
            out.orders_fixed = int(row[0]) if row else 0
    out.seconds = round(time.monotonic() - started, 3)
    return out



def _convert_lines(conn: PgConn, mappings: Mappings, out: StockRecount, *, repair: bool
                   ) -> None:
    """Step 1, its own transaction: every live line's base quantity, current mappings."""
    out.unconvertible = []
    with conn.transaction():
        load_status_effects(conn, mappings)  # the current mappings' effects, as consumers do
        pairs = conn.execute("SELECT sku, unit_code, count(*) FROM erp.sales_order_items "
                             "WHERE NOT deleted GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        out.lines = sum(n for _, _, n in pairs)
        counts = {(sku, unit): n for sku, unit, n in pairs}
        ok, bad = conversions(mappings, list(counts))
        params = _conversion_params(mappings, ok)
        inexact = conn.execute(_INEXACT.format(
            head="SELECT i.sku, i.unit_code, count(*) FROM erp.sales_order_items i,",
            tail="GROUP BY 1, 2 ORDER BY 1, 2"), params).fetchall()
        out.unconvertible = [Unconvertible(sku, unit, counts[(sku, unit)], why)
                             for (sku, unit), why in sorted(bad.items())]
        out.unconvertible += [
            Unconvertible(sku, unit, n, f"some quantities in {unit} are not a whole number "
                          f"or finer than 0.001 in {ok[(sku, unit)][1]}")
            for sku, unit, n in inexact]
        if repair:
            out.lines_converted = conn.execute(_LINE_CHANGES.format(
                head="UPDATE erp.sales_order_items i SET base_quantity = i.quantity * c.factor,"
                " base_unit = c.base_unit FROM"), params).rowcount
            # What cannot be converted (exactly) counts nowhere rather than in a wrong unit.
            if bad:
                conn.execute(
                    "UPDATE erp.sales_order_items i SET base_quantity = NULL, base_unit = NULL "
                    "FROM unnest(%s::text[], %s::text[]) AS g(sku, unit_code) "
                    "WHERE i.sku = g.sku AND i.unit_code = g.unit_code AND NOT i.deleted "
                    "AND i.base_quantity IS NOT NULL", ([s for s, _ in sorted(bad)],
                                                        [u for _, u in sorted(bad)]))
            if inexact:
                conn.execute(_INEXACT.format(
                    head="UPDATE erp.sales_order_items i SET base_quantity = NULL, "
                    "base_unit = NULL FROM", tail="AND i.base_quantity IS NOT NULL"), params)
        else:
            row = conn.execute(_LINE_CHANGES.format(
                head="SELECT count(*) FROM erp.sales_order_items i,"), params).fetchone()
            out.lines_converted = int(row[0]) if row else 0


def _effects_to_fix() -> str:
    """How many orders' stored effects differ from their orders (read-only)."""
    return f"""
WITH new AS ({ORDER_EFFECTS.format(scope="")}
), old AS (SELECT crm_order_id, sku, effect, quantity FROM erp.order_stock_effects)
SELECT count(DISTINCT crm_order_id)
FROM new n FULL JOIN old o USING (crm_order_id, sku, effect)
WHERE n.quantity IS DISTINCT FROM o.quantity
"""


def _conversion_params(mappings: Mappings, ok: dict[tuple[str, str], tuple[Decimal, str]]
                       ) -> dict[str, list[Any]]:
    keys = sorted(ok)
    return {"skus": [s for s, _ in keys], "units": [u for _, u in keys],
            "factors": [ok[k][0] for k in keys], "bases": [ok[k][1] for k in keys],
            "counted": [is_counted(mappings, ok[k][1]) for k in keys]}
