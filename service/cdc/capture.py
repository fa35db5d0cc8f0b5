"""What the producer captures (compiled from the source profile), and the objects it owns.

The producer owns a schema ``crm_erp_sync`` in the CRM database with two tables:
``watermarks`` (written around each snapshot chunk; it is in the publication, so its rows come
back through the log and mark where a chunk's window opens and closes, as in DBLog) and
``snapshots`` (requested, running and finished snapshots, so a snapshot resumes after a crash;
keys are kept as text, whatever their type in the CRM).

Everything about the CRM's own tables comes from the source profile: the publication's
tables and row filters, the columns each snapshot reads (as text, converted exactly as
pgoutput's text is, so a snapshot read and a streamed change of the same row give the same
event), and the source contract checked before anything is published.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from functools import cached_property
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service.cdc import contract
from service.cdc.events import converter_for
from service.cdc.profile import EntityMapping, SourceProfile, key_values
from service.errors import (
    CaptureRejected,
    PublicationNotRepaired,
    SourceContractError,
    UnrepresentableValue,
)
from service.pg import privilege_missing, privileges_needed
from service.settings import Settings

OWN_SCHEMA = "crm_erp_sync"
WATERMARK_TABLE = f"{OWN_SCHEMA}.watermarks"

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
    keys         text[],
    reason       text NOT NULL DEFAULT 'ad-hoc',
    chunk_size   integer NOT NULL DEFAULT 1000,
    last_key     text,
    chunks_done  integer NOT NULL DEFAULT 0,
    rows_emitted bigint NOT NULL DEFAULT 0,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
-- Before keys were text (up to 0.2): integer keys keep their meaning as text.
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns WHERE table_schema = '{OWN_SCHEMA}'
        AND table_name = 'snapshots' AND column_name = 'last_key') <> 'text' THEN
        ALTER TABLE {OWN_SCHEMA}.snapshots ALTER COLUMN keys TYPE text[] USING keys::text[],
            ALTER COLUMN last_key TYPE text USING last_key::text;
    END IF;
END $$;
-- `crm-erp-sync snapshot cancel ID` (issue #14): a cancelled request is no longer read.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'snapshots_state_check'
                   AND conrelid = '{OWN_SCHEMA}.snapshots'::regclass
                   AND pg_get_constraintdef(oid) LIKE '%cancelled%') THEN
        ALTER TABLE {OWN_SCHEMA}.snapshots DROP CONSTRAINT IF EXISTS snapshots_state_check;
        ALTER TABLE {OWN_SCHEMA}.snapshots ADD CONSTRAINT snapshots_state_check
            CHECK (state IN ('pending', 'done', 'cancelled'));
    END IF;
END $$;
"""


# Source contract violations the producer stops on (service.cdc.contract), for `status`:
# one row per slot, table and column; ``resolved_at`` is set once the table is fixed (no
# DELETE: the capture role may only have SELECT, INSERT, UPDATE on the schema's tables).
CONTRACT_TABLE = f"{OWN_SCHEMA}.contract_violations"
CONTRACT_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {OWN_SCHEMA};
CREATE TABLE IF NOT EXISTS {CONTRACT_TABLE} (
    slot_name    text NOT NULL,
    table_name   text NOT NULL,
    column_name  text NOT NULL,
    problem      text NOT NULL,
    fix          text NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    PRIMARY KEY (slot_name, table_name, column_name)
);
"""
OWN_DDL += CONTRACT_DDL

# Capture dead letters the producer has on the dead-letter topic (acknowledged), by event id:
# a change read again after a crash (its letter acknowledged, the slot not yet confirmed past
# it) gets a marker pointing at the letter already there instead of a second copy of it.
# Written in the CRM database itself, so a restore of the CRM (LSNs reused) restores it too.
LETTERS_SENT_TABLE = f"{OWN_SCHEMA}.capture_letters_sent"
OWN_DDL += f"""
CREATE TABLE IF NOT EXISTS {LETTERS_SENT_TABLE} (
    dlq_topic     text NOT NULL,
    event_id      text NOT NULL,
    xid           bigint NOT NULL,
    dlq_partition integer NOT NULL,
    dlq_offset    bigint NOT NULL,
    sent_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, event_id)
);
"""

# Which table (by OID) the producer last captured under each captured table's name: a DROP
# TABLE and a CREATE TABLE of the same name is a new OID. The new table is re-added to the
# publication and re-snapshotted, but the rows dropped with the old one produced no delete
# events (a TRUNCATE in effect, without its event): they stay live in the ERP until
# `crm-erp-sync reconcile --repair`. ``recreated_at`` is when the producer first saw the new
# table; `status` names it until a reconcile of its entity found no extra ERP row after it.
# Renames and revoked grants keep the OID: not a re-creation. ``column_types`` (mapped column
# -> format_type) is what the producer last captured under: a type changed since (a rewrite,
# invisible to logical decoding) re-snapshots the table (note_column_types).
# A table the producer (or setup) put back into the publication, or whose row filter it
# narrowed, has the same gap without a new OID: the deletes made while it was out were never
# decoded. ``note_publication_gap`` records it in the same columns, ``previous_oid`` equal to
# ``table_oid`` telling the two causes apart (no second mechanism, no new column), so that
# `status` names it, and a reconcile clears it, exactly as a re-created table.
CAPTURED_TABLES = f"{OWN_SCHEMA}.captured_tables"
OWN_DDL += f"""
CREATE TABLE IF NOT EXISTS {CAPTURED_TABLES} (
    slot_name    text NOT NULL,
    table_name   text NOT NULL,
    table_oid    oid NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    previous_oid oid,
    recreated_at timestamptz,
    column_types jsonb,
    PRIMARY KEY (slot_name, table_name)
);
-- A table created before column_types was kept: added once, by its owner (setup). Looked
-- up in pg_attribute: information_schema.columns shows only the columns the current role
-- has a privilege on, so a restricted producer saw none and tried the ALTER itself.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{CAPTURED_TABLES}'::regclass
                   AND attname = 'column_types' AND NOT attisdropped) THEN
        ALTER TABLE {CAPTURED_TABLES} ADD COLUMN column_types jsonb;
    END IF;
END $$;
"""


def note_table_identities(conn: psycopg.Connection[Any], slot: str,
                          tables: Sequence[str]) -> list[str]:
    """Record the OID of each of ``tables`` (``schema.table``; one that does not exist now
    is left as it was) for ``slot`` in ``crm_erp_sync.captured_tables``; returns the tables
    whose OID changed since last recorded (dropped and re-created), in ``tables``' order.
    A table seen for the first time is recorded, not returned. One statement; raises
    ``psycopg.Error`` (InsufficientPrivilege without INSERT/UPDATE on the table)."""
    with conn.transaction():
        rows = conn.execute(
            f"INSERT INTO {CAPTURED_TABLES} AS c (slot_name, table_name, table_oid) "
            "SELECT %s, t, to_regclass(t)::oid FROM unnest(%s::text[]) AS t "
            "WHERE to_regclass(t) IS NOT NULL "
            "ON CONFLICT (slot_name, table_name) DO UPDATE SET previous_oid = c.table_oid, "
            "table_oid = excluded.table_oid, recreated_at = now(), seen_at = now() "
            "WHERE c.table_oid <> excluded.table_oid "
            "RETURNING table_name, recreated_at IS NOT NULL", (slot, list(tables))).fetchall()
    changed = {t for t, recreated in rows if recreated}
    return [t for t in tables if t in changed]


@dataclass(frozen=True)
class Retype:
    """A captured table whose mapped columns changed type since the producer recorded them
    (``columns``, in the profile's order), and the snapshot requested for it (None: the
    table feeds no snapshottable entity)."""

    table: str
    columns: list[str]
    snapshot_id: int | None


RETYPE_REASON = "column-type-changed"


def note_column_types(conn: psycopg.Connection[Any], slot: str, profile: SourceProfile,
                      shapes: Mapping[str, contract.Shape | None], *,
                      seen: Mapping[str, list[str]] | None = None,
                      record_only: bool = False) -> list[Retype]:
    """Record the SQL type of every mapped column of ``shapes``' captured tables (a table
    without a shape, or without a ``captured_tables`` row yet, is left as it was) for
    ``slot``, and request a snapshot of each table one of whose mapped columns has another
    type than recorded, in the same transaction (a crash keeps both or neither).

    Why: a type change that keeps the source contract (``ALTER COLUMN ... TYPE ... USING``,
    varchar(100) -> (200), numeric(16,4) -> (14,2)) rewrites the table, and logical decoding
    emits no row change for a rewrite: without the snapshot the ERP keeps the old values.
    The first record of a table (nothing recorded) requests nothing, unless ``seen`` (tables
    a Relation message showed retyped, and their columns) names it. Returns the retyped
    tables in the profile's order. Raises ``psycopg.Error`` (InsufficientPrivilege without
    SELECT/UPDATE on ``captured_tables`` or INSERT on ``snapshots``).

    ``record_only``: record, request nothing, return [] (shapes that break the contract: a
    snapshot could not read them; recorded so that the fix, a second retype that may rewrite
    the values again, is compared with them and re-snapshots the table)."""
    out: list[Retype] = []
    with conn.transaction():
        stored: dict[str, dict[str, str] | None] = {t: types for t, types in conn.execute(
            f"SELECT table_name, column_types FROM {CAPTURED_TABLES} WHERE slot_name = %s "
            "AND table_name = ANY(%s) FOR UPDATE",
            (slot, [t for t in shapes])).fetchall()}
        for ent in profile.entities.values():
            shape = shapes.get(ent.table)
            if shape is None:
                continue
            now = contract.mapped_types(ent, shape)
            if ent.table in stored:
                before = stored[ent.table]
                if before == now:
                    continue
                changed = contract.changed_types(before or {}, now)
                conn.execute(f"UPDATE {CAPTURED_TABLES} SET column_types = %s WHERE "
                             "slot_name = %s AND table_name = %s", (Jsonb(now), slot, ent.table))
            else:
                # not recorded (note_table_identities refused): only what the stream saw
                changed = list((seen or {}).get(ent.table, []))
            if not changed or record_only:
                continue
            snapshot_id = None
            if ent.kind is not None:
                snapshot_id = request_snapshot(conn, profile, snapshot_name(ent),
                                               reason=RETYPE_REASON)
            out.append(Retype(ent.table, changed, snapshot_id))
    return out


def note_publication_gap(conn: psycopg.Connection[Any], slot: str, table: str) -> bool:
    """Record that ``table`` (``schema.table``) was brought back into the publication (or its
    row filter narrowed) now, for ``slot``: rows deleted while it was out left no delete
    events (see CAPTURED_TABLES). Marked as a re-creation with ``previous_oid = table_oid``;
    a table not recorded yet is recorded. In a savepoint of the caller's transaction (the
    repair's, so both commit or neither): returns False, nothing written, when the role may
    not write ``captured_tables`` or it does not exist yet (the caller logs it); a table
    that does not exist is not recorded (True: nothing to record)."""
    try:
        with conn.transaction():
            conn.execute(
                f"INSERT INTO {CAPTURED_TABLES} AS c (slot_name, table_name, table_oid, "
                "previous_oid, recreated_at) SELECT %s, %s, to_regclass(%s)::oid, "
                "to_regclass(%s)::oid, now() WHERE to_regclass(%s) IS NOT NULL "
                "ON CONFLICT (slot_name, table_name) DO UPDATE SET previous_oid = "
                "c.table_oid, recreated_at = now(), seen_at = now() "
                # another OID: re-created too, which note_table_identities records and logs
                "WHERE c.table_oid = excluded.table_oid", (slot, table, table, table, table))
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable):
        return False
    return True


RECREATED = "recreated"  # dropped and created again: a new OID under the name
UNPUBLISHED = "publication"  # out of the publication (or filtered narrower) for a while


def recreated_tables(conn: psycopg.Connection[Any], slot: str) -> list[dict[str, Any]]:
    """The captured tables ``slot``'s producer saw dropped and re-created, or brought back
    into the publication (``note_publication_gap``), newest event of each:
    ``[{"table": "crm.market_demand", "recreated_at": datetime, "cause": RECREATED |
    UNPUBLISHED}]``, oldest first. Raises ``psycopg.errors.UndefinedTable`` before a
    producer of this version declared the table."""
    return [{"table": t, "recreated_at": at, "cause": UNPUBLISHED if same else RECREATED}
            for t, at, same in conn.execute(
        f"SELECT table_name, recreated_at, previous_oid IS NOT DISTINCT FROM table_oid "
        f"FROM {CAPTURED_TABLES} WHERE slot_name = %s "
        "AND recreated_at IS NOT NULL ORDER BY recreated_at, table_name", (slot,)).fetchall()]


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_sql: str  # format_type(): numeric(14,2), uuid, timestamp without time zone


@dataclass(frozen=True)
class TableInfo:
    """A captured table as the CRM has it now, checked against what the profile needs."""

    entity: EntityMapping
    columns: dict[str, Column]
    # the zone a `timestamp without time zone` is read in (service.cdc.zone)
    naive_zone: tzinfo = UTC

    @cached_property
    def converters(self) -> dict[str, Callable[[str], Any]]:
        return {c.name: converter_for(c.type_oid, self.naive_zone)
                for c in self.columns.values()}

    def key_casts(self) -> list[str]:
        return [self.columns[k].type_sql for k in self.entity.key]


def _ident(table: str) -> sql.Composable:
    return sql.Identifier(*table.split("."))


def read_table_info(conn: psycopg.Connection[Any], profile: SourceProfile,
                    naive_zone: tzinfo = UTC) -> dict[str, TableInfo]:
    """Columns and types of every captured table; naive timestamps are read in
    ``naive_zone`` (``service.cdc.zone.crm_naive_zone``).

    Raises SourceContractError naming the table and column when a table or a column the
    profile maps is missing.
    """
    out: dict[str, TableInfo] = {}
    for ent in profile.entities.values():
        exists = conn.execute("SELECT to_regclass(%s)", (ent.table,)).fetchone()
        if exists is None or exists[0] is None:
            raise SourceContractError(ent.table, "*", "table does not exist (or is not visible "
                                      "to the capture role)")
        rows = conn.execute(
            "SELECT attname, atttypid::int, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (ent.table,)).fetchall()
        columns = {r[0]: Column(r[0], r[1], r[2]) for r in rows}
        for needed in ent.columns:
            if needed not in columns:
                raise SourceContractError(ent.table, needed,
                                          "column is mapped by the source profile but missing")
        out[ent.table] = TableInfo(ent, columns, naive_zone)
    return out


# Every TRUNCATE of a captured table the producer met, and what became of it
# (CRM_ERP_SYNC_ON_TRUNCATE): 'stopped' while capture waits before it, then 'propagated' or
# 'skipped' once handled. `status` reads it. Not in the publication: writing it emits no event.
TRUNCATES_TABLE = f"{OWN_SCHEMA}.truncates"
TRUNCATES_DDL = f"""
CREATE TABLE IF NOT EXISTS {TRUNCATES_TABLE} (
    commit_lsn  pg_lsn NOT NULL,
    table_name  text NOT NULL,
    xid         bigint NOT NULL,
    commit_time timestamptz NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('stopped', 'propagated', 'skipped')),
    setting     text NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (commit_lsn, table_name)
);
"""


_AS_ADMIN = ("`crm-erp-sync setup` as an administrator (PostgreSQL 15 lets only the "
             "tables' owner or a superuser add them to a publication); the producer and "
             "consumers then run as restricted roles")


def ensure_capture_objects(conn: psycopg.Connection[Any], settings: Settings,
                           profile: SourceProfile, *, repair: bool = True,
                           resnapshot: bool = False,
                           filters: dict[str, str | None] | None = None) -> list[Repair]:
    """Own schema and publication, idempotently; returns what it repaired in the publication.

    A captured table missing from an existing publication (dropped by hand) is added back
    with its row filter, and a table whose row filter differs from the profile's gets the
    profile's (see ``publication_drift``); with ``repair`` False the publication is only
    created when missing, never altered. With ``resnapshot`` a snapshot of each repaired
    table is requested in the same transaction (changes made while the table was out of the
    publication, or outside its old filter, were never decoded), so a crash cannot keep
    the repair without its snapshot. ``filters``: the profile's normalised filters, when the
    caller has them already (``normalised_filters``). The slot is created by the producer
    itself.

    Raises PrivilegeMissing (a ConfigError) naming the object and the grant, or who must run
    `setup`, when the DSN's role may not create or alter one of them (a repair of the
    publication: PublicationNotRepaired, a PrivilegeMissing carrying the drift).
    """
    pub = sql.Identifier(settings.publication_name)
    database = sql.Identifier(conn.info.dbname).as_string(None)
    with conn.transaction():
        with privileges_needed(
                conn, "CRM", f"create the producer's schema {OWN_SCHEMA} and its tables",
                f"GRANT CREATE ON DATABASE {database} TO {{role}}; GRANT USAGE, CREATE ON "
                f"SCHEMA {OWN_SCHEMA} TO {{role}}; or run {_AS_ADMIN} (`crm-erp-sync setup "
                "--check --role {role_name}` prints every grant the producer needs)"):
            conn.execute(OWN_DDL)
            conn.execute(TRUNCATES_DDL)
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (settings.publication_name,)
        ).fetchone()
        if not exists:
            members = [_member(e) for e in profile.entities.values()]
            with privileges_needed(
                    conn, "CRM", f"create publication {settings.publication_name}",
                    f"CREATE PUBLICATION needs the tables' owner or a superuser: run {_AS_ADMIN}"):
                conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    pub, sql.SQL(", ").join([*members, _ident(WATERMARK_TABLE)])))
            return []
        if not repair:
            return []
        drifts = publication_drift(conn, settings, profile, filters)
        if not drifts:
            return []
        return repair_publication(conn, settings, profile, drifts, resnapshot=resnapshot)


@dataclass(frozen=True)
class PublicationDrift:
    """How the publication differs from the source profile for one table: not in it at all
    (``missing``), or filtered with another row filter. ``have`` is the publication's filter
    and ``want`` the profile's, both as PostgreSQL prints them (``pg_get_expr``; None: no
    filter). SQL text from the profile and the catalog: never a row's value."""

    publication: str
    table: str
    missing: bool
    have: str | None
    want: str | None

    @property
    def problem(self) -> str:
        if self.missing:
            return (f"not in publication {self.publication}: its changes are not captured "
                    "(they are lost until the table is back and re-snapshotted)")
        return (f"publication {self.publication} filters it with {self.have or 'no filter'} "
                f"but the source profile's row_filter is {self.want or 'none'}: changes the "
                "two filters disagree on are captured wrongly or not at all")

    @property
    def sql_fix(self) -> str:
        """The statements that bring the table to the profile (run as the owner)."""
        table = _quoted_table(self.table)
        member = table + (f" WHERE {self.want}" if self.want else "")
        pub = sql.Identifier(self.publication).as_string(None)
        add = f"ALTER PUBLICATION {pub} ADD TABLE {member};"
        return add if self.missing else f"ALTER PUBLICATION {pub} DROP TABLE {table}; {add}"

    @property
    def fix(self) -> str:
        return (f"run `crm-erp-sync setup` as the publication's owner (it brings the "
                f"publication to the profile and requests a re-snapshot of {self.table}); "
                f"or, as the owner, {self.sql_fix} then `crm-erp-sync snapshot --table "
                f"{self.table}`")


@dataclass(frozen=True)
class Repair:
    """One table ``repair_publication`` brought to the profile, and the snapshot it requested
    for it (None: none requested, or the table is not snapshottable).

    ``left_filter``: for a changed row filter, how many CRM rows the old filter admitted and
    the new one excludes (0 for a re-added table, a removed filter, or none such; None: they
    could not be counted). The snapshot re-reads what the new filter admits, but nothing
    tells the ERP that these rows left: those applied before stay live there until
    `crm-erp-sync reconcile --repair` marks them deleted."""

    drift: PublicationDrift
    snapshot_id: int | None
    left_filter: int | None = 0
    # The gap recorded for `status` (note_publication_gap); False: not needed (a widened
    # filter, the watermark table) or refused (no grant on captured_tables).
    gap_noted: bool = False

    @property
    def leaves_rows(self) -> bool:
        """Rows may be live in the ERP that the CRM no longer has or the filter excludes:
        the table was out of the publication, or its filter narrowed (or not counted)."""
        return self.drift.missing or self.left_filter != 0


def rows_leaving_filter(conn: psycopg.Connection[Any], drift: PublicationDrift) -> int | None:
    """How many rows of ``drift.table`` its publication's old row filter (``drift.have``)
    admits and the profile's new one (``drift.want``) excludes, as PostgreSQL decides a row
    filter (a NULL result excludes the row); 0 when nothing can be narrower (a table re-added,
    a filter removed). None when they cannot be counted (no SELECT on the table, a filter
    that fails on a row): the caller then says the rows may exist. One scan of the table, in
    a savepoint (a failure leaves the caller's transaction usable). Why count rather than
    compare the two filters: whether one expression implies another is undecidable in
    general, and the rows tell exactly what a narrowing leaves behind."""
    if drift.missing or drift.want is None:
        return 0
    old = sql.SQL(drift.have) if drift.have is not None else sql.SQL("true")
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL(
                "SELECT count(*) FROM {} WHERE coalesce(({}), false) AND NOT coalesce(({}), "
                "false)").format(_ident(drift.table), old, sql.SQL(drift.want))).fetchone()
    except (psycopg.errors.SyntaxErrorOrAccessRuleViolation,
            psycopg.errors.DataException):  # a privilege, a filter that fails on a row
        return None
    return int(row[0]) if row is not None else None


def normalised_filters(conn: psycopg.Connection[Any],
                       profile: SourceProfile) -> dict[str, str | None]:
    """Each captured table's row filter from the profile, as PostgreSQL prints it
    (``pg_get_expr``; None: the table has no filter), by table.

    Why not compare strings: PostgreSQL keeps a publication's row filter parsed and prints it
    back normalised (``org_id = '…'`` becomes ``(org_id = '…'::uuid)``); imitating its
    deparser (casts, parentheses, ``IN`` as ``= ANY (ARRAY[…])``, quoting) would disagree at
    the edges and either miss a change or report one forever. So PostgreSQL parses the
    profile's filter itself, as a CHECK constraint of a temporary table with the captured
    table's columns (``LIKE``, so the same types decide the casts), and prints it with the
    same ``pg_get_expr`` as ``pg_publication_tables.rowfilter``: equal filters print
    equally. The temporary table lives in a transaction that is rolled back (nothing is
    left), and needs only TEMP on the database and SELECT on the table (a scratch
    publication would need the tables' owner).

    Raises SourceContractError naming the table when PostgreSQL cannot parse the filter
    against the table (a syntax error, an unknown column), PrivilegeMissing when the role
    may not create temporary tables.
    """
    out: dict[str, str | None] = {}
    for ent in profile.entities.values():
        if ent.row_filter is None:
            out[ent.table] = None
            continue
        with privileges_needed(
                conn, "CRM", "create a temporary table (to compare the profile's row filters "
                "with the publication's)", "GRANT TEMPORARY ON DATABASE "
                f"{sql.Identifier(conn.info.dbname).as_string(None)} TO {{role}}"):
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute(sql.SQL(
                        "CREATE TEMPORARY TABLE crm_erp_sync_filter_probe (LIKE {}, "
                        "CHECK ({}))").format(_ident(ent.table), sql.SQL(ent.row_filter)))
                    row = conn.execute(
                        "SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint WHERE "
                        "conrelid = 'pg_temp.crm_erp_sync_filter_probe'::regclass "
                        "AND contype = 'c'").fetchone()
            except psycopg.errors.InsufficientPrivilege:
                raise
            except psycopg.errors.UndefinedTable as exc:
                raise SourceContractError(ent.table, "*", "table does not exist (or is not "
                                          "visible to the capture role)") from exc
            except (psycopg.errors.SyntaxErrorOrAccessRuleViolation,
                    psycopg.errors.DataException) as exc:
                raise SourceContractError(
                    ent.table, "*", "the source profile's row_filter is not a valid filter "
                    f"of the table ({type(exc).__name__})") from exc
        assert row is not None
        out[ent.table] = str(row[0])
    return out


def publication_drift(conn: psycopg.Connection[Any], settings: Settings,
                      profile: SourceProfile,
                      filters: dict[str, str | None] | None = None) -> list[PublicationDrift]:
    """Every captured table (and the watermark table) the publication lacks or filters
    otherwise than the profile, in the profile's order; [] when it matches or does not exist
    yet. ``filters``: ``normalised_filters(conn, profile)``, computed when not given.
    Column lists are not compared (the producer never sets one)."""
    name = settings.publication_name
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                    (name,)).fetchone() is None:
        return []
    present: dict[str, str | None] = {f"{r[0]}.{r[1]}": r[2] for r in conn.execute(
        "SELECT schemaname, tablename, rowfilter FROM pg_publication_tables "
        "WHERE pubname = %s", (name,)).fetchall()}
    wants = filters if filters is not None else normalised_filters(conn, profile)
    out: list[PublicationDrift] = []
    for ent in profile.entities.values():
        want = wants.get(ent.table)
        if ent.table not in present:
            out.append(PublicationDrift(name, ent.table, True, None, want))
        elif present[ent.table] != want:
            out.append(PublicationDrift(name, ent.table, False, present[ent.table], want))
    if WATERMARK_TABLE not in present:
        out.append(PublicationDrift(name, WATERMARK_TABLE, True, None, None))
    elif present[WATERMARK_TABLE] is not None:
        out.append(PublicationDrift(name, WATERMARK_TABLE, False,
                                    present[WATERMARK_TABLE], None))
    return out


def repair_publication(conn: psycopg.Connection[Any], settings: Settings,
                       profile: SourceProfile, drifts: Sequence[PublicationDrift], *,
                       resnapshot: bool) -> list[Repair]:
    """Bring each drifted table of the publication to the profile, in one transaction:
    a missing table is added with the profile's filter; a table with another filter is
    dropped and added again with the profile's (one commit: a change is decoded under the
    old filter or the new one, never under none). With ``resnapshot`` a snapshot of each
    (snapshottable) table is requested in the same transaction.

    Raises PublicationNotRepaired (a PrivilegeMissing) when the role is not the
    publication's and the table's owner (nor a superuser): nothing is changed then.
    """
    pub = sql.Identifier(settings.publication_name)
    out: list[Repair] = []
    with conn.transaction():
        for drift in drifts:
            ent = profile.table(drift.table)
            member = _member(ent) if ent is not None else _ident(drift.table)
            left = rows_leaving_filter(conn, drift)  # before the filter changes
            try:
                if not drift.missing:
                    conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                        pub, _ident(drift.table)))
                conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, member))
            except psycopg.errors.InsufficientPrivilege as exc:
                missing = privilege_missing(
                    conn, "CRM", f"bring table {drift.table} of publication "
                    f"{settings.publication_name} to the source profile",
                    "ALTER PUBLICATION needs the publication's and the table's owner or a "
                    f"superuser: run {_AS_ADMIN}")
                raise PublicationNotRepaired(missing, list(drifts)) from exc
            snapshot_id = None
            if resnapshot and ent is not None and ent.kind is not None:
                snapshot_id = request_snapshot(
                    conn, profile, snapshot_name(ent),
                    reason="publication-repaired")
            repair = Repair(drift, snapshot_id, left)
            if ent is not None and repair.leaves_rows:
                repair = dataclasses.replace(repair, gap_noted=note_publication_gap(
                    conn, settings.slot_name, drift.table))
            out.append(repair)
    return out


def _quoted_table(table: str) -> str:
    return _ident(table).as_string(None)


def _member(ent: EntityMapping) -> sql.Composable:
    if ent.row_filter is None:
        return _ident(ent.table)
    # The row filter is the operator's SQL from the profile file (trusted configuration).
    return sql.SQL("{} WHERE ({})").format(_ident(ent.table), sql.SQL(ent.row_filter))


def snapshot_name(ent: EntityMapping) -> str:
    """The entity whose snapshot re-reads ``ent``'s table: its own, or for order lines their
    order's (lines are read with their order, never alone)."""
    return "order" if ent.entity == "order_line" else ent.entity


def snapshot_entity(profile: SourceProfile, name_or_table: str) -> EntityMapping:
    """The snapshottable entity named by entity name or table (lines go with their order).

    Raises ValueError listing what can be snapshotted.
    """
    choices = [e for e in profile.snapshot_entities if e.kind is not None]
    for ent in choices:
        if name_or_table in (ent.entity, ent.table):
            return ent
    names = ", ".join(f"{e.entity} ({e.table})" for e in choices)
    raise ValueError(f"cannot snapshot {name_or_table!r}: choose one of {names}")


def snapshot_entity_named(profile: SourceProfile, name: str) -> EntityMapping:
    """The snapshottable entity an operator named (`snapshot --table`): an entity, its
    table (``crm.customers``), or a table without its schema (``customers``: the demo
    profile's tables were once named so). Raises ValueError quoting ``name`` as given (never
    a guessed ``crm.`` prefix on a schema-qualified name) and, for order lines, saying that
    they are re-read with their order (``--table order --key ORDER``)."""
    try:
        return snapshot_entity(profile, name)
    except ValueError as exc:
        error = exc
    if "." not in name:
        try:
            return snapshot_entity(profile, f"crm.{name}")
        except ValueError:
            pass
    lines = next((e for e in profile.entities.values() if e.entity == "order_line"
                  and name in (e.entity, e.table, e.table.split(".", 1)[-1])), None)
    if lines is not None:
        raise ValueError(f"cannot snapshot {name!r} alone: order lines are re-read with their "
                         "order: `--table order --key ORDER_ID` (the order's key)") from None
    raise error


def request_snapshot(
    conn: psycopg.Connection[Any],
    profile: SourceProfile,
    entity: str,
    keys: Sequence[str] | None = None,
    chunk_size: int = 1000,
    reason: str = "ad-hoc",
) -> int:
    """Queue a snapshot of one entity (all rows, or the given keys as text). Returns its id.

    Raises ValueError for an entity that cannot be snapshotted, a chunk size below 1 or a
    malformed composite key.
    """
    ent = snapshot_entity(profile, entity)
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, not {chunk_size}")
    for key in keys or []:
        key_values(ent, key)
    row = conn.execute(
        f"INSERT INTO {OWN_SCHEMA}.snapshots (table_name, keys, chunk_size, reason) "
        "VALUES (%s, %s, %s, %s) RETURNING snapshot_id",
        (ent.table, list(keys) if keys else None, chunk_size, reason),
    ).fetchone()
    assert row is not None
    return int(row[0])


SNAPSHOT_COLUMNS = ("snapshot_id", "table_name", "keys", "reason", "chunk_size", "chunks_done",
                    "rows_emitted", "state", "requested_at", "finished_at")


def list_snapshots(conn: psycopg.Connection[Any], *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest snapshot requests first (pending, done, cancelled), as dicts."""
    return [dict(zip(SNAPSHOT_COLUMNS, r, strict=True)) for r in conn.execute(
        f"SELECT {', '.join(SNAPSHOT_COLUMNS)} FROM {OWN_SCHEMA}.snapshots "
        "ORDER BY snapshot_id DESC LIMIT %s", (limit,)).fetchall()]


def cancel_snapshot(conn: psycopg.Connection[Any], snapshot_id: int) -> str | None:
    """Cancel a pending snapshot: the producer reads no further chunk of it (a chunk in
    flight is still published). Returns the state it had (None: no such snapshot); only a
    'pending' one changes."""
    row = conn.execute(
        f"SELECT state FROM {OWN_SCHEMA}.snapshots WHERE snapshot_id = %s FOR UPDATE",
        (snapshot_id,)).fetchone()
    if row is None:
        return None
    if row[0] == "pending":
        conn.execute(f"UPDATE {OWN_SCHEMA}.snapshots SET state = 'cancelled', "
                     "finished_at = now() WHERE snapshot_id = %s", (snapshot_id,))
    return str(row[0])


def _select_list(info: TableInfo) -> sql.Composable:
    cols = info.entity.columns
    return sql.SQL(", ").join(
        sql.SQL("{}::text AS {}").format(sql.Identifier(c), sql.Identifier(c)) for c in cols)


def _key_match(info: TableInfo, keys: Sequence[str], params: list[Any]) -> sql.Composable:
    ent = info.entity
    casts = info.key_casts()
    if len(ent.key) == 1:
        params.append(list(keys))
        return sql.SQL("{} = ANY(%s::{}[])").format(sql.Identifier(ent.key[0]),
                                                     sql.SQL(casts[0]))
    alternatives = []
    for key in keys:
        values = key_values(ent, key)
        params.extend(values)
        alternatives.append(sql.SQL("({})").format(sql.SQL(" AND ").join(
            sql.SQL("{} = %s::{}").format(sql.Identifier(c), sql.SQL(t))
            for c, t in zip(ent.key, casts, strict=True))))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives))


def missing_keys(conn: psycopg.Connection[Any], profile: SourceProfile, entity: str,
                 keys: Sequence[str]) -> list[str]:
    """Which of ``keys`` (text, as the CRM's own type reads them) have no row of
    ``entity``'s table within the profile's row filter, in their first order. Raises
    ValueError naming the key when one is not a value of the key's type (e.g. a UUID typo)."""
    ent = profile.entities[entity]
    for key in keys:
        key_values(ent, key)  # ValueError names the key
    unique = list(dict.fromkeys(keys))
    info = read_table_info(conn, profile)[ent.table]
    query, params = chunk_query(info, after=None, keys=unique, limit=len(unique))
    try:
        found = {ent.key_text({c: r[i] for i, c in enumerate(ent.columns)})
                 for r in conn.execute(query, params).fetchall()}
    except psycopg.errors.DataError as exc:
        raise ValueError(f"not a key of {ent.table}: {exc.diag.message_primary}") from exc
    return [k for k in unique if k not in found]


def chunk_query(info: TableInfo, *, after: str | None, keys: Sequence[str] | None,
                limit: int) -> tuple[sql.Composed, list[Any]]:
    """One snapshot chunk: rows in key order after ``after`` (a key's text), within the row
    filter, optionally only ``keys``. Every column comes back as text."""
    ent = info.entity
    casts = info.key_casts()
    where: list[sql.Composable] = []
    params: list[Any] = []
    if ent.row_filter is not None:
        where.append(sql.SQL("({})").format(sql.SQL(ent.row_filter)))
    if after is not None:
        values = key_values(ent, after)
        where.append(sql.SQL("({}) > ({})").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in ent.key),
            sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in casts)))
        params.extend(values)
    if keys is not None:
        where.append(_key_match(info, keys, params))
    # ORDER BY names the table's columns, not the text output columns of the same name:
    # keys are ordered by their own type (numbers numerically), as the keyset condition is.
    query = sql.SQL("SELECT {} FROM {} AS src WHERE {} ORDER BY {} LIMIT %s").format(
        _select_list(info), _ident(ent.table),
        sql.SQL(" AND ").join(where) if where else sql.SQL("TRUE"),
        sql.SQL(", ").join(sql.Identifier("src", k) for k in ent.key))
    params.append(limit)
    return query, params


def lines_query(info: TableInfo, parent: TableInfo, order_keys: Sequence[str]
                ) -> tuple[sql.Composed, list[Any]]:
    """The lines of the given orders (keys as text), every column as text."""
    ent = info.entity
    assert ent.order_column is not None
    order_type = parent.key_casts()[0]
    where: list[sql.Composable] = [sql.SQL("{} = ANY(%s::{}[])").format(
        sql.Identifier(ent.order_column), sql.SQL(order_type))]
    if ent.row_filter is not None:
        where.append(sql.SQL("({})").format(sql.SQL(ent.row_filter)))
    query = sql.SQL("SELECT {} FROM {} AS src WHERE {} ORDER BY {}").format(
        _select_list(info), _ident(ent.table), sql.SQL(" AND ").join(where),
        sql.SQL(", ").join(sql.Identifier("src", k) for k in ent.key))
    return query, [list(order_keys)]


def typed_keys(conn: psycopg.Connection[Any], info: TableInfo, keys: Sequence[str]
               ) -> tuple[list[str], list[str]]:
    """Split ``keys`` (text, e.g. the keys an ERP holds) into those that are values of the
    key columns' types, in their order, and those that are not (``'not-a-number'`` for an
    integer key, ``'nc6-fake'`` for a uuid, a composite key that is not a JSON array of its
    columns): no row of the table can have the latter, and casting them would fail a whole
    query with a DataError. PostgreSQL's own input functions decide (a Python imitation of
    them would disagree at the edges: ranges, spellings); the keys are cast all at once, and
    only when that raises a DataError are they split in halves to find the bad ones, so a
    usual chunk costs one small query and each bad key about log2(len(keys)) more. Each cast
    runs in its own savepoint (or transaction), so a failed one leaves ``conn`` usable."""
    ent = info.entity
    casts = info.key_casts()
    good: list[list[str]] = []
    shaped: list[str] = []
    bad: set[str] = set()
    for key in keys:
        try:
            good.append(key_values(ent, key))
            shaped.append(key)
        except ValueError:
            bad.add(key)

    def castable(part: list[list[str]]) -> bool:
        params = [[v[i] for v in part] for i in range(len(casts))]
        query = sql.SQL("SELECT count(*) FROM unnest({}) AS k({}) WHERE ({}) IS NOT NULL").format(
            sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in casts),
            sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(casts))),
            sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Identifier(f"k{i}"), sql.SQL(t))
                               for i, t in enumerate(casts)))
        try:
            with conn.transaction():
                conn.execute(query, params)
        except psycopg.errors.DataError:
            return False
        return True

    def split(lo: int, hi: int) -> None:
        if lo == hi or castable(good[lo:hi]):
            return
        if hi - lo == 1:
            bad.add(shaped[lo])
            return
        mid = (lo + hi) // 2
        split(lo, mid)
        split(mid, hi)

    split(0, len(good))
    return [k for k in keys if k not in bad], [k for k in keys if k in bad]


@dataclass
class Chunk:
    """One chunk as ``read_chunk`` reads it: the readable rows (typed) and their lines, the
    keys (text) of rows that cannot be typed with why (table, column and reason, never a
    value), and the last key read, readable or not (where the next chunk starts; None for an
    empty chunk). ``unreadable_rows`` gives, for each unreadable key, the table and key (text)
    of the row that could not be read (the row itself, or an order's first unreadable line):
    what its capture dead letter names (``sync.dead_letters`` source_table, source_key)."""

    head: list[dict[str, Any]]
    lines: list[dict[str, Any]]
    unreadable: dict[str, str]
    last_key: str | None
    unreadable_rows: dict[str, tuple[str, str]] = field(default_factory=dict)


def read_chunk(conn: psycopg.Connection[Any], tables: dict[str, TableInfo], profile: SourceProfile,
               ent: EntityMapping, *, after: str | None, keys: Sequence[str] | None,
               limit: int) -> Chunk:
    """One chunk of an entity's rows in key order (and, for orders, their lines), typed as
    the decoder types pgoutput's text: what reconcile and resync read.

    A row one of whose values cannot be typed (NaN, infinity, a BC date: the producer makes
    it a capture dead letter) does not fail the chunk: its key lands in ``unreadable``, the
    other rows are read. An order with an unreadable line is unreadable itself (its event
    could not be built either). A key of ``keys`` that is not a value of the key's type
    (``typed_keys``: an ERP's key from another CRM) is simply not found."""
    info = tables[ent.table]
    if keys is not None:
        keys, _ = typed_keys(conn, info, keys)  # the others have no row here
        if not keys:
            return Chunk([], [], {}, None)
    query, params = chunk_query(info, after=after, keys=keys, limit=limit)
    head: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    unreadable: dict[str, str] = {}
    rows: dict[str, tuple[str, str]] = {}
    last_key: str | None = None
    with conn.cursor(row_factory=dict_row) as cur:
        for raw in cur.execute(query, params).fetchall():
            last_key = ent.key_text(raw)
            typed = typed_or_rejected(info, raw)
            if isinstance(typed, CaptureRejected):
                unreadable[last_key] = f"{ent.table}: {typed}"
                rows[last_key] = (ent.table, last_key)
            else:
                head.append(typed)
        line_ent = profile.entity("order_line")
        if ent.entity == "order" and head and line_ent is not None:
            line_info = tables[line_ent.table]
            assert line_ent.order_column is not None
            lq, lp = lines_query(line_info, info, [ent.key_text(r) for r in head])
            for raw in cur.execute(lq, lp).fetchall():
                typed = typed_or_rejected(line_info, raw)
                if isinstance(typed, CaptureRejected):
                    # the order's key as text: the line's order column, read as text
                    order_key, line_key = str(raw[line_ent.order_column]), line_ent.key_text(raw)
                    if order_key not in unreadable:
                        unreadable[order_key] = f"{line_ent.table} {line_key}: {typed}"
                        rows[order_key] = (line_ent.table, line_key)
                else:
                    lines.append(typed)
            if unreadable:
                head = [r for r in head if ent.key_text(r) not in unreadable]
                lines = [li for li in lines if str(li[line_ent.order_column]) not in unreadable]
    return Chunk(head, lines, unreadable, last_key, rows)


def typed_or_rejected(info: TableInfo, text_row: dict[str, str | None]
                      ) -> dict[str, Any] | CaptureRejected:
    """``typed_row``, or why the row cannot be typed: a CaptureRejected (never raised) whose
    reason never quotes a value. Normally an UnrepresentableValue naming the failing column;
    when no single column fails on its own, the whole row's first error (column None).

    The one place a text row (a snapshot's, reconcile's or resync's) is typed or rejected,
    so the producer's capture letters and reconcile's reasons agree. A try per row costs
    nothing on the readable path, so a chunk is never re-read row by row."""
    try:
        return typed_row(info, text_row)
    except CaptureRejected as exc:
        first: CaptureRejected = exc
    except (ValueError, ArithmeticError) as exc:
        # the library's message may quote the value: only its class is kept
        first = CaptureRejected(f"cannot be read ({type(exc).__name__})")
    # which column: convert one by one (the rare path)
    conv = info.converters
    for name, text in text_row.items():
        if text is None:
            continue
        try:
            conv[name](text)
        except CaptureRejected as exc:
            return UnrepresentableValue(exc.detail, name)
        except (ValueError, ArithmeticError) as exc:
            return UnrepresentableValue(f"cannot be read ({type(exc).__name__})", name)
    return first


def typed_row(info: TableInfo, text_row: dict[str, str | None]) -> dict[str, Any]:
    """A row read as text, converted exactly as the decoder converts pgoutput's text."""
    conv = info.converters
    return {k: None if v is None else conv[k](v) for k, v in text_row.items()}


def describe(profile: SourceProfile) -> dict[str, Any]:
    """The compiled profile for `config`/`status`: tables, keys, filters, missing fields."""
    return {
        "profile": profile.name,
        "path": str(profile.path),
        "entities": {
            e.entity: {"table": e.table, "key": list(e.key), "row_filter": e.row_filter,
                       "deleted_when": None if e.deleted_when is None else
                       f"{e.deleted_when.column} = {json.dumps(e.deleted_when.equals)}",
                       "fields_not_in_crm": e.missing()}
            for e in profile.entities.values()},
    }
