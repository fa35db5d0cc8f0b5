"""What a CRM database must provide before capture can work, checked, with the SQL to fix it.

``crm-erp-sync setup --check`` runs :func:`check_prerequisites` against the CRM and prints
:func:`render_checks`. Every check reads the catalog only (it changes nothing), so it can run
as the capture role itself or as an administrator on the capture role's behalf.

Each failing check carries the exact SQL the CRM's DBA should run (identifiers quoted by
psycopg): most of these need a superuser or the table's owner, and some (``wal_level``,
``max_replication_slots``) a server restart. A real CRM is guarded in ways a demo is not:
BottleCRM, for one, forces row-level security on every tenant table, and a snapshot read
through RLS returns **zero rows without any error**: that is why it is a failed check, not a
warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from service.cdc.capture import OWN_SCHEMA, WATERMARK_TABLE

MARK_OK, MARK_FAIL = "✓", "✗"

_IDENTITY = {
    "d": "DEFAULT (primary key columns only)",
    "n": "NOTHING",
    "f": "FULL",
    "i": "USING INDEX",
}


@dataclass(frozen=True)
class Check:
    """One prerequisite: ``fix_sql`` (one or more statements, ``;``-terminated) when failed."""

    name: str
    ok: bool
    detail: str
    fix_sql: str | None = None


@dataclass(frozen=True)
class _Role:
    name: str
    exists: bool
    superuser: bool = False
    replication: bool = False
    bypassrls: bool = False


@dataclass(frozen=True)
class _Table:
    given: str  # as named by the caller
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind
    identity: str  # pg_class.relreplident
    rls: bool
    force_rls: bool
    owner: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def quote_table(schema: str, table: str) -> str:
    """``"schema"."table"``, quoted for SQL a person will paste (psycopg's quoting rules)."""
    return sql.Identifier(schema, table).as_string(None)


def quote_ident(name: str) -> str:
    """One quoted identifier (a role, a publication, a schema)."""
    return sql.Identifier(name).as_string(None)


def _regclass_text(name: str) -> str:
    """The text ``to_regclass`` parses: each dotted part quoted, so case and odd characters
    survive (an unqualified name is resolved through the search path, as PostgreSQL would)."""
    return sql.Identifier(*name.split(".", 1)).as_string(None)


def check_prerequisites(
    conn: psycopg.Connection[Any],
    *,
    capture_role: str | None,
    tables: Sequence[str],
    row_filter_columns: Mapping[str, Sequence[str]],
    publication: str,
    slot: str,
    row_filters: Mapping[str, str] | None = None,
) -> list[Check]:
    """Check the CRM database ``conn`` is connected to; returns checks in a stable order.

    ``capture_role`` is the role the producer connects as (None: the connection's own
    ``current_user``). ``tables`` are the captured tables as ``schema.table`` (or unqualified,
    resolved through the search path). ``row_filter_columns`` maps a table (as named in
    ``tables``) to the columns its publication row filter uses. ``publication``/``slot`` are
    the names the producer uses; they need not exist yet. ``row_filters`` maps a table (as
    named in ``tables``) to the profile's row filter, so that the SQL adding it back to the
    publication adds it filtered (without it the next check fails on the filter).

    Reads only the catalog. Raises ``psycopg.Error`` if the connection fails mid-way.
    """
    role = _role(conn, capture_role)
    checks = [_check_wal_level(conn), _check_slots(conn, slot), _check_role(role)]
    found: list[_Table] = []
    for given in tables:
        table = _table(conn, given)
        if table is None:
            checks.append(Check(f"table {given}", False,
                                "no such table in this database (check the source mapping "
                                "and the database the DSN names)"))
            continue
        found.append(table)
        checks.extend(_check_table(conn, table, role))
    if role.exists:
        checks.append(_check_rls(found, role))
        checks.append(_check_own_schema(conn, role))
    by_given = {t.given: t for t in found}
    for given, columns in row_filter_columns.items():
        if given in by_given:
            checks.append(_check_row_filter(conn, by_given[given], columns))
    absent = [given for given in tables if given not in {t.given for t in found}]
    checks.append(_check_publication(conn, publication, found, absent, row_filters or {}))
    return checks


# The producer's own tables it writes whatever happens (its slot's state, snapshot progress,
# watermarks); the others (contract violations, capture letters sent, truncates) only when
# such a thing happens, and `setup --check` asks for them.
CAPTURE_WRITES = (f"{OWN_SCHEMA}.capture_state", f"{OWN_SCHEMA}.snapshots", WATERMARK_TABLE)


def check_capture_privileges(conn: psycopg.Connection[Any], *, tables: Sequence[str],
                             row_filters: bool) -> list[Check]:
    """The privilege checks of :func:`check_prerequisites` that a producer's start depends
    on, for the connection's own role (``current_user``): REPLICATION, read access to each of
    ``tables`` (``schema.table``; one that does not exist is left to the source contract),
    and the producer's own schema: CREATE on the database and the schema, TEMPORARY only
    with ``row_filters`` (the profile has some), and the ``CAPTURE_WRITES`` tables. What a
    producer checks before it waits as a standby (a missing grant would otherwise surface
    only when it takes over), never stricter than what its start needs. A handful of
    catalog reads; raises ``psycopg.Error`` if the connection fails."""
    role = _role(conn, None)
    checks = [_check_role(role)]
    for given in tables:
        table = _table(conn, given)
        if table is not None and table.kind in ("r", "p"):
            checks.append(_check_read(conn, table, role))
    checks.append(_check_own_schema(conn, role, temporary=row_filters,
                                    writes=CAPTURE_WRITES))
    return checks


# ---- server --------------------------------------------------------------------------------
def _check_wal_level(conn: psycopg.Connection[Any]) -> Check:
    level = _one(conn, "SELECT current_setting('wal_level')")
    if level == "logical":
        return Check("wal_level", True, "logical")
    return Check("wal_level", False,
                 f"is {level}: logical decoding needs 'logical' (a server restart applies it)",
                 "ALTER SYSTEM SET wal_level = logical;  -- then restart PostgreSQL")


def _check_slots(conn: psycopg.Connection[Any], slot: str) -> Check:
    row = conn.execute(
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots),"
        " (SELECT plugin FROM pg_replication_slots WHERE slot_name = %s),"
        " (SELECT database = current_database() FROM pg_replication_slots"
        "   WHERE slot_name = %s)", (slot, slot)).fetchone()
    assert row is not None
    limit, used, plugin, same_db = row
    name = f"replication slot {slot}"
    if plugin is not None:
        if plugin == "pgoutput" and same_db:
            return Check(name, True, "exists (pgoutput, this database)")
        where = "this database" if same_db else "another database"
        return Check(name, False,
                     f"exists but with plugin {plugin} on {where}; the producer needs a "
                     "pgoutput slot on this database: drop it (its unread changes are lost) "
                     "or choose another CRM_ERP_SYNC_SLOT_NAME",
                     sql.SQL("SELECT pg_drop_replication_slot({});").format(sql.Literal(slot))
                     .as_string(None))
    if used < limit:
        return Check(name, True, f"not created yet; {limit - used} of {limit} slots free")
    return Check(name, False,
                 f"all {limit} replication slots are in use (max_replication_slots); "
                 "drop an unused one or raise the limit (a server restart applies it)",
                 f"ALTER SYSTEM SET max_replication_slots = {limit + 1};  "
                 "-- then restart PostgreSQL")


# ---- capture role --------------------------------------------------------------------------
def _role(conn: psycopg.Connection[Any], name: str | None) -> _Role:
    role_name = name if name is not None else str(_one(conn, "SELECT current_user"))
    row = conn.execute("SELECT rolsuper, rolreplication, rolbypassrls FROM pg_roles"
                       " WHERE rolname = %s", (role_name,)).fetchone()
    if row is None:
        return _Role(role_name, exists=False)
    return _Role(role_name, True, *row)


def _check_role(role: _Role) -> Check:
    name = f"capture role {role.name}"
    q = quote_ident(role.name)
    if not role.exists:
        return Check(name, False, "no such role",
                     f"CREATE ROLE {q} LOGIN REPLICATION PASSWORD '…';")
    if role.superuser:
        return Check(name, True, "superuser (has REPLICATION; more than capture needs)")
    if role.replication:
        return Check(name, True, "has REPLICATION")
    return Check(name, False, "lacks REPLICATION: it cannot create or read a replication slot",
                 f"ALTER ROLE {q} REPLICATION;")


# ---- tables --------------------------------------------------------------------------------
def _table(conn: psycopg.Connection[Any], given: str) -> _Table | None:
    """The table ``given`` names (``schema.table``, or unqualified: the search path).

    A qualified name is looked up in the catalog, not with ``to_regclass``: that raises
    "permission denied for schema" for a role without USAGE on the schema, and this check
    exists to name that missing grant (``_check_read``), not to die of it (newcomer10
    F11-b). An unqualified one goes through ``to_regclass``, whose search path leaves out
    the schemas the role may not use (as the role's own queries would)."""
    schema, dot, name = given.partition(".")
    where: LiteralString = ("n.nspname = %s AND c.relname = %s" if dot
                            else "c.oid = to_regclass(%s)")
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relreplident, c.relrowsecurity,"
        "       c.relforcerowsecurity, pg_get_userbyid(c.relowner)"
        "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE " + where, (schema, name) if dot else (_regclass_text(given),)).fetchone()
    return None if row is None else _Table(given, *row)


def _check_table(conn: psycopg.Connection[Any], table: _Table, role: _Role) -> list[Check]:
    qualified, quoted = table.qualified, quote_table(table.schema, table.name)
    if table.kind not in ("r", "p"):
        return [Check(f"table {qualified}", False,
                      f"is not a table (relkind {table.kind}): only tables can be published")]
    checks = []
    if table.identity == "f":
        checks.append(Check(f"replica identity {qualified}", True, "FULL"))
    else:
        checks.append(Check(
            f"replica identity {qualified}", False,
            f"is {_IDENTITY.get(table.identity, table.identity)}: a DELETE would carry only "
            "the key columns (a deleted order line, say, without its order) and an UPDATE "
            "no old row",
            f"ALTER TABLE {quoted} REPLICA IDENTITY FULL;"))
    if role.exists:
        checks.append(_check_read(conn, table, role))
    return checks


def _check_read(conn: psycopg.Connection[Any], table: _Table, role: _Role) -> Check:
    row = conn.execute(
        "SELECT has_schema_privilege(%s, %s, 'USAGE'), has_table_privilege(%s, %s, 'SELECT')",
        (role.name, table.schema, role.name, table.oid)).fetchone()
    assert row is not None
    usage, select = row
    name = f"read access {table.qualified}"
    if usage and select:
        return Check(name, True, f"{role.name} may SELECT")
    q = quote_ident(role.name)
    fixes = []
    if not usage:
        fixes.append(f"GRANT USAGE ON SCHEMA {quote_ident(table.schema)} TO {q};")
    if not select:
        fixes.append(f"GRANT SELECT ON TABLE {quote_table(table.schema, table.name)} TO {q};")
    return Check(name, False, f"{role.name} cannot read it, so the snapshot cannot",
                 "\n".join(fixes))


def _check_rls(tables: Sequence[_Table], role: _Role) -> Check:
    name = "row-level security"
    with_rls = [t for t in tables if t.rls]
    if not with_rls:
        return Check(name, True, "no captured table has row-level security enabled")
    if role.superuser or role.bypassrls:
        why = "superuser" if role.superuser else "BYPASSRLS"
        return Check(name, True, f"{len(with_rls)} table(s) have RLS; {role.name} bypasses it "
                                 f"({why})")
    # A table's owner escapes its policies unless they are FORCEd (PostgreSQL's rule).
    bound = [t for t in with_rls if t.force_rls or t.owner != role.name]
    if not bound:
        return Check(name, True, f"{role.name} owns the tables with RLS, which is not forced")
    listed = ", ".join(f"{t.qualified}{' (forced)' if t.force_rls else ''}" for t in bound)
    q = quote_ident(role.name)
    return Check(
        name, False,
        f"{role.name} is subject to row-level security on {listed}: a snapshot through RLS "
        "silently reads zero rows (or only what a policy lets through) while the log still "
        f"streams every change. Give the role BYPASSRLS, or add a policy such as "
        f"CREATE POLICY crm_erp_sync_read ON <table> FOR SELECT TO {q} USING (true) "
        "on each of them",
        f"ALTER ROLE {q} BYPASSRLS;")


def _check_own_schema(conn: psycopg.Connection[Any], role: _Role, *,
                      temporary: bool = True,
                      writes: Sequence[str] | None = None) -> Check:
    """The producer declares its own schema (watermarks, snapshots) at every start:
    ``CREATE SCHEMA IF NOT EXISTS`` needs CREATE on the database even when the schema exists,
    and ``CREATE TABLE IF NOT EXISTS`` needs CREATE on the schema even when the table exists
    (PostgreSQL checks the privilege before it looks for the table: a schema that `setup`,
    run as an administrator, created is the administrator's); then it writes the tables,
    and deletes watermarks older than an hour after each snapshot chunk. It compares the
    profile's row filters with the publication's through a temporary table
    (``service.cdc.capture.normalised_filters``): TEMPORARY on the database (PUBLIC has it
    unless revoked).

    ``temporary`` False: TEMPORARY is not asked for (a profile without row filters never
    compares them). ``writes``: the tables (``schema.table``) the role must read and write
    (SELECT, INSERT and UPDATE each), where they exist; None: every table of the schema."""
    row = conn.execute(
        "SELECT current_database(), has_database_privilege(%(r)s, current_database(), 'CREATE'),"
        " has_database_privilege(%(r)s, current_database(), 'TEMPORARY'),"
        " to_regnamespace(%(s)s) IS NOT NULL,"
        " coalesce(has_schema_privilege(%(r)s, to_regnamespace(%(s)s), 'USAGE'), false),"
        " coalesce(has_schema_privilege(%(r)s, to_regnamespace(%(s)s), 'CREATE'), false),"
        # has_table_privilege with a list is true when ANY of them is held: one at a time
        " (SELECT bool_and(has_table_privilege(%(r)s, c.oid, 'SELECT')"
        "                  AND has_table_privilege(%(r)s, c.oid, 'INSERT')"
        "                  AND has_table_privilege(%(r)s, c.oid, 'UPDATE'))"
        "    FROM pg_class c WHERE c.relnamespace = to_regnamespace(%(s)s)"
        "     AND c.relkind = 'r'),"
        # Tables are found in the catalog, not with to_regclass, which raises for a role
        # without USAGE on the schema: the grant this check names (see _table). NULL: absent.
        " (SELECT has_table_privilege(%(r)s, c.oid, 'DELETE') FROM pg_class c"
        "   WHERE c.relnamespace = to_regnamespace(%(s)s) AND c.relname = %(w)s),"
        " ARRAY(SELECT t FROM unnest(%(t)s::text[]) WITH ORDINALITY AS u (t, n)"
        "        JOIN pg_namespace ns ON ns.nspname = split_part(t, '.', 1)"
        "        JOIN pg_class c ON c.relnamespace = ns.oid"
        "         AND c.relname = substr(t, strpos(t, '.') + 1)"
        "        WHERE NOT (has_table_privilege(%(r)s, c.oid, 'SELECT')"
        "          AND has_table_privilege(%(r)s, c.oid, 'INSERT')"
        "          AND has_table_privilege(%(r)s, c.oid, 'UPDATE')) ORDER BY n)",
        {"r": role.name, "s": OWN_SCHEMA, "w": WATERMARK_TABLE.partition(".")[2],
         "t": list(writes or [])}).fetchone()
    assert row is not None
    (database, create, has_temporary, exists, usage, schema_create, tables_ok, prune_ok,
     unwritable) = row
    name = f"producer schema {OWN_SCHEMA}"
    q = quote_ident(role.name)
    schema = quote_ident(OWN_SCHEMA)
    fixes = []
    if not create:
        fixes.append(f"GRANT CREATE ON DATABASE {quote_ident(database)} TO {q};")
    if temporary and not has_temporary:
        fixes.append(f"GRANT TEMPORARY ON DATABASE {quote_ident(database)} TO {q};")
    if exists and not (usage and schema_create):
        fixes.append(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {q};")
    if writes is None and exists and not (usage and tables_ok is not False):
        fixes.append(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {q};")
    if writes is not None and unwritable:
        listed = ", ".join(_regclass_text(t) for t in unwritable)
        fixes.append(f"GRANT SELECT, INSERT, UPDATE ON TABLE {listed} TO {q};")
    if prune_ok is False:
        fixes.append(f"GRANT DELETE ON TABLE {schema}.{quote_ident('watermarks')} TO {q};")
    if not fixes:
        state = "exists and" if exists else "does not exist yet;"
        return Check(name, True, f"{state} {role.name} can declare it and write its tables")
    return Check(name, False,
                 f"{role.name} cannot declare or write the producer's own schema (watermarks "
                 "and snapshot progress; the producer runs CREATE SCHEMA IF NOT EXISTS at "
                 "every start)", "\n".join(fixes))


def _check_row_filter(conn: psycopg.Connection[Any], table: _Table,
                      columns: Sequence[str]) -> Check:
    name = f"row filter {table.qualified}"
    existing = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
        " AND NOT attisdropped", (table.oid,))}
    unknown = [c for c in columns if c not in existing]
    if unknown:
        return Check(name, False, f"no column(s) {', '.join(unknown)} on the table")
    if table.identity == "f":
        identity = existing
    elif table.identity == "n":
        identity = set()
    else:  # the primary key (DEFAULT) or the chosen index (USING INDEX)
        identity = {r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            "  ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = %s"
            "   AND CASE WHEN %s = 'd' THEN i.indisprimary ELSE i.indisreplident END",
            (table.oid, table.identity))}
    outside = [c for c in columns if c not in identity]
    if not outside:
        return Check(name, True, f"filter column(s) {', '.join(columns)} are in the replica "
                                 "identity")
    return Check(
        name, False,
        f"filter column(s) {', '.join(outside)} are not in the replica identity: PostgreSQL "
        "then refuses every UPDATE and DELETE on the table once it is published with the "
        "filter (the CRM's own writes fail)",
        f"ALTER TABLE {quote_table(table.schema, table.name)} REPLICA IDENTITY FULL;")


def _check_publication(conn: psycopg.Connection[Any], publication: str,
                       tables: Sequence[_Table], absent: Sequence[str] = (),
                       row_filters: Mapping[str, str] | None = None) -> Check:
    """Every captured table is published. A table that does not exist cannot be: it is
    named here too (never "publishes every captured table" while one is missing)."""
    name = f"publication {publication}"
    if absent:
        return Check(name, False, f"cannot publish {', '.join(absent)}: no such table (see "
                                  "the table check above)")
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                          (publication,)).fetchone()
    if not exists:
        return Check(name, True, "not created yet: `crm-erp-sync setup` creates it (as a "
                                 "superuser or the tables' owner)")
    published = {(r[0], r[1]) for r in conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (publication,))}
    missing = [t for t in tables if (t.schema, t.name) not in published]
    if not missing:
        return Check(name, True, "publishes every captured table")
    filters = row_filters or {}
    listed = ", ".join(quote_table(t.schema, t.name)
                       + (f" WHERE ({filters[t.given]})" if t.given in filters else "")
                       for t in missing)
    return Check(name, False,
                 f"exists but does not publish {', '.join(t.qualified for t in missing)}",
                 f"ALTER PUBLICATION {quote_ident(publication)} ADD TABLE {listed};")


def _one(conn: psycopg.Connection[Any], query: LiteralString) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


# ---- output --------------------------------------------------------------------------------
def render_checks(checks: Sequence[Check]) -> str:
    """Human-readable report: one line per check (✓/✗ name: detail), each failed check's SQL
    indented under it, then a summary line. Pure; the CLI prints it."""
    lines = []
    for check in checks:
        lines.append(f"{MARK_OK if check.ok else MARK_FAIL} {check.name}: {check.detail}")
        if not check.ok and check.fix_sql:
            lines.extend(f"    {sql_line}" for sql_line in check.fix_sql.splitlines())
    failed = [c for c in checks if not c.ok]
    if failed:
        with_sql = sum(1 for c in failed if c.fix_sql)
        run = "run the SQL above as a superuser (or the tables' owner)"
        advice = (f"{run}, then check again" if with_sql == len(failed)
                  else f"{run}, fix the rest, then check again" if with_sql
                  else "fix them, then check again")
        lines.append(f"{len(failed)} of {len(checks)} checks failed; {advice}.")
    else:
        lines.append(f"all {len(checks)} checks passed.")
    return "\n".join(lines)


def fix_script(checks: Sequence[Check]) -> str:
    """Every failed check's SQL, in order, as one script (empty when all passed)."""
    return "\n".join(c.fix_sql for c in checks if not c.ok and c.fix_sql)
