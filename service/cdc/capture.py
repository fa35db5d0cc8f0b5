"""What the producer captures, and the objects it owns in the CRM database.

The producer owns a schema ``crm_erp_sync`` in the CRM database with two tables:
``watermarks`` (written around each snapshot chunk; it is in the publication, so its rows come
back through the log and mark where a chunk's window opens and closes, as in DBLog) and
``snapshots`` (requested, running and finished snapshots, so a snapshot resumes after a crash).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from service.settings import Settings

OWN_SCHEMA = "crm_erp_sync"
WATERMARK_TABLE = f"{OWN_SCHEMA}.watermarks"


@dataclass(frozen=True)
class CapturedTable:
    name: str  # schema-qualified
    kind: str  # event kind: the schema directory in schemas/
    key: tuple[str, ...]  # primary key columns
    snapshottable: bool = True  # order lines are snapshotted with their order


CAPTURED = {
    t.name: t
    for t in (
        CapturedTable("crm.customers", "customer", ("customer_id",)),
        CapturedTable("crm.sales_orders", "order", ("order_id",)),
        CapturedTable("crm.order_lines", "order", ("order_id", "line_no"), snapshottable=False),
        CapturedTable("crm.market_demand", "market_demand", ("demand_id",)),
    )
}
SNAPSHOT_TABLES = [t.name for t in CAPTURED.values() if t.snapshottable]

OWN_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {OWN_SCHEMA};
CREATE TABLE IF NOT EXISTS {WATERMARK_TABLE} (
    watermark_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_id  bigint NOT NULL,
    chunk_no     integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('low', 'high')),
    written_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {OWN_SCHEMA}.snapshots (
    snapshot_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name   text NOT NULL,
    keys         bigint[],
    reason       text NOT NULL DEFAULT 'ad-hoc',
    chunk_size   integer NOT NULL DEFAULT 1000,
    last_key     bigint,
    chunks_done  integer NOT NULL DEFAULT 0,
    rows_emitted bigint NOT NULL DEFAULT 0,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
"""


def ensure_capture_objects(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Own schema, publication (idempotent). The slot is created by the producer itself."""
    with conn.transaction():
        conn.execute(OWN_DDL)
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (settings.publication_name,)
        ).fetchone()
        if not exists:
            tables = [*CAPTURED, WATERMARK_TABLE]
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(settings.publication_name),
                    sql.SQL(", ").join(sql.Identifier(*t.split(".")) for t in tables),
                )
            )


def request_snapshot(
    conn: psycopg.Connection[Any],
    table: str,
    keys: list[int] | None = None,
    chunk_size: int = 1000,
    reason: str = "ad-hoc",
) -> int:
    if table not in SNAPSHOT_TABLES:
        raise ValueError(f"cannot snapshot {table!r}: choose one of {', '.join(SNAPSHOT_TABLES)}")
    row = conn.execute(
        f"INSERT INTO {OWN_SCHEMA}.snapshots (table_name, keys, chunk_size, reason) "
        "VALUES (%s, %s, %s, %s) RETURNING snapshot_id",
        (table, keys, chunk_size, reason),
    ).fetchone()
    assert row is not None
    return int(row[0])
