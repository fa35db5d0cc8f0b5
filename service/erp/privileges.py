"""The ERP role's grants the consumer needs, checked at its start (newcomer9 F6).

A consumer whose ERP role lacks a grant would join its group, take partitions and fail on its
first batch, at every restart (a crash loop), with PostgreSQL's "permission denied for table
t" alone. So the consumer asks the catalog first, one privilege at a time
(``has_table_privilege(role, t, 'SELECT, INSERT')`` is true when ANY of them is held), and
exits 2 naming the role, each table and privilege, and the GRANT to run: README (Deployment,
"Secure transport and least privilege") lists the consumer's grants.

What is checked is what README grants the consumer's ERP role: ``USAGE`` on the schemas the
configured target writes (``erp`` and ``sync`` for the ``sql`` target, ``sync`` alone for
``tryton``: its writes go through Tryton's RPC), ``SELECT, INSERT, UPDATE, DELETE`` on each of
their tables, and ``TEMPORARY`` on the database for the ``sql`` target (its per-session
staging table). Sequences are not checked: the tables' keys are identity columns, which need
no grant on their sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

# The privileges the consumer uses on each table it writes, each checked on its own.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True, slots=True)
class Missing:
    """One grant the ERP role lacks. ``kind``: ``table``, ``schema`` or ``database``;
    ``name``: the object (``schema.table`` for a table); ``privilege``: as PostgreSQL
    spells it (``UPDATE``, ``USAGE``, ``TEMPORARY``)."""

    kind: str
    name: str
    privilege: str


def schemas_for(target: str) -> tuple[str, ...]:
    """The ERP database's schemas the ``target`` (``sql``/``tryton``) writes."""
    return ("erp", "sync") if target == "sql" else ("sync",)


def missing_erp_grants(conn: psycopg.Connection[Any], *, target: str) -> list[Missing]:
    """What the connection's role (``current_user``) lacks of the consumer's grants for
    ``target`` (see the module's docstring), in schema, table, privilege order; [] when
    nothing (a superuser, the owner). One catalog query; a schema that does not exist is
    left to ``ErpTarget.not_set_up``. Raises ``psycopg.Error`` if the connection fails."""
    rows = conn.execute(
        "WITH s AS (SELECT n.oid, n.nspname, o.n FROM unnest(%(s)s::text[]) WITH ORDINALITY"
        "             AS o (name, n) JOIN pg_namespace n ON n.nspname = o.name),"
        " p AS (SELECT p, o.n FROM unnest(%(p)s::text[]) WITH ORDINALITY AS o (p, n))"
        " SELECT 'database', current_database(), 'TEMPORARY', 0, '', 0"
        "  WHERE %(temp)s AND NOT has_database_privilege(current_database(), 'TEMPORARY')"
        " UNION ALL"
        " SELECT 'schema', s.nspname, 'USAGE', s.n, '', 0 FROM s"
        "  WHERE NOT has_schema_privilege(s.oid, 'USAGE')"
        " UNION ALL"
        " SELECT 'table', s.nspname || '.' || c.relname, p.p, s.n, c.relname, p.n"
        "   FROM s JOIN pg_class c ON c.relnamespace = s.oid AND c.relkind IN ('r', 'p')"
        "   CROSS JOIN p WHERE NOT has_table_privilege(c.oid, p.p)"
        " ORDER BY 4, 5, 6",
        {"s": list(schemas_for(target)), "p": list(TABLE_PRIVILEGES),
         "temp": target == "sql"}).fetchall()
    return [Missing(kind, name, privilege) for kind, name, privilege, *_ in rows]


def grant_sql(missing: Sequence[Missing], role: str) -> list[str]:
    """The GRANT statements that give ``role`` what ``missing`` lists: one per object, its
    privileges in ``TABLE_PRIVILEGES`` order, identifiers quoted for pasting into psql."""
    q = sql.Identifier(role).as_string(None)
    grants = []
    for (kind, name), privileges in _by_object(missing).items():
        if kind == "table":
            target = "TABLE " + sql.Identifier(*name.split(".", 1)).as_string(None)
        else:
            target = f"{kind.upper()} {sql.Identifier(name).as_string(None)}"
        grants.append(f"GRANT {', '.join(privileges)} ON {target} TO {q};")
    return grants


def describe(missing: Sequence[Missing]) -> str:
    """``missing`` as the objects and privileges, one object at a time:
    ``UPDATE on table erp.business_partners; USAGE on schema sync``."""
    return "; ".join(f"{', '.join(p)} on {kind} {name}"
                     for (kind, name), p in _by_object(missing).items())


def _by_object(missing: Sequence[Missing]) -> dict[tuple[str, str], list[str]]:
    """(kind, name) -> the privileges lacking on it, in ``missing``'s order."""
    by_object: dict[tuple[str, str], list[str]] = {}
    for m in missing:
        by_object.setdefault((m.kind, m.name), []).append(m.privilege)
    return by_object


# Where the consumer's grants are written down, for the messages.
README_GRANTS = ("README, Deployment, \"Secure transport and least privilege\", lists the "
                 "consumer's ERP grants")
