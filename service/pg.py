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

TLS: a server that offers no TLS to a DSN that demands it, or whose certificate does not
verify, is also "no response" to libpq's ping (no SQLSTATE comes back), and libpq says which
only in message text. So, after a ping without answer, a DSN that demands TLS is asked
again at the protocol level (``_offers_tls``: PostgreSQL's SSLRequest, answered by one byte
``S`` or ``N``): ``N`` = the server is up but offers no TLS, ``S`` = it does, so our side's
verification or handshake failed: both DatabaseTlsFailed (a ConfigError, exit 2), never
"unreachable". Mistakes visible in the DSN itself (a missing ``sslrootcert`` file) are
refused before connecting (``settings.pg_dsn_problems``), and a DSN libpq will not even try
(``PQping`` NO_ATTEMPT: an invalid option value) is a ConfigError too.

A refusal the probe cannot tell from bad credentials is also what a server says when the
role's or the database's connection limit is reached ("too many connections", 53300) or the
database does not allow connections (55000). So a DSN that has connected before in this
process is refused transiently (DatabaseUnreachable, retried: a long-running consumer keeps
going and says why on /readyz); only a DSN that never connected is a configuration error.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from service.errors import (
    ConfigError,
    DatabaseAuthFailed,
    DatabaseMissing,
    DatabaseTlsFailed,
    DatabaseUnreachable,
    PrivilegeMissing,
)
from service.settings import ENV_PREFIX, PG_TLS_REQUIRED, hide_secret, pg_dsn_problems

PgConn = psycopg.Connection[Any]
CONNECT_TIMEOUT_S = 10
# Databases every PostgreSQL server has, to tell "wrong credentials" from "no such database".
_MAINTENANCE_DBS = ("postgres", "template1")
_AUTH = (psycopg.errors.InvalidPassword, psycopg.errors.InvalidAuthorizationSpecification)


def connect(dsn: str, what: str, *, autocommit: bool = True,
            setting: str | None = None) -> PgConn:
    """Connect to the CRM or ERP database (``what`` names it in errors; ``setting`` is the
    variable that holds the DSN, default CRM_ERP_SYNC_<WHAT>_DSN).

    Raises DatabaseUnreachable (a StackUnavailable: transient), DatabaseAuthFailed,
    DatabaseMissing or DatabaseTlsFailed (ConfigErrors: permanent until the configuration is
    fixed), or a ConfigError for a TLS mistake the DSN itself shows (a missing sslrootcert
    file), before connecting."""
    problems = pg_dsn_problems(dsn, setting or f"{ENV_PREFIX}{what.upper()}_DSN")
    if problems:
        (variable, problem), *more = problems
        raise ConfigError(variable, problem, more)
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
    if exc.sqlstate is not None:
        return unreachable
    ping = _ping(dsn)
    if ping == pq.Ping.NO_ATTEMPT:
        return ConfigError(variable, f"{what} database: libpq refused the DSN's parameters "
                                     "before connecting (an unknown option or an invalid "
                                     "value, such as sslmode's)")
    if ping != pq.Ping.OK:
        tls = _tls_failure(params, what, where)
        if tls is None:
            return unreachable
        if dsn in _CONNECTED:  # as for a refusal below: it worked before, so retry
            return DatabaseUnreachable(f"{tls}; it connected before in this process: retrying")
        return DatabaseTlsFailed(variable, tls)
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


def _ping(dsn: str) -> pq.Ping:
    """libpq's PQping: OK also when it would refuse our credentials; REJECT while starting up
    or shutting down; NO_RESPONSE when nothing listens (or no TLS as the DSN demands it);
    NO_ATTEMPT when the DSN's options are invalid."""
    conninfo = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    return pq.Ping(pq.PGconn.ping(conninfo.encode()))


def _server_answers(dsn: str) -> bool:
    return _ping(dsn) == pq.Ping.OK


def _tls_failure(params: dict[str, Any], what: str, where: str) -> str | None:
    """Why a connection that demanded TLS failed though the server is up, or None: it does
    not demand TLS, or no server answers the SSLRequest (unreachable after all)."""
    mode = str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
    if mode not in PG_TLS_REQUIRED:
        return None
    offers = _offers_tls(params)
    if offers is None:
        return None
    if not offers:
        return (f"{what} database: PostgreSQL at {where} answers but offers no TLS, and the "
                f"DSN's sslmode={mode} requires it: turn ssl on in the server, or connect to "
                "the TLS endpoint meant")
    if mode == "require":
        return (f"{what} database: the TLS handshake with PostgreSQL at {where} failed "
                "(sslmode=require): check ssl_min_protocol_version, sslcert and sslkey")
    root = (params.get("sslrootcert") or os.environ.get("PGSSLROOTCERT")
            or "~/.postgresql/root.crt")
    return (f"{what} database: the TLS certificate of PostgreSQL at {where} did not verify "
            f"against sslrootcert {root} (sslmode={mode}: signed by that CA"
            + (", and the DSN's host name in it" if mode == "verify-full" else "")
            + "): name the CA that signed the server's certificate")


def _offers_tls(params: dict[str, Any]) -> bool | None:
    """Whether the server at the DSN's (first) host and port accepts TLS: PostgreSQL's
    SSLRequest (a length-8 message with code 80877103, answered by one byte, ``S`` or
    ``N``; see "Message Flow: SSL Session Encryption" in the PostgreSQL manual). None when
    nothing answers, or for a Unix socket (no TLS there). Ours because libpq has no call that
    says it: its failed connection keeps only message text."""
    host = str(params.get("hostaddr") or params.get("host") or "localhost").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0] or 5432)
    if host.startswith("/"):
        return None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.sendall(struct.pack(">ii", 8, 80877103))
            answer = sock.recv(1)
    except OSError:
        return None
    return {b"S": True, b"N": False}.get(answer)


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
