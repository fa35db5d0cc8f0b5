"""The source contract: what a captured CRM table must look like for its events to be right.

Checked at start-up against the catalog and on every pgoutput Relation message (PostgreSQL
sends one before the first change of a table in a session and again after any DDL on it), so
a DDL that breaks the contract is seen before the first change written under it is published.

A table keeps the contract when

- it exists (and is visible to the capture role);
- it has every column the profile's events need (keys, references, mapped fields, the delete
  flag) — a column the profile does not map may come and go freely;
- each of those columns has a type the canonical field can carry (see :func:`accepts`);
- its replica identity is FULL (an UPDATE/DELETE then carries the whole old row);
- it is in the producer's publication, with the profile's row filter (the producer repairs
  that itself when it owns the publication, re-snapshotting the table; otherwise it stops
  capture the same way, naming `crm-erp-sync setup` as the owner: see
  ``service.cdc.producer.CdcProducer._sync_publication``).

The rule that divides a *contract problem* from a *per-row problem*: a problem with the
table's shape (the same for every row, visible in the Relation message or the catalog) stops
capture until the table is fixed; a problem with one row's values (NaN, a BC date, a row too
large, a reference that cannot be found) is a capture dead letter and capture goes on. A row
written while the table was broken but decoded after the DBA fixed it (PostgreSQL decodes it
with the table's shape *at that time*) is a per-row problem too: its values cannot be trusted
to the profile, so it is a capture dead letter whose redrive re-reads the row as it is now.

A retype that keeps the contract (``ALTER COLUMN ... TYPE ... USING``, another type modifier)
is no violation but still rewrote every row, which logical decoding never shows:
:func:`retyped` names such columns, and the producer re-snapshots the table.

Everything here but :func:`read_shapes` is pure. Messages name tables, columns and types,
never a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from service.cdc.profile import CANONICAL_FIELDS, DATE, TIMESTAMP, EntityMapping, SourceProfile

# Type OIDs whose text the decoder converts to dates/datetimes (service.cdc.events).
_DATE_TIME = frozenset({1082, 1114, 1184})  # date, timestamp, timestamptz
_BOOL = frozenset({16})
_INTEGER = frozenset({20, 21, 23})  # int8, int2, int4
_NUMBER = _INTEGER | {1700}  # numeric
_IDENTITY = {"d": "DEFAULT (the primary key only)", "n": "NOTHING", "i": "USING INDEX",
             "f": "FULL"}
TABLE = "*"  # the ``column`` of a problem with the table as a whole


@dataclass(frozen=True)
class Shape:
    """A captured table as a Relation message or the catalog describes it.

    ``columns`` maps each column name to its type OID; ``types`` (optional) to its SQL type
    as ``format_type`` spells it (for the fix SQL); ``attnums`` (optional, the catalog's) to
    its ``pg_attribute.attnum`` (to tell a rename from a drop); ``typmods`` (optional) to
    its ``atttypmod`` (-1: none; a Relation message carries it too: varchar(100) -> (200)
    keeps the OID); ``replica_identity`` is pg_class's ``relreplident`` letter (d, n, f, i).
    """

    table: str
    replica_identity: str
    columns: Mapping[str, int]
    types: Mapping[str, str] | None = None
    attnums: Mapping[str, int] | None = None
    typmods: Mapping[str, int] | None = None


@dataclass(frozen=True)
class Violation:
    """One way a table breaks the contract: table, column (``*`` for the table), the
    problem (no values) and the SQL (or the step) that fixes it."""

    table: str
    column: str
    problem: str
    fix: str

    @property
    def message(self) -> str:
        where = self.table if self.column == TABLE else f"{self.table}.{self.column}"
        return f"{where}: {self.problem}"


def accepts(ent: EntityMapping, column: str) -> tuple[frozenset[int] | None, str]:
    """The type OIDs ``column`` may have for ``ent``'s events (None: any type) and what the
    column is used for (for messages).

    Canonical date/timestamp fields need a date or timestamp column (the decoder converts
    them); text fields, keys and references take any type (they travel as the CRM's text; the
    consumer checks each value); the delete flag needs the type of the value it is compared
    with (a boolean flag that became text would never match again, silently).
    """
    allowed: frozenset[int] | None = None
    uses: list[str] = []
    for name, source in ent.fields.items():
        if source == column:
            uses.append(f"{ent.entity}.{name}")
            if CANONICAL_FIELDS[ent.entity].get(name) in (DATE, TIMESTAMP):
                allowed = _DATE_TIME
    flag = ent.deleted_when
    if flag is not None and flag.column == column:
        uses.append("the delete flag")
        if isinstance(flag.equals, bool):
            allowed = _BOOL
        elif isinstance(flag.equals, int):
            allowed = _INTEGER
        elif isinstance(flag.equals, float):
            allowed = _NUMBER
    if column in ent.key:
        uses.append("the key")
    if column in (ent.customer_column, ent.order_column):
        uses.append("a reference key")
    return allowed, ", ".join(uses) or "a reference"


def check(ent: EntityMapping, shape: Shape | None, *,
          known: Shape | None = None) -> list[Violation]:
    """Every way ``shape`` (None: the table does not exist) breaks ``ent``'s contract, in a
    stable order (table, then columns in the profile's order); [] when it keeps it.

    ``known`` is the table's last good shape (from start-up), if any: it lets the fix name a
    rename back (a new column holding the gone column's attnum) and the type to restore.
    """
    table = ent.table
    quoted = _quoted(table)
    if shape is None:
        return [Violation(table, TABLE, "table does not exist (or is not visible to the "
                          "capture role)", f"-- restore {table}, or remove [{ent.entity}] "
                          "from the source profile and restart the producer")]
    out: list[Violation] = []
    missing = [c for c in ent.columns if c not in shape.columns]
    for column in missing:
        out.append(Violation(table, column, "column is mapped by the source profile but "
                             "missing (renamed or dropped)",
                             _missing_fix(ent, column, shape, known)))
    for column in ent.columns:
        if column in missing:
            continue
        allowed, uses = accepts(ent, column)
        oid = shape.columns[column]
        if allowed is not None and oid not in allowed:
            had = _type_of(known, column)
            fix = (f"ALTER TABLE {quoted} ALTER COLUMN {_q(column)} TYPE {had} USING "
                   f"{_q(column)}::{had};" if had is not None else
                   f"-- give {table}.{column} a type {uses} can take, or map another column")
            out.append(Violation(table, column, f"type {_type_of(shape, column) or type_name(oid)} "
                                 f"cannot feed {uses}", fix))
    if shape.replica_identity != "f":
        out.append(Violation(
            table, TABLE, f"replica identity is "
            f"{_IDENTITY.get(shape.replica_identity, shape.replica_identity)}, not FULL: an "
            "UPDATE or DELETE would not carry the whole old row",
            f"ALTER TABLE {quoted} REPLICA IDENTITY FULL;"))
    return out


def _missing_fix(ent: EntityMapping, column: str, shape: Shape, known: Shape | None) -> str:
    quoted = _quoted(ent.table)
    renamed = _renamed_to(column, shape, known)
    if renamed is not None:
        return f"ALTER TABLE {quoted} RENAME COLUMN {_q(renamed)} TO {_q(column)};"
    had = _type_of(known, column)
    add = f"ALTER TABLE {quoted} ADD COLUMN {_q(column)} {had}; -- and restore its data" \
        if had is not None else f"-- restore column {column} of {ent.table}"
    return (f"{add} (or map the column's new name in the source profile and restart the "
            "producer)")


def _renamed_to(column: str, shape: Shape, known: Shape | None) -> str | None:
    """The name ``column`` was renamed to, or None when it was dropped (or we cannot tell).

    A rename keeps the column's ``attnum``; ``ADD COLUMN`` always takes a new one (attnums
    are never reused). Guessing from names and types instead would tell the operator to
    rename an unrelated column that was added meanwhile (dropped ``email``, added
    ``loyalty``: "RENAME loyalty TO email" would feed loyalty's data to the ERP as e-mails).
    Shapes without attnums (a Relation message's) give None."""
    if known is None or known.attnums is None or shape.attnums is None:
        return None
    attnum = known.attnums.get(column)
    for name, number in shape.attnums.items():
        if number == attnum and name != column:
            return name
    return None


def retyped(ent: EntityMapping, known: Shape | None, shape: Shape) -> list[str]:
    """The columns ``ent`` reads (in the profile's order) whose type differs between
    ``known`` (the last shape the producer captured under) and ``shape``: another type OID,
    or another type modifier when both shapes carry them. [] without ``known``.

    Such a change that keeps the contract still rewrote the table (``ALTER COLUMN ... TYPE
    ... USING``, or a cast that rounds): logical decoding emits no row change for a rewrite,
    so the rows' new values reach the ERP only by a snapshot of the table."""
    if known is None:
        return []
    out: list[str] = []
    for column in ent.columns:
        if column not in known.columns or column not in shape.columns:
            continue
        typmod_changed = (known.typmods is not None and shape.typmods is not None
                          and known.typmods.get(column) != shape.typmods.get(column))
        if known.columns[column] != shape.columns[column] or typmod_changed:
            out.append(column)
    return out


def mapped_types(ent: EntityMapping, shape: Shape) -> dict[str, str]:
    """The SQL type (``format_type``) of each column ``ent`` reads that ``shape`` has and
    names a type for: what the producer records to see a retype made while it was down."""
    types = shape.types or {}
    return {c: types[c] for c in ent.columns if c in types}


def changed_types(stored: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """Columns of ``now`` (in its order) whose recorded type in ``stored`` differs; a column
    not recorded before (newly mapped) is not a change."""
    return [c for c, t in now.items() if c in stored and stored[c] != t]


def type_name(oid: int) -> str:
    """A type OID as SQL spells the type (``text``, ``timestamp with time zone``), for a
    shape from a Relation message, which carries OIDs only: psycopg's registry of
    PostgreSQL's built-in types (their OIDs are fixed). Any other type (an extension's, a
    domain, an enum) is its OID as text: naming it would need a catalog query."""
    info = psycopg.postgres.types.get(oid)
    return info.regtype if info is not None else str(oid)


def _type_of(shape: Shape | None, column: str) -> str | None:
    if shape is None or shape.types is None:
        return None
    return shape.types.get(column)


def _q(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _quoted(table: str) -> str:
    return sql.Identifier(*table.split(".", 1)).as_string(None)


def check_profile(profile: SourceProfile, shapes: Mapping[str, Shape | None], *,
                  known: Mapping[str, Shape] | None = None) -> list[Violation]:
    """:func:`check` for every captured table of ``profile`` (``shapes`` by table)."""
    out: list[Violation] = []
    for ent in profile.entities.values():
        out.extend(check(ent, shapes.get(ent.table),
                         known=None if known is None else known.get(ent.table)))
    return out


def read_shapes(conn: psycopg.Connection[Any], tables: list[str]) -> dict[str, Shape | None]:
    """The catalog's shape of each table (None for a table that does not exist): one query.

    Raises psycopg.Error when the query fails (a lost session, say)."""
    rows = conn.execute(
        "SELECT t.name, c.relreplident, a.attname, a.atttypid::int,"
        "       format_type(a.atttypid, a.atttypmod), a.attnum::int, a.atttypmod"
        "  FROM unnest(%s::text[]) AS t(name)"
        "  LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)"
        "  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
        "   AND NOT a.attisdropped"
        " ORDER BY t.name, a.attnum", (tables,)).fetchall()
    found: dict[str, tuple[str, dict[str, int], dict[str, str], dict[str, int],
                           dict[str, int]]] = {}
    for name, identity, column, oid, type_sql, attnum, typmod in rows:
        if identity is None:
            continue
        entry = found.setdefault(name, (str(identity), {}, {}, {}, {}))
        if column is not None:
            entry[1][column] = int(oid)
            entry[2][column] = str(type_sql)
            entry[3][column] = int(attnum)
            entry[4][column] = int(typmod)
    return {t: Shape(t, *found[t]) if t in found else None for t in tables}
