"""Read-only views of the pipeline's state, shared by `status`, the demo and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from service import pg
from service.errors import StackUnavailable
from service.kafka_io import make_admin, make_consumer
from service.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    """A partition's offsets for the group: ``committed`` (None: the group has none there),
    the log's ``end`` and ``start`` (its beginning offset: records below it were deleted)."""

    topic: str
    partition: int
    committed: int | None
    end: int
    start: int = 0

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)

    @property
    def deleted_unapplied(self) -> int:
        """Offsets below the log start that the group had not applied (its committed offset,
        0 without one, is below ``start``): retention or delete-records removed them before
        a consumer reached them. The consumer records such a gap when it reaches the
        partition (``service.consumer.gaps``) and commits past it; until then only this
        tells."""
        return max(0, self.start - (self.committed or 0))


def group_lag(settings: Settings, topics: list[str] | None = None, *,
              log_start: bool = False) -> list[PartitionLag]:
    """The group's offsets on ``topics`` (the sales and market topics by default), one
    ``PartitionLag`` per partition. ``log_start``: also each partition's beginning offset
    (``PartitionLag.start``, else 0), one more ListOffsets request that only `status` needs,
    not the wait loops that poll this. Raises StackUnavailable when the broker cannot answer
    for the group."""
    topics = topics or [settings.sales_topic, settings.market_topic]
    admin = make_admin(settings)
    probe = make_consumer(settings, group_id=None)
    try:
        committed = admin.list_group_offsets(settings.consumer_group).get(
            settings.consumer_group, {})
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(probe.partitions_for_topic(t) or ())]
        ends = probe.end_offsets(tps)
        starts = probe.beginning_offsets(tps) if log_start else {}
    except KafkaError as exc:  # e.g. NotCoordinatorError while a restarted broker loads
        raise StackUnavailable(
            f"Kafka broker at {settings.kafka_bootstrap} cannot answer for the consumer "
            f"group yet ({type(exc).__name__}); try again in a moment") from exc
    finally:
        probe.close()
        admin.close()
    return [PartitionLag(tp.topic, tp.partition,
                         committed[tp].offset if tp in committed else None, ends[tp],
                         starts.get(tp, 0))
            for tp in tps]


# max_slot_wal_keep_size in bytes (the setting is in MB; -1: unlimited), read in the same
# query as the slot's row so that watching the slot stays one catalog query.
_KEEP_SIZE_SQL = ("(SELECT CASE WHEN setting::bigint < 0 THEN -1 ELSE setting::bigint * 1048576 "
                 "END FROM pg_settings WHERE name = 'max_slot_wal_keep_size')")

# Warn when the WAL the CRM may still write before the slot is in danger (safe_wal_size) is
# below this share of max_slot_wal_keep_size. At 20% there is still the time the CRM needs to
# write a fifth of the budget (hours on most servers, at least several checkpoints) to let
# capture catch up or raise the setting; later than that the next burst of writes (a bulk
# import, a VACUUM) can take the slot to 'unreserved' and then 'lost' (a full resync).
SAFE_WAL_MIN_SHARE = 0.2


def slot_state(settings: Settings) -> dict[str, Any] | None:
    """The producer's slot, read on a connection of its own (``read_slot``)."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        return read_slot(conn, settings.slot_name)


def read_slot(conn: Any, slot_name: str) -> dict[str, Any] | None:
    """A slot: active or not, how much WAL it keeps and has not confirmed (bytes), its
    ``wal_status`` (reserved, extended, unreserved, lost), ``safe_wal_bytes`` (WAL that can
    still be written before the slot is in danger; None when max_slot_wal_keep_size is -1)
    and ``keep_size_bytes`` (max_slot_wal_keep_size in bytes, -1: unlimited). None when the
    slot does not exist. One query, on ``conn`` (`status`'s, the producer's own session).

    A logical slot being created (``unconfirmed_bytes`` None: its confirmed_flush_lsn is NULL
    until PostgreSQL has waited for every transaction open when the creation began, in any
    database of the cluster) also has ``creating_s``: seconds since its creator's current
    command began (pg_stat_activity.query_start of the slot's active_pid; None when not
    visible to this role or no session holds the slot), and ``creating_waits`` (the
    creator's wait event, ``Lock/transactionid`` while it waits for a transaction).
    Raises psycopg.Error."""
    row = conn.execute(
        "SELECT s.active, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, s.wal_status, "
        f"s.safe_wal_size, {_KEEP_SIZE_SQL}, "
        "CASE WHEN s.confirmed_flush_lsn IS NULL "
        "THEN extract(epoch FROM clock_timestamp() - a.query_start)::float8 END, "
        "CASE WHEN s.confirmed_flush_lsn IS NULL THEN a.wait_event_type || '/' || a.wait_event "
        "END FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid "
        "WHERE s.slot_name = %s", (slot_name,)).fetchone()
    if row is None:
        return None
    out = {"active": row[0], "retained_wal_bytes": row[1], "unconfirmed_bytes": row[2],
           "wal_status": row[3], "safe_wal_bytes": row[4], "keep_size_bytes": row[5]}
    if row[2] is None:
        out.update(creating_s=row[6], creating_waits=row[7])
    return out


def slot_wal_danger(slot_name: str, wal_status: str | None, safe_wal_bytes: int | None,
                    keep_size_bytes: int | None) -> str | None:
    """What an operator must know before the slot loses WAL, from its pg_replication_slots
    row: None when nothing (a reserved or extended slot with room left, unlimited
    max_slot_wal_keep_size, or a slot already 'lost', which `status` reports with its own
    recovery). Otherwise one sentence: what it means and what to do. ``safe_wal_bytes`` and
    ``keep_size_bytes`` are bytes (None or -1 for keep size: unlimited)."""
    todo = ("let the slot's consumer catch up (if the producer is down, start it; if a long "
            "CRM transaction pins the slot, end it) or raise max_slot_wal_keep_size on the CRM")
    if wal_status == "unreserved":
        return (f"replication slot {slot_name} is UNRESERVED: it needs WAL beyond "
                "max_slot_wal_keep_size, which the CRM removes at its next checkpoint, and "
                "the slot is then LOST (capture stops until a full `crm-erp-sync resync`): "
                f"now {todo}")
    if (wal_status in ("reserved", "extended") and safe_wal_bytes is not None
            and keep_size_bytes is not None and keep_size_bytes > 0
            and safe_wal_bytes < SAFE_WAL_MIN_SHARE * keep_size_bytes):
        return (f"replication slot {slot_name} can keep only {max(safe_wal_bytes, 0):,} more "
                f"bytes of WAL (safe_wal_size, under {SAFE_WAL_MIN_SHARE:.0%} of "
                f"max_slot_wal_keep_size = {keep_size_bytes:,}): past that the CRM removes "
                f"the WAL it needs and the slot is lost (a full resync): {todo}")
    return None


# The oldest transaction holding an xid anywhere in the CRM's cluster (logical decoding's
# restart_lsn cannot pass a running transaction, whatever its database), or a prepared one
# (no session: pid NULL). Never its query text: it can quote personal data.
OLDEST_TRANSACTION_SQL = """
SELECT pid, state, age_s, database FROM (
    SELECT pid, state, extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age_s,
           datname AS database
    FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
    UNION ALL
    SELECT NULL, 'prepared', extract(epoch FROM clock_timestamp() - prepared)::float8, database
    FROM pg_prepared_xacts
) t ORDER BY age_s DESC NULLS LAST LIMIT 1"""
# What the SQL transport's producer reports of its peeks (service/cdc/producer.py), for status.
CAPTURE_COSTS_TABLE = "crm_erp_sync.capture_costs"
CAPTURE_COSTS_DDL = f"""CREATE TABLE IF NOT EXISTS {CAPTURE_COSTS_TABLE} (
    slot_name   text PRIMARY KEY,
    peek_s      float8 NOT NULL,
    backoff_s   float8 NOT NULL,
    measured_at timestamptz NOT NULL DEFAULT now()
)"""


def oldest_transaction(conn: pg.PgConn) -> dict[str, Any] | None:
    """The CRM transaction that pins the slot longest: ``{"pid": int | None (None: a
    prepared transaction), "state": str, "age_s": float, "database": str}``, or None."""
    row = conn.execute(OLDEST_TRANSACTION_SQL).fetchone()
    if row is None:
        return None
    return {"pid": row[0], "state": row[1], "age_s": float(row[2] or 0.0), "database": row[3]}


def capture_costs(conn: pg.PgConn, slot_name: str) -> dict[str, float] | None:
    """The SQL peek's last reported cost: ``{"peek_s", "backoff_s", "reported_s_ago"}``
    (seconds), or None (the streaming transport, or no report yet)."""
    exists = conn.execute("SELECT to_regclass(%s)", (CAPTURE_COSTS_TABLE,)).fetchone()
    if exists is None or exists[0] is None:
        return None
    row = conn.execute(
        f"SELECT peek_s, backoff_s, extract(epoch FROM clock_timestamp() - measured_at)::float8 "
        f"FROM {CAPTURE_COSTS_TABLE} WHERE slot_name = %s", (slot_name,)).fetchone()
    if row is None:
        return None
    return {"peek_s": row[0], "backoff_s": row[1], "reported_s_ago": row[2]}


def caught_up(settings: Settings, crm_lsn: str) -> bool:
    """True when the slot has confirmed past crm_lsn and the group has no lag."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = %s", (crm_lsn, settings.slot_name)).fetchone()
    if not row or not row[0]:
        return False
    return all(p.lag == 0 for p in group_lag(settings))


def current_lsn(settings: Settings) -> str:
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def pending_snapshots(settings: Settings) -> int:
    """Snapshots requested and not finished (0 before the producer created its tables)."""
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        row = conn.execute("SELECT to_regclass('crm_erp_sync.snapshots') IS NOT NULL"
                           ).fetchone()
        if not row or not row[0]:
            return 0
        count = conn.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                             "WHERE state = 'pending'").fetchone()
    return int(count[0]) if count else 0
