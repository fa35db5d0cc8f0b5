"""The boundary with psycopg: connections made one way, and a failed connection named for
what it is (unreachable, authentication refused, database missing).

Why a probe: psycopg 3 (checked with 3.3.9 and libpq 17) raises a plain ``OperationalError``
without SQLSTATE for every connection failure, because libpq keeps no result for a failed
connection; only its message text says "password authentication failed", and text is not a
contract. So the failure is classified with libpq's own ``PQping`` (which reads the server's
SQLSTATE internally): no answer, or "cannot connect now" (starting up, shutting down) =
unreachable, transient. A server that answers but refused us is then asked, with the same
credentials on its maintenance database, whether our database exists (``pg_database``):
missing database, or else the user was refused (password, pg_hba.conf, CONNECT privilege).
Should psycopg ever report the SQLSTATE (``InvalidPassword``, ``InvalidAuthorizationSpecification``,
``InvalidCatalogName``), its class decides directly.

A refusal the probe cannot tell from bad credentials is also what a server says when the
role's or the database's connection limit is reached ("too many connections", 53300) or the
database does not allow connections (55000). So a DSN that has connected before in this
process is refused transiently (DatabaseUnreachable, retried: a long-running consumer keeps
going and says why on /readyz); only a DSN that never connected is a configuration error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from service.errors import (
    DatabaseAuthFailed,
    DatabaseMissing,
    DatabaseUnreachable,
    PrivilegeMissing,
)
from service.settings import ENV_PREFIX, hide_secret

PgConn = psycopg.Connection[Any]
CONNECT_TIMEOUT_S = 10
# Databases every PostgreSQL server has, to tell "wrong credentials" from "no such database".
_MAINTENANCE_DBS = ("postgres", "template1")
_AUTH = (psycopg.errors.InvalidPassword, psycopg.errors.InvalidAuthorizationSpecification)


def connect(dsn: str, what: str, *, autocommit: bool = True,
            setting: str | None = None) -> PgConn:
    """Connect to the CRM or ERP database (``what`` names it in errors; ``setting`` is the
    variable that holds the DSN, default CRM_ERP_SYNC_<WHAT>_DSN).

    Raises DatabaseUnreachable (a StackUnavailable: transient), DatabaseAuthFailed or
    DatabaseMissing (ConfigErrors: permanent until the configuration is fixed)."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise classify_connect_error(dsn, what, exc, setting) from exc
    _CONNECTED.add(dsn)
    return conn


# The DSNs this process has connected with (see the module docstring); a handful at most.
_CONNECTED: set[str] = set()


def classify_connect_error(dsn: str, what: str, exc: psycopg.OperationalError,
                           setting: str | None = None) -> Exception:
    """The typed error for a failed psycopg.connect (see the module docstring)."""
    variable = setting or f"{ENV_PREFIX}{what.upper()}_DSN"
    params = conninfo_to_dict(dsn)
    user, dbname = params.get("user") or "(default user)", params.get("dbname") or "(default)"
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
    auth = DatabaseAuthFailed(
        variable, f"{what} database: PostgreSQL at {where} refused user {user!r} for "
                  f"database {dbname!r} (wrong password, pg_hba.conf, or no CONNECT "
                  "privilege; or, for now, the role's or database's connection limit, or "
                  "the database closed to connections); fix the DSN's credentials or the "
                  "role's grants, or try again")
    missing = DatabaseMissing(
        variable, f"{what} database {dbname!r} does not exist on PostgreSQL at {where} "
                  f"(user {user!r} could log in); create it or fix the DSN's database name")
    if isinstance(exc, _AUTH):
        return auth
    if isinstance(exc, psycopg.errors.InvalidCatalogName):
        return missing
    unreachable = DatabaseUnreachable(
        f"{what} database at {hide_secret(dsn)} is unreachable (no PostgreSQL accepting "
        f"connections at {where}); is the stack up? (make up)")
    if exc.sqlstate is not None or not _server_answers(dsn):
        return unreachable
    if dsn in _CONNECTED:
        return DatabaseUnreachable(
            f"{what} database: PostgreSQL at {where} refused user {user!r} for database "
            f"{dbname!r}, which it accepted before in this process (a connection limit "
            "reached, the database closed to connections or dropped, or the credentials "
            "changed); retrying")
    exists = _database_exists(dsn, str(params.get("dbname") or ""))
    if exists is False:
        return missing
    if exists is None and not _server_answers(dsn):  # went down between the two checks
        return unreachable
    return auth


def _server_answers(dsn: str) -> bool:
    """libpq's PQping: OK also when it would refuse our credentials; REJECT while starting up
    or shutting down; NO_RESPONSE when nothing listens."""
    conninfo = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    return pq.Ping(pq.PGconn.ping(conninfo.encode())) == pq.Ping.OK


def _database_exists(dsn: str, dbname: str) -> bool | None:
    """Whether the database exists, asked with the same credentials on a maintenance
    database; None when those credentials are refused there too."""
    for maintenance in _MAINTENANCE_DBS:
        try:
            with psycopg.connect(make_conninfo(dsn, dbname=maintenance),
                                 connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
                row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_database "
                                   "WHERE datname = %s)", (dbname,)).fetchone()
                return bool(row and row[0])
        except psycopg.OperationalError:
            continue
    return None


def privilege_missing(conn: PgConn, what: str, action: str, fix: str,
                      setting: str | None = None) -> PrivilegeMissing:
    """The PrivilegeMissing for a statement ``conn``'s role was refused (``what``: CRM or
    ERP; ``setting``: the DSN's variable, default CRM_ERP_SYNC_<WHAT>_DSN). In ``action``
    and ``fix``, ``{role}`` becomes the role quoted for SQL a person will paste, and
    ``{role_name}`` the bare name (for a command line). Reads the
    role from the connection's parameters, not with a query: the session may be in a failed
    transaction."""
    role = conn.info.user
    quoted = sql.Identifier(role).as_string(None)

    def fill(text: str) -> str:
        return text.replace("{role}", quoted).replace("{role_name}", role)

    return PrivilegeMissing(setting or f"{ENV_PREFIX}{what.upper()}_DSN", what, role,
                            fill(action), fill(fix))


@contextmanager
def privileges_needed(conn: PgConn, what: str, action: str, fix: str,
                      setting: str | None = None) -> Iterator[None]:
    """Statements run inside that PostgreSQL refuses for lack of a privilege
    (``InsufficientPrivilege``, SQLSTATE 42501) raise PrivilegeMissing naming ``action`` and
    ``fix`` instead (see privilege_missing): a configuration error, not a crash."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise privilege_missing(conn, what, action, fix, setting) from exc
