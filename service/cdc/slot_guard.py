"""Is the slot (and the publication) the producer captures through still the one it had?

A slot dropped while the producer ran (``pg_drop_replication_slot``), a slot dropped and
created again by someone else, a lost slot, or a dropped publication all leave a gap: changes
made meanwhile cannot be read any more. Left alone, the producer would create a new slot and
take a full snapshot as on a first start, and a row deleted in the gap would stay live in the
ERP. So the producer keeps, in its own schema in the CRM (``crm_erp_sync.capture_state``, one
row per slot name):

- ``confirmed_ceiling``: a position at or past everything it ever let the slot confirm. It is
  raised *before* a confirm would pass it, to the WAL insert position plus
  :data:`CEILING_SLACK` (so one write per 64 MiB of WAL, not one per batch), and while
  streaming whenever the WAL the stream has seen gets within half the slack (checked every
  step, ``CdcProducer._keep_ceiling_ahead``: psycopg2 confirms up to the server's WAL end by
  itself on an idle stream). A slot whose ``confirmed_flush_lsn`` is past
  it was not confirmed by us: it is a new slot of the same name.
- ``publication_oid``: the publication's identity. Missing: dropped. Another oid: dropped and
  created again (PostgreSQL 15 cannot decode a change made between the two through the old
  slot: ``publication ... does not exist`` on every read).
- ``problem``/``problem_detail``: what was found, kept until ``crm-erp-sync resync`` ran
  (``status`` reads it), so a slot re-created by hand meanwhile does not hide the gap;
  ``resync_started_lsn`` while resync's delete pass is still to run.

A running producer also knows exactly how far it let the slot confirm (its explicit confirms
and the highest WAL end the server told psycopg2 of): when its stream is lost and the slot it
opens again has confirmed past that, the slot was replaced meanwhile, whatever the ceiling.

Known limit: a slot dropped and created again while no producer ran, within
:data:`CEILING_SLACK` of WAL after the last raise, is not recognised as replaced by its
position (it is when the publication went with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from service.cdc import pgoutput
from service.cdc.capture import OWN_SCHEMA
from service.errors import CaptureBroken
from service.pg import privileges_needed
from service.settings import Settings

STATE_TABLE = f"{OWN_SCHEMA}.capture_state"
CEILING_SLACK = 64 * 1024 * 1024  # bytes of WAL

STATE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {OWN_SCHEMA};
CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
    slot_name          text PRIMARY KEY,
    publication_name   text NOT NULL,
    publication_oid    oid,
    confirmed_ceiling  pg_lsn NOT NULL,
    slot_created_at    timestamptz NOT NULL DEFAULT now(),
    problem            text,
    problem_detail     text,
    problem_at         timestamptz,
    resync_started_lsn pg_lsn,
    resynced_at        timestamptz
);
"""

RESYNC_COMMAND = "crm-erp-sync resync"


@dataclass(frozen=True)
class CaptureState:
    slot_name: str
    publication_oid: int | None
    confirmed_ceiling: int
    problem: str | None
    problem_detail: str | None
    resync_started_lsn: int | None


def ensure_table(conn: psycopg.Connection[Any]) -> None:
    """Creates the state table if missing. Raises PrivilegeMissing when the role may not,
    naming the grant that is missing: ``CREATE SCHEMA IF NOT EXISTS`` needs CREATE on the
    database even when the schema exists (checked before it looks), and ``CREATE TABLE IF
    NOT EXISTS`` needs CREATE on the schema even when the table exists (`setup`, run as an
    administrator, made the schema the administrator's)."""
    database = sql.Identifier(conn.info.dbname).as_string(None)
    with privileges_needed(
            conn, "CRM", f"declare the producer's schema {OWN_SCHEMA} (CREATE SCHEMA IF NOT "
            "EXISTS, at every start)",
            f"GRANT CREATE ON DATABASE {database} TO {{role}} (or run "
            "`crm-erp-sync setup --check --role {role_name}` for every grant the producer needs)"):
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {OWN_SCHEMA}")
    with privileges_needed(
            conn, "CRM", f"create table {STATE_TABLE}",
            f"GRANT USAGE, CREATE ON SCHEMA {OWN_SCHEMA} TO {{role}} (or run "
            "`crm-erp-sync setup --check --role {role_name}` for every grant the producer needs)"):
        conn.execute(STATE_DDL)


def load(conn: psycopg.Connection[Any], slot: str) -> CaptureState | None:
    """The recorded state of ``slot`` (None before the producer first created it, or while
    the CRM has no state table)."""
    if conn.execute("SELECT to_regclass(%s)", (STATE_TABLE,)).fetchone() == (None,):
        return None
    row = conn.execute(
        f"SELECT slot_name, publication_oid::bigint, confirmed_ceiling::text, problem, "
        f"problem_detail, resync_started_lsn::text FROM {STATE_TABLE} WHERE slot_name = %s",
        (slot,)).fetchone()
    if row is None:
        return None
    return CaptureState(row[0], row[1], pgoutput.str_to_lsn(row[2]), row[3], row[4],
                        None if row[5] is None else pgoutput.str_to_lsn(row[5]))


def _publication_oid(conn: psycopg.Connection[Any], name: str) -> int | None:
    row = conn.execute("SELECT oid::bigint FROM pg_publication WHERE pubname = %s",
                       (name,)).fetchone()
    return None if row is None else int(row[0])


def record(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """The slot and publication as they are now are ours (after creating them, or on the
    first start of a producer that kept no state yet): clears any problem."""
    conn.execute(
        f"INSERT INTO {STATE_TABLE} AS s (slot_name, publication_name, publication_oid, "
        "confirmed_ceiling) SELECT %s, %s, (SELECT oid FROM pg_publication WHERE pubname = %s),"
        " greatest(pg_current_wal_lsn(), (SELECT confirmed_flush_lsn FROM pg_replication_slots"
        " WHERE slot_name = %s)) + %s "
        "ON CONFLICT (slot_name) DO UPDATE SET publication_name = excluded.publication_name, "
        "publication_oid = excluded.publication_oid, "
        "confirmed_ceiling = excluded.confirmed_ceiling, problem = NULL, problem_detail = NULL,"
        " problem_at = NULL",
        (settings.slot_name, settings.publication_name, settings.publication_name,
         settings.slot_name, CEILING_SLACK))


def raise_ceiling(conn: psycopg.Connection[Any], settings: Settings, at_least: int) -> int:
    """Raise the recorded ceiling past ``at_least`` (an LSN); returns the new ceiling."""
    row = conn.execute(
        f"UPDATE {STATE_TABLE} SET confirmed_ceiling = greatest(confirmed_ceiling, "
        "pg_current_wal_lsn() + %s, %s::pg_lsn + %s) WHERE slot_name = %s "
        "RETURNING confirmed_ceiling::text",
        (CEILING_SLACK, pgoutput.lsn_to_str(at_least), CEILING_SLACK,
         settings.slot_name)).fetchone()
    return pgoutput.str_to_lsn(row[0]) if row else at_least + CEILING_SLACK


def _problem(kind: str, detail: str) -> CaptureBroken:
    return CaptureBroken(kind, detail, RESYNC_COMMAND)


def inspect(conn: psycopg.Connection[Any], settings: Settings, state: CaptureState | None,
            confirmed_at_most: int | None = None) -> CaptureBroken | None:
    """What is wrong with the recorded slot and publication (None: nothing, or nothing
    recorded yet). ``confirmed_at_most``: the exact bound of what this process let the slot
    confirm, when it has read the slot (a stream lost, then opened again). Does not look at
    a lost slot's WAL (the producer's ``_slot_lost``)."""
    if state is None:
        return None
    if state.problem is not None:
        return _problem(state.problem, state.problem_detail or state.problem)
    slot = conn.execute(
        "SELECT plugin, database = current_database(), confirmed_flush_lsn::text, "
        "restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (settings.slot_name,)).fetchone()
    name, pub = settings.slot_name, settings.publication_name
    if slot is None:
        return _problem("slot_dropped",
                        f"replication slot {name!r} was dropped: changes made since it "
                        "was dropped cannot be read, and rows deleted meanwhile would stay "
                        "live in the ERP")
    # A fact from the catalog before the heuristic below: the stream ends on a dropped
    # publication too, and an idle slot may be confirmed past our bound by then (F5).
    oid = _publication_oid(conn, pub)
    if oid is None:
        return _problem("publication_dropped",
                        f"publication {pub!r} was dropped: the slot cannot decode changes "
                        "made without it (PostgreSQL: 'publication does not exist')")
    confirmed = pgoutput.str_to_lsn(slot[2]) if slot[2] is not None else 0
    restart = pgoutput.str_to_lsn(slot[3]) if slot[3] is not None else 0
    # psycopg2 may report a keepalive's WAL end as flushed on its own, so a slot we read can
    # confirm a little past the bound; its restart_lsn cannot: it stays at or before the
    # first transaction we did not confirm. A slot created again starts both past the bound.
    if slot[0] != "pgoutput" or not slot[1] or confirmed > state.confirmed_ceiling or (
            confirmed_at_most is not None and confirmed > confirmed_at_most
            and restart > confirmed_at_most):
        return _problem("slot_replaced",
                        f"replication slot {name!r} is not the one this producer captured "
                        "through (dropped and created again: its confirmed position is past "
                        "anything the producer confirmed, or another plugin or database); "
                        "changes made in between were never read")
    if state.publication_oid is not None and oid != state.publication_oid:
        return _problem("publication_replaced",
                        f"publication {pub!r} was dropped and created again: the slot cannot "
                        "decode changes made in between")
    return None


def mark(conn: psycopg.Connection[Any], settings: Settings, problem: CaptureBroken) -> None:
    """Keep ``problem`` until resync ran (``status`` shows it)."""
    conn.execute(
        f"UPDATE {STATE_TABLE} SET problem = %s, problem_detail = %s, "
        "problem_at = coalesce(problem_at, now()) WHERE slot_name = %s AND problem IS NULL",
        (problem.kind, problem.detail, settings.slot_name))


def problems(conn: psycopg.Connection[Any], settings: Settings) -> list[str]:
    """What ``status`` must say about capture (empty: nothing), each with its recovery."""
    state = load(conn, settings.slot_name)
    if state is None:
        return []
    found = inspect(conn, settings, state)
    if found is not None:
        return [f"capture stopped: {found.detail}. Recover with `{RESYNC_COMMAND}` "
                "(new slot and publication as needed, full re-snapshot, and rows deleted in "
                "the CRM meanwhile marked deleted in the ERP)"]
    if state.resync_started_lsn is not None:
        return [f"a resync has not finished its delete pass (rows deleted in the CRM while "
                f"capture was stopped may still be live in the ERP): run `{RESYNC_COMMAND}` "
                "again once the consumers are running"]
    return []
