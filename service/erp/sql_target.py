"""The ``sql`` ERP target: the project's own schema (``service/erp/schema.sql``), written in
the consumer's transaction on the sync-state database, so ERP rows, held events, dead letters
and positions commit or roll back together.

This is the only module (with :mod:`service.erp.apply`, which it wraps) that names the
``erp.*`` tables for applying and for ``reconcile``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from service.erp.apply import (
    apply_changes,
    apply_stock_delta,
    check_schema,
    check_stock_units,
    existing_customers,
    load_status_effects,
    stored_order_currencies,
)
from service.erp.changes import ErpChange, OrderCurrency
from service.erp.mappings import Mappings
from service.erp.target import LastApplied, Outcome, Status
from service.errors import ConfigError, ErpNotSetUp
from service.pg import PgConn
from service.settings import Settings

# A constraint or a value the ERP refuses: retrying the same row cannot help.
PERMANENT_PG = (psycopg.errors.IntegrityError, psycopg.errors.DataError)

# kind -> (table, key column, compared columns)
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "customer": ("erp.business_partners", "crm_customer_id",
                 ("full_name", "gender_code", "birth_date", "phone_e164", "email", "province",
                  "city", "district", "street", "purchase_frequency", "purchase_amount",
                  "amount_currency", "product_preference", "notes", "phone_extension",
                  "phone_others", "division_code")),
    "order": ("erp.sales_orders", "crm_order_id",
              ("order_no", "crm_customer_id", "order_date", "status_code", "currency",
               "total_amount")),
    "market_demand": ("erp.demand_signals", "crm_demand_id",
                      ("signal_type", "product_category", "content", "observed_at")),
}
# `trace`: (ERP table, its CRM key column, what the row is to the key)
KEY_TABLES = (
    ("erp.business_partners", "crm_customer_id", "customer"),
    ("erp.sales_orders", "crm_order_id", "order"),
    ("erp.sales_orders", "crm_customer_id", "order of the customer"),
    ("erp.demand_signals", "crm_demand_id", "market demand"),
)
# The tables whose rows carry applied_at and crm_commit_time (`status`'s "last applied").
_APPLIED = ("SELECT applied_at, crm_commit_time, event_id FROM erp.business_partners UNION ALL "
            "SELECT applied_at, crm_commit_time, event_id FROM erp.sales_orders UNION ALL "
            "SELECT applied_at, crm_commit_time, event_id FROM erp.demand_signals")
ITEM_FIELDS = ("sku", "product_name", "quantity", "unit_code", "unit_price", "base_quantity",
               "base_unit")


def _key(change: ErpChange) -> str:
    if change.truncate is not None:
        return change.truncate.table
    if change.partner is not None:
        return change.partner.crm_customer_id
    if change.demand is not None:
        return change.demand.crm_demand_id
    return change.order_id or ""


class SqlTarget:
    """``ErpTarget`` over the ``erp.*`` schema; needs ``attach(conn)`` before use."""

    name: str = "sql"
    kinds: tuple[str, ...] = ("customer", "order", "market_demand")
    stock_unavailable: str | None = None  # erp.stock is the sync's: `stock recount` keeps it

    def __init__(self, settings: Settings, mappings: Mappings | None) -> None:
        self.settings = settings
        self.mappings = mappings
        self._conn: PgConn | None = None

    @property
    def conn(self) -> PgConn:
        if self._conn is None:
            raise RuntimeError("SqlTarget used before attach(conn)")
        return self._conn

    def attach(self, conn: PgConn) -> None:
        if self.mappings is None:
            raise ConfigError(Settings.env_var("mappings_file"),
                              "the sql target applies and compares only with a mappings file")
        self._conn = conn
        check_schema(conn)
        load_status_effects(conn, self.mappings)
        check_stock_units(conn, self.mappings)

    def use_mappings(self, mappings: Mappings) -> None:
        self.mappings = mappings

    def not_set_up(self, conn: PgConn) -> ErpNotSetUp | None:
        """What ``attach`` refuses (``check_schema``: the ``erp.*`` tables, the columns
        added since), without a mappings file."""
        try:
            check_schema(conn)
        except ErpNotSetUp as exc:
            return exc
        return None

    def close(self) -> None:
        self._conn = None  # the connection is the caller's

    # ---- apply ------------------------------------------------------------------------------
    def apply(self, changes: Sequence[ErpChange]) -> list[Outcome]:
        """All changes in one savepoint; when PostgreSQL refuses a row (a constraint, a
        value), each change in a savepoint of its own, so only the refused ones fail.

        ``stale`` is not told apart: the position guard in the upserts makes an older
        change a no-op, reported ``applied``. Transient PostgreSQL errors propagate."""
        conn = self.conn
        if not changes:
            return []
        headerless = self._headerless(changes)
        if headerless:
            held = {i: Outcome(c.kind, _key(c), Status.HELD,
                               "order lines before the order header")
                    for i, c in enumerate(changes) if c.order_id in headerless
                    and c.header is None}
            rest = [c for i, c in enumerate(changes) if i not in held]
            applied = iter(self.apply(rest))
            return [held[i] if i in held else next(applied) for i in range(len(changes))]
        try:
            with conn.transaction():  # a savepoint: the bulk attempt
                apply_changes(conn, list(changes))
            return [Outcome(c.kind, _key(c), Status.APPLIED) for c in changes]
        except PERMANENT_PG:
            pass
        out: list[Outcome] = []
        for change in changes:
            try:
                with conn.transaction():
                    apply_changes(conn, [change])
                out.append(Outcome(change.kind, _key(change), Status.APPLIED))
            except PERMANENT_PG as exc:
                out.append(Outcome(change.kind, _key(change), Status.REFUSED,
                                   f"{type(exc).__name__}: {exc.diag.message_primary}"))
        return out

    def _headerless(self, changes: Sequence[ErpChange]) -> set[str]:
        """The orders of line-only changes (live lines, no header) whose header neither the
        ERP holds (any state) nor this batch brings: written, such lines would be items of
        no order (newcomer9 F13: an order deleted by hand from the ERP). Held instead, as
        the tryton target holds lines before their header. One query, only for a batch
        with such changes (never per event)."""
        lone = {c.order_id for c in changes if c.header is None and c.order_id is not None
                and any(not i.deleted for i in c.items)}
        lone -= {c.header.crm_order_id for c in changes if c.header is not None}
        if not lone:
            return set()
        rows = self.conn.execute(
            "SELECT crm_order_id FROM erp.sales_orders WHERE crm_order_id = ANY(%s)",
            (sorted(lone),)).fetchall()
        return lone - {str(r[0]) for r in rows}

    def present_customers(self, keys: Iterable[str]) -> set[str]:
        return existing_customers(self.conn, keys)

    def order_currencies(self, keys: Iterable[str]) -> dict[str, OrderCurrency]:
        return stored_order_currencies(self.conn, keys)

    # ---- reconcile ----------------------------------------------------------------------------
    def view(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def read(self, kind: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        table, key_col, fields = TABLES[kind]
        cols = ", ".join((key_col, *fields, "deleted", "source_lsn", "source_seq"))
        rows = self.conn.execute(f"SELECT {cols} FROM {table} WHERE {key_col} = ANY(%s)",
                                 (list(keys),)).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            values = dict(zip((*fields, "deleted"), r[1:-2], strict=True))
            values["position"] = (r[-2], r[-1])
            if "phone_others" in values:  # text[] (NULL when none) vs the mapped tuple
                values["phone_others"] = tuple(values["phone_others"] or ())
            out[r[0]] = values
        if kind == "order" and out:
            for values in out.values():
                values["items"] = {}
            for oid, line_id, *rest in self.conn.execute(
                    f"SELECT crm_order_id, crm_line_id, {', '.join(ITEM_FIELDS)} "
                    "FROM erp.sales_order_items WHERE crm_order_id = ANY(%s) AND NOT deleted",
                    (list(out),)).fetchall():
                out[oid]["items"][line_id] = tuple(rest)
        return out

    def live_keys(self, kind: str, after: str | None, limit: int) -> list[str]:
        table, key_col, _ = TABLES[kind]
        where, params = ("NOT deleted", []) if after is None else (
            f"NOT deleted AND {key_col} > %s", [after])
        rows = self.conn.execute(f"SELECT {key_col} FROM {table} WHERE {where} "
                                 f"ORDER BY {key_col} LIMIT %s", [*params, limit]).fetchall()
        return [r[0] for r in rows]

    def mark_deleted(self, kind: str, positions: dict[str, tuple[int, int] | None]
                     ) -> list[str]:
        table, key_col, _ = TABLES[kind]
        conn = self.conn
        done: list[str] = []
        with conn.transaction():
            for key, position in positions.items():
                if position is None:
                    continue
                row = conn.execute(
                    f"UPDATE {table} SET deleted = true, applied_at = clock_timestamp() "
                    f"WHERE {key_col} = %s AND NOT deleted AND source_lsn = %s "
                    "AND source_seq = %s RETURNING 1", (key, *position)).fetchone()
                if row is not None:
                    done.append(key)
            if kind == "order" and done:
                conn.execute("UPDATE erp.sales_order_items SET deleted = true "
                             "WHERE crm_order_id = ANY(%s)", (done,))
                with conn.cursor() as cur:
                    apply_stock_delta(cur, done)
        return done

    def unretired_extra(self, kind: str) -> str | None:
        return None  # mark_deleted retires every kind

    # ---- operator reads -------------------------------------------------------------------
    def last_applied(self, conn: PgConn) -> LastApplied:
        """From the ERP rows' own ``applied_at`` and ``crm_commit_time``."""
        last = conn.execute("SELECT max(applied_at), max(crm_commit_time), "
                            "extract(epoch FROM clock_timestamp() - max(applied_at)) "
                            f"FROM ({_APPLIED}) t").fetchone()
        delay = conn.execute("SELECT extract(epoch FROM applied_at - crm_commit_time) "
                             f"FROM ({_APPLIED}) t WHERE event_id NOT LIKE 'snap/%%' "
                             "ORDER BY applied_at DESC LIMIT 1").fetchone()
        return LastApplied.from_rows(last, delay)

    def key_records(self, conn: PgConn, key: str, orders: Sequence[str]
                    ) -> list[dict[str, Any]]:
        """Every ``erp.*`` row of the key (whole rows: position, event and ``deleted`` are
        columns of their own); for ``orders``, their ``erp.sales_orders`` rows and the
        ``erp.sales_order_items`` row of the line ``key``."""
        out: list[dict[str, Any]] = []
        queries: list[tuple[str, str, str, dict[str, Any]]] = [
            (table, what, f"{column} = %(key)s", {"key": key})
            for table, column, what in KEY_TABLES]
        if orders:  # the line's order (by its order key only: not a customer's key)
            queries += [
                ("erp.sales_orders", "order of the line", "crm_order_id = ANY(%(orders)s)",
                 {"orders": list(orders)}),
                ("erp.sales_order_items", "order line",
                 "crm_order_id = ANY(%(orders)s) AND crm_line_id = %(key)s",
                 {"orders": list(orders), "key": key})]
        for table, what, cond, params in queries:
            cur = conn.execute(f"SELECT * FROM {table} WHERE {cond}", params)
            names = [d.name for d in cur.description or ()]
            out += [{"table": table, "as": what, "row": dict(zip(names, r, strict=True))}
                    for r in cur.fetchall()]
        return out
