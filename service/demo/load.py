"""`crm-erp-sync demo load`: fill the demo CRM with realistic data, then keep changing it.

1. The schema (crm_schema.sql) is created when a table is missing.
2. Customers, then orders with their lines, then market-demand records are inserted with
   COPY in transactions of a few thousand rows (ids are reserved from the tables' identity
   sequences first, so the rows can reference each other without a round trip per row;
   ids already held by explicitly keyed rows are skipped: `_reserve_ids`).
3. A mix of follow-up changes, one CRM transaction each, as users make them: contact edits,
   orders moving 待付款 -> 已付款 -> 已发货 -> 已完成 (or 已取消), quantity corrections, new
   market-demand records, a few deleted orders and customers. `rate` caps the changes per
   second with a deadline schedule (change i is due at start + i / rate, so sleeping never
   accumulates drift); without it the changes are pipelined, still one transaction each.

Only counts are logged: the rows are personal data.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from itertools import islice
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, TransactionStatus

from service.demo.generator import (
    UPDATABLE_CUSTOMER_COLUMNS,
    Change,
    Customer,
    CustomerDelete,
    CustomerUpdate,
    DemoGenerator,
    LineQuantityChange,
    MarketDemand,
    MarketDemandInsert,
    OrderDelete,
    OrderLine,
    OrderStatusChange,
    SalesOrder,
)
from service.errors import ConfigError, StackUnavailable

T = TypeVar("T")
Query = str | sql.Composed
Statement = tuple[Query, tuple[object, ...]]

CRM_TABLES = ("customers", "sales_orders", "order_lines", "market_demand")
CUSTOMER_BATCH = 2000  # rows per insert transaction
ORDER_BATCH = 1000     # orders (with their 1-4 lines) per insert transaction
DEMAND_BATCH = 2000
PIPELINE_SYNC_EVERY = 500  # changes sent before waiting for the server's results
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class TableCounts:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0  # including rows removed by ON DELETE CASCADE


@dataclass(frozen=True)
class LoadReport:
    """What `load_demo` wrote (row counts per table) and how long it took."""

    customers: TableCounts
    sales_orders: TableCounts
    order_lines: TableCounts
    market_demand: TableCounts
    changes: int              # follow-up change transactions committed
    schema_created: bool
    insert_seconds: float
    change_seconds: float

    def __str__(self) -> str:
        tables = ", ".join(
            f"{name} +{c.inserted} ~{c.updated} -{c.deleted}"
            for name, c in (("customers", self.customers), ("sales_orders", self.sales_orders),
                            ("order_lines", self.order_lines),
                            ("market_demand", self.market_demand)))
        return (f"{tables}; {self.changes} changes; inserts {self.insert_seconds:.1f} s, "
                f"changes {self.change_seconds:.1f} s")


class _Tally:
    def __init__(self) -> None:
        self.counts = {t: [0, 0, 0] for t in CRM_TABLES}  # inserted, updated, deleted
        self.changes = 0

    def add(self, table: str, inserted: int = 0, updated: int = 0, deleted: int = 0) -> None:
        c = self.counts[table]
        c[0] += inserted
        c[1] += updated
        c[2] += deleted

    def table(self, name: str) -> TableCounts:
        return TableCounts(*self.counts[name])


@dataclass(frozen=True)
class InsertBatch:
    """One insert transaction's rows: (table, its columns, rows in column order) per table."""

    tables: tuple[tuple[str, tuple[str, ...], list[Sequence[object]]], ...]

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, _, rows in self.tables)


def copy_batch(conn: psycopg.Connection[Any], batch: InsertBatch, schema: str = "crm") -> None:
    """One transaction: COPY each of the batch's tables into `schema`'s table of that name."""
    with conn.transaction():
        for table, columns, rows in batch.tables:
            _copy(conn, table, columns, rows, schema=schema)


class DemoWorkload:
    """The demo CRM's inserts and follow-up changes, one step at a time.

    `load_demo` runs the steps in one go; the benchmarks interleave them with measurements
    (the insert batches generated before they are timed, changes at several rates, from
    several sessions). One generator and one change planner throughout, so that every
    planned change applies to a row that was inserted; deterministic for a seed, given the
    same starting ids. `tally` counts what `insert` and `statements` write."""

    def __init__(self, seed: int) -> None:
        self._gen = DemoGenerator(seed)
        self._planner = self._gen.change_planner()
        self.tally = _Tally()

    def insert_batches(self, conn: psycopg.Connection[Any], customers: int, orders: int,
                       market_demand: int) -> Iterator[InsertBatch]:
        """The insert transactions (customers, then orders with their lines, then market
        demand), generated lazily. Ids are reserved from the CRM's identity sequences on
        `conn` first; the planner learns each row as it is generated."""
        customer_ids = _reserve_ids(conn, "customers", "customer_id", customers)
        for chunk in _chunks(customer_ids, CUSTOMER_BATCH):
            rows = [self._gen.customer(cid) for cid in chunk]
            for c in rows:
                self._planner.add_customer(c)
            yield InsertBatch((("customers", Customer._fields, list(rows)),))
        order_ids = _reserve_ids(conn, "sales_orders", "order_id", orders)
        for batch in _chunks(self._gen.orders(order_ids, customer_ids), ORDER_BATCH):
            for o in batch:
                self._planner.add_order(o)
            yield InsertBatch((
                ("sales_orders", SalesOrder._fields, [o.header for o in batch]),
                ("order_lines", OrderLine._fields, [line for o in batch for line in o.lines])))
        demand_ids = _reserve_ids(conn, "market_demand", "demand_id", market_demand)
        demand = ((did, *self._gen.market_demand()) for did in demand_ids)
        for records in _chunks(demand, DEMAND_BATCH):
            yield InsertBatch((("market_demand", ("demand_id", *MarketDemand._fields),
                                list(records)),))

    def insert(self, conn: psycopg.Connection[Any], batch: InsertBatch) -> None:
        """One transaction: the batch COPYed into the CRM's tables (counted in `tally`)."""
        copy_batch(conn, batch)
        for table, _, rows in batch.tables:
            self.tally.add(table, inserted=len(rows))

    def changes(self, count: int) -> Iterator[Change]:
        """Up to `count` follow-up changes (fewer only when nothing is left to change)."""
        return self._planner.plan(count)

    def statements(self, change: Change) -> list[Statement]:
        """The statements of one change's transaction (counted in `tally`)."""
        return _statements(change, self.tally)

    def apply(self, conn: psycopg.Connection[Any], change: Change) -> None:
        """One change in its own transaction."""
        with conn.transaction():
            for query, params in self.statements(change):
                conn.execute(query, params)

    def apply_pipelined(self, conn: psycopg.Connection[Any], changes: Iterable[Change],
                        total: int) -> None:
        """Each change in its own transaction, many transactions per round trip: as fast as
        one session commits. `total` is for progress logs only; `tally.changes` counts."""
        _apply_pipelined(conn, changes, self.tally, total)


def schema_sql() -> str:
    return resources.files("service.demo").joinpath("crm_schema.sql").read_text("utf-8")


def ensure_crm_schema(conn: psycopg.Connection[Any]) -> bool:
    """Create the demo CRM tables unless they all exist; True when the script ran.

    The script is idempotent, but it is not re-run needlessly: its ALTER TABLE statements
    take an exclusive lock on tables the producer may be reading.
    """
    row = conn.execute("SELECT count(to_regclass(t)) FROM unnest(%s::text[]) AS t",
                       ([f"crm.{t}" for t in CRM_TABLES],)).fetchone()
    if row is not None and row[0] == len(CRM_TABLES):
        return False
    with conn.transaction():
        conn.execute(schema_sql())
    return True


def load_demo(
    conn_or_dsn: str | psycopg.Connection[Any],
    customers: int,
    orders: int,
    rate: float | None,
    seed: int,
    changes: int | None,
    *,
    market_demand: int | None = None,
) -> LoadReport:
    """Insert `customers` customers, `orders` orders (1-4 lines each) and some market-demand
    records (default: one per 50 customers and orders, at least 10), then apply `changes`
    follow-up changes (default: a third of customers + orders) at most `rate` per second
    (None: as fast as possible). Deterministic for a seed, given the same starting ids.

    `conn_or_dsn`: a DSN, or an idle connection (its autocommit setting is restored after).
    Rows already in the tables are left alone, explicitly keyed ones too (see
    `_reserve_ids`). Raises ConfigError for a bad argument, StackUnavailable when the CRM
    cannot be reached.
    """
    _check_arguments(customers, orders, rate, changes, market_demand)
    n_changes = (customers + orders) // 3 if changes is None else changes
    n_demand = market_demand if market_demand is not None else (
        max(10, (customers + orders) // 50) if customers + orders else 0)
    log = structlog.get_logger()
    log.info("demo_load_started", customers=customers, orders=orders,
             market_demand=n_demand, changes=n_changes, rate=rate, seed=seed)
    workload = DemoWorkload(seed)
    tally = workload.tally
    with _session(conn_or_dsn) as conn:
        started = time.monotonic()
        created = ensure_crm_schema(conn)
        for batch in workload.insert_batches(conn, customers, orders, n_demand):
            workload.insert(conn, batch)

        inserted_at = time.monotonic()
        log.info("demo_load_inserted", customers=customers, orders=orders,
                 order_lines=tally.counts["order_lines"][0], market_demand=n_demand,
                 seconds=round(inserted_at - started, 3))

        planned = _keyed_demand_inserts(conn, workload.changes(n_changes))
        if rate is None:
            _apply_pipelined(conn, planned, tally, n_changes)
        else:
            _apply_paced(conn, planned, tally, n_changes, rate)
        finished = time.monotonic()

    report = LoadReport(
        customers=tally.table("customers"),
        sales_orders=tally.table("sales_orders"),
        order_lines=tally.table("order_lines"),
        market_demand=tally.table("market_demand"),
        changes=tally.changes,
        schema_created=created,
        insert_seconds=round(inserted_at - started, 3),
        change_seconds=round(finished - inserted_at, 3),
    )
    log.info("demo_load_finished", changes=report.changes,
             insert_seconds=report.insert_seconds, change_seconds=report.change_seconds,
             **{f"{t}_{k}": v for t in CRM_TABLES
                for k, v in zip(("inserted", "updated", "deleted"), tally.counts[t],
                                strict=True)})
    return report


def _check_arguments(customers: int, orders: int, rate: float | None, changes: int | None,
                     market_demand: int | None) -> None:
    if customers < 0:
        raise ConfigError("--customers", "must be 0 or more")
    if orders < 0:
        raise ConfigError("--orders", "must be 0 or more")
    if orders and not customers:
        raise ConfigError("--orders", "orders need customers: give --customers 1 or more")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ConfigError("--rate", "must be a positive number of changes per second")
    if changes is not None and changes < 0:
        raise ConfigError("--changes", "must be 0 or more")
    if market_demand is not None and market_demand < 0:
        raise ConfigError("market_demand", "must be 0 or more")


@contextmanager
def _session(conn_or_dsn: str | psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection (every transaction below is explicit) with asynchronous
    commit: thousands of one-change transactions need not each wait for a WAL flush. Demo
    data only risks its last fraction of a second on a server crash, never consistency.
    A caller's connection gets its settings back afterwards."""
    if isinstance(conn_or_dsn, str):
        try:
            conn: psycopg.Connection[Any] = psycopg.connect(conn_or_dsn, autocommit=True,
                                                            connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise StackUnavailable(f"CRM database unreachable ({type(exc).__name__}); "
                                   "is the stack up? (make up)") from exc
        with conn:
            conn.execute("SET synchronous_commit TO off")
            yield conn
        return
    conn = conn_or_dsn
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("load_demo needs an idle connection (commit or roll back first)")
    saved = conn.autocommit
    conn.autocommit = True
    row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
    conn.execute("SET synchronous_commit TO off")
    try:
        yield conn
    finally:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            if row is not None:
                conn.execute("SELECT set_config('synchronous_commit', %s, false)", (row[0],))
            conn.autocommit = saved


def _reserve_ids(conn: psycopg.Connection[Any], table: str, column: str, n: int) -> list[int]:
    """n fresh values of the table's identity sequence (not necessarily contiguous, in
    increasing order), skipping values a row already holds: an identity ``BY DEFAULT``
    accepts explicit keys (rows imported with their own ids), which the sequence does not
    know about. The sequence is only advanced by ``nextval``, as the CRM's own inserts do,
    never set: its owner decides whether it should jump past the explicit keys (the skipped
    ones are logged, counted: the CRM's own inserts without a key would meet them too).
    One round trip per pass; a pass draws as many values as are still needed."""
    ids: list[int] = []
    skipped = 0
    # Only values at or below the table's largest key are looked up (one index probe
    # each): on a table whose keys all came from the sequence, none is.
    query = sql.SQL(
        "WITH drawn AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence(%s, %s)) AS id "
        "FROM generate_series(1, %s)), top AS (SELECT max({col}) AS id FROM {t}) "
        "SELECT drawn.id, drawn.id <= top.id AND EXISTS (SELECT 1 FROM {t} t "
        "WHERE t.{col} = drawn.id) FROM drawn, top ORDER BY drawn.id").format(
        t=sql.Identifier("crm", table), col=sql.Identifier(column))
    while len(ids) < n:
        rows = conn.execute(query, (f"crm.{table}", column, n - len(ids))).fetchall()
        ids += [r[0] for r in rows if not r[1]]
        skipped += sum(1 for r in rows if r[1])
    if skipped:
        structlog.get_logger().warning(
            "demo_load_ids_in_use", table=f"crm.{table}", skipped=skipped,
            hint=f"crm.{table} holds rows with explicit {column} values its identity "
                 "sequence had not handed out; the loader skipped them (the CRM's own inserts "
                 "without a key would fail on them: its owner may move the sequence past "
                 f"them, SELECT setval(pg_get_serial_sequence('crm.{table}', '{column}'), "
                 f"max({column})) FROM crm.{table})")
    return ids


def _identity_ahead(conn: psycopg.Connection[Any], table: str, column: str) -> bool:
    """Whether ``crm.table`` holds a key at or past the next value of its identity sequence
    (rows inserted with explicit keys): a row left to the identity default would then
    meet one as a UniqueViolation. Two round trips: the sequence's own row (last_value,
    is_called; the pg_sequences view shows NULL both before the first nextval and after
    setval(..., false)) and one index probe."""
    found = conn.execute("SELECT pg_get_serial_sequence(%s, %s)",
                         (f"crm.{table}", column)).fetchone()
    if found is None or found[0] is None:
        return False  # no identity: no default to collide
    row = conn.execute(sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM {} t WHERE t.{} >= s.next) FROM (SELECT CASE "
        "WHEN q.is_called THEN q.last_value + p.seqincrement ELSE q.last_value END AS next "
        "FROM {} q, pg_sequence p WHERE p.seqrelid = %s::regclass) AS s").format(
        sql.Identifier("crm", table), sql.Identifier(column), sql.SQL(found[0])),
        (found[0],)).fetchone()
    return bool(row and row[0])


def _keyed_demand_inserts(conn: psycopg.Connection[Any],
                          planned: Iterable[Change]) -> Iterable[Change]:
    """The planned changes, with keys reserved (``_reserve_ids``) for their market-demand
    inserts when crm.market_demand holds keys ahead of its sequence; else `planned` as it
    is, still lazy (the usual case: those inserts take the identity default, as the CRM's
    own do). Per load: the plan is then listed once to count its inserts; nothing is added
    per change."""
    if not _identity_ahead(conn, "market_demand", "demand_id"):
        return planned
    changes = list(planned)
    ids = iter(_reserve_ids(conn, "market_demand", "demand_id", sum(
        1 for c in changes if isinstance(c, MarketDemandInsert))))
    return [MarketDemandInsert(c.row, next(ids)) if isinstance(c, MarketDemandInsert) else c
            for c in changes]


def _copy(conn: psycopg.Connection[Any], table: str, columns: Sequence[str],
          rows: Iterable[Sequence[object]], schema: str = "crm") -> None:
    stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, columns)))
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for row in rows:
            copy.write_row(row)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


# --- follow-up changes -------------------------------------------------------------------

_SET_STATUS = ("UPDATE crm.sales_orders SET status = %s, updated_at = now() "
               "WHERE order_id = %s")
_SET_QUANTITY = "UPDATE crm.order_lines SET quantity = %s WHERE order_id = %s AND line_no = %s"
_TOUCH_ORDER = "UPDATE crm.sales_orders SET updated_at = now() WHERE order_id = %s"
_DELETE_ORDER = "DELETE FROM crm.sales_orders WHERE order_id = %s"  # lines: ON DELETE CASCADE
_DELETE_CUSTOMER = "DELETE FROM crm.customers WHERE customer_id = %s"  # orders too
_INSERT_DEMAND = ("INSERT INTO crm.market_demand (kind, product_category, content, observed_at) "
                  "VALUES (%s, %s, %s, %s)")
_INSERT_KEYED_DEMAND = ("INSERT INTO crm.market_demand (demand_id, kind, product_category, "
                        "content, observed_at) VALUES (%s, %s, %s, %s, %s)")
_customer_updates: dict[tuple[str, ...], sql.Composed] = {}


def _customer_update_query(columns: tuple[str, ...]) -> sql.Composed:
    query = _customer_updates.get(columns)
    if query is None:
        unknown = set(columns) - UPDATABLE_CUSTOMER_COLUMNS
        if unknown or not columns:
            raise ValueError(f"not an updatable customer column set: {sorted(columns)}")
        query = sql.SQL("UPDATE crm.customers SET {}, updated_at = now() "
                        "WHERE customer_id = %s").format(
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns))
        _customer_updates[columns] = query
    return query


def _statements(change: Change, tally: _Tally) -> list[Statement]:
    """The statements of one change's transaction; counts what they will write."""
    if isinstance(change, CustomerUpdate):
        tally.add("customers", updated=1)
        columns = tuple(c for c, _ in change.values)
        return [(_customer_update_query(columns),
                 (*(v for _, v in change.values), change.customer_id))]
    if isinstance(change, OrderStatusChange):
        tally.add("sales_orders", updated=1)
        return [(_SET_STATUS, (change.status, change.order_id))]
    if isinstance(change, LineQuantityChange):
        tally.add("order_lines", updated=1)
        stmts: list[Statement] = [(_SET_QUANTITY, (change.quantity, change.order_id,
                                                   change.line_no))]
        if change.touch_order:
            tally.add("sales_orders", updated=1)
            stmts.append((_TOUCH_ORDER, (change.order_id,)))
        return stmts
    if isinstance(change, OrderDelete):
        tally.add("sales_orders", deleted=1)
        tally.add("order_lines", deleted=change.lines)
        return [(_DELETE_ORDER, (change.order_id,))]
    if isinstance(change, CustomerDelete):
        tally.add("customers", deleted=1)
        tally.add("sales_orders", deleted=change.orders)
        tally.add("order_lines", deleted=change.lines)
        return [(_DELETE_CUSTOMER, (change.customer_id,))]
    if isinstance(change, MarketDemandInsert):
        tally.add("market_demand", inserted=1)
        if change.demand_id is not None:
            return [(_INSERT_KEYED_DEMAND, (change.demand_id, *change.row))]
        return [(_INSERT_DEMAND, tuple(change.row))]
    raise TypeError(f"unknown change {type(change).__name__}")


def _apply_pipelined(conn: psycopg.Connection[Any], planned: Iterable[Change], tally: _Tally,
                     total: int) -> None:
    """Each change in its own explicit transaction (BEGIN, its statements, COMMIT), many
    transactions per round trip: a Sync every PIPELINE_SYNC_EVERY changes, whose results
    are read while the next group is sent, so the server never waits for the client.

    `conn` must be idle in autocommit mode (ValueError otherwise). Raises the first failing
    statement's psycopg error once what was sent is drained: the groups before it are
    committed; in its group, the changes before the failing one are committed and the rest
    were skipped (after an error the server skips everything up to the next Sync); the one
    group already sent after it fails whole (its BEGIN meets the aborted transaction), and
    nothing more is sent. `tally.changes` counts the changes of the groups that succeeded.

    Written on psycopg's libpq layer (``psycopg.pq``), not ``Connection.pipeline()``:
    there every change took three cursor ``execute`` calls, about 55 us of Python per
    one-change transaction, more than the CRM's backend spent running it (38 us). On the
    comparison bench's two shared cores that was an eighth of the burst's CPU. Here each
    statement is prepared once and a change costs ~7 us of Python (the backend ~28 us:
    its statements are all prepared, BEGIN and COMMIT too). Measured 2026-11-29 on 20,000
    changes of the demo mix."""
    if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("pipelined changes need an idle autocommit connection")
    with _PreparedPipeline(conn) as pipe:
        log = structlog.get_logger()
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        sent = 0
        begin, commit = pipe.prepared("BEGIN"), pipe.prepared("COMMIT")
        for change in planned:
            pipe.send(begin, ())
            for query, params in _statements(change, tally):
                pipe.send(pipe.prepared(query), params)
            pipe.send(commit, ())
            sent += 1
            if sent % PIPELINE_SYNC_EVERY == 0:
                pipe.sync(PIPELINE_SYNC_EVERY)
                pipe.drain(keep=1)  # raises here if a transaction of an earlier group failed
                tally.changes = pipe.committed
                if time.monotonic() >= next_progress:
                    log.info("demo_load_progress", changes_done=tally.changes,
                             changes_planned=total)
                    next_progress = time.monotonic() + PROGRESS_EVERY_S
        pipe.sync(sent % PIPELINE_SYNC_EVERY)
        try:
            pipe.drain(keep=0)
        finally:
            tally.changes = pipe.committed


class _PreparedPipeline:
    """A connection in libpq pipeline mode sending prepared statements (see
    `_apply_pipelined` for why). Statement names are unique to this instance and
    deallocated on exit; on an error, what was sent is drained and an aborted transaction
    rolled back before the connection is handed back, idle."""

    _instances = 0

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        _PreparedPipeline._instances += 1
        self._prefix = f"_demo_load_{_PreparedPipeline._instances}_"
        self._conn = conn
        self._pg = conn.pgconn
        self._dumper = Transformer(conn)
        self._names: dict[int, tuple[bytes, Query]] = {}  # id(query) -> (name, query)
        self._groups: deque[int] = deque()  # per Sync sent and not read yet: its changes
        self.committed = 0  # changes of the groups read without an error
        self._unsynced = False  # statements sent since the last Sync
        self._error: psycopg.Error | None = None

    def __enter__(self) -> _PreparedPipeline:
        self._pg.enter_pipeline_mode()
        return self

    def prepared(self, query: Query) -> bytes:
        """The name of `query` prepared on the server (sent now the first time); its %s
        placeholders become $1, $2, ..."""
        known = self._names.get(id(query))  # Composed is unhashable; the id is kept alive
        if known is None:
            text = query if isinstance(query, str) else query.as_string(self._conn)
            known = (f"{self._prefix}{len(self._names)}".encode(), query)
            self._names[id(query)] = known
            self._pg.send_prepare(known[0], _numbered(text).encode())
        return known[0]

    def send(self, name: bytes, params: Sequence[object]) -> None:
        values = self._dumper.dump_sequence(params, [PyFormat.TEXT] * len(params))
        self._pg.send_query_prepared(name, values or None)
        self._unsynced = True

    def sync(self, changes: int) -> None:
        """End a group of `changes` transactions."""
        self._pg.pipeline_sync()
        self._groups.append(changes)
        self._unsynced = False

    def drain(self, keep: int) -> None:
        """Read results until at most `keep` Syncs are outstanding; raises the first
        error seen (psycopg's class for its SQLSTATE)."""
        self._read(keep)
        if self._error is not None:
            raise self._error

    def _read(self, keep: int) -> None:
        while len(self._groups) > keep:
            result = self._pg.get_result()
            if result is None:
                continue  # the end of one statement's results
            if result.status == ExecStatus.PIPELINE_SYNC:
                changes = self._groups.popleft()
                if self._error is None:
                    self.committed += changes
            elif result.status == ExecStatus.FATAL_ERROR and self._error is None:
                self._error = psycopg.errors.error_from_result(
                    result, encoding=self._conn.info.encoding)

    def __exit__(self, *exc: object) -> None:
        if self._conn.broken:
            return
        if self._unsynced:  # left by an exception: the server must reach a Sync first
            self.sync(0)
        self._read(keep=0)
        self._pg.exit_pipeline_mode()
        if self._conn.info.transaction_status != TransactionStatus.IDLE:
            self._conn.execute("ROLLBACK")  # a failed, or never committed, change
        for name, _ in self._names.values():
            # a statement first prepared after a failure in its group never was (the server
            # skipped its Parse): nothing to release, and the failure is what is raised
            with suppress(psycopg.errors.InvalidSqlStatementName):
                self._conn.execute(sql.SQL("DEALLOCATE {}").format(
                    sql.Identifier(name.decode())))


def _numbered(query: str) -> str:
    """psycopg's %s placeholders as PostgreSQL's $1, $2, ... (the demo's own queries: no
    literal % in them)."""
    parts = query.split("%s")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


def _apply_paced(conn: psycopg.Connection[Any], planned: Iterable[Change], tally: _Tally,
                 total: int, rate: float) -> None:
    """At most `rate` changes per second: change i is due at start + i / rate. Falling
    behind (a slow database) is caught up without sleeping, never carried forward."""
    log = structlog.get_logger()
    start = time.monotonic()
    next_progress = start + PROGRESS_EVERY_S
    for i, change in enumerate(planned):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with conn.transaction():
            for query, params in _statements(change, tally):
                conn.execute(query, params)
        tally.changes = i + 1
        now = time.monotonic()
        if now >= next_progress:
            log.info("demo_load_progress", changes_done=i + 1, changes_planned=total)
            next_progress = now + PROGRESS_EVERY_S
