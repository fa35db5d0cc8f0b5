"""Events deleted from a topic before the consumer group applied them (finding F12).

A topic's log start can move past the group's committed offset: a ``retention.ms`` someone
set, ``kafka-delete-records``, a tiered-storage or cleanup mistake. kafka-python's
``auto_offset_reset='earliest'`` then skips to the log start without a word, and the CRM
changes in between never reach the ERP. The consumer runs with ``auto_offset_reset='none'``
instead: kafka-python raises ``OffsetOutOfRangeError`` naming the position it fetched (at
assignment, from the committed offset; mid-run, from the position a lagging consumer
reached), the consumer compares it with the partition's beginning offset (one ListOffsets
request on this rare path only), records the lost range here, logs ``records_lost``, counts
``crm_erp_sync_events_lost_total`` and goes on from the log start: the rest flows.

The range stays in ``sync.offset_gaps`` (the ERP's sync state, so it survives the consumer
and the offsets committed past it) and ``status`` names it until a ``crm-erp-sync reconcile``
over every entity, started after the gap was detected, finds nothing missing, extra or
differing (with ``--repair``: once the repair converged); that run marks it resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.pg import PgConn

# What an operator runs: the lost events' rows are read again from the CRM.
FIX = "crm-erp-sync reconcile --repair"


@dataclass(frozen=True, slots=True)
class OffsetGap:
    """Offsets ``[first_lost, next_kept)`` of ``topic[partition]`` were deleted unapplied."""

    topic: str
    partition: int
    first_lost: int
    next_kept: int

    @property
    def count(self) -> int:
        """How many offsets were lost (transaction markers included: an upper bound of the
        events)."""
        return self.next_kept - self.first_lost


def lost_range(topic: str, partition: int, position: int, log_start: int) -> OffsetGap | None:
    """The gap when the consumer's next offset ``position`` lies below the partition's
    ``log_start`` (its beginning offset): records ``[position, log_start)`` are gone.
    None when ``position`` is at or past the log start (an out-of-range position beyond the
    end is not a loss of unapplied records)."""
    if position < 0 or position >= log_start:
        return None
    return OffsetGap(topic, partition, position, log_start)


def record(conn: PgConn, group: str, gap: OffsetGap) -> None:
    """Keep ``gap`` in ``sync.offset_gaps`` in its own transaction on ``conn`` (the
    consumer's ERP connection). Idempotent: detected again (a restart before the offsets
    moved past it), the same first lost offset keeps one row, its end the furthest seen.
    Raises psycopg errors as they come (the caller maps transient ones)."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO sync.offset_gaps (consumer_group, topic, partition, first_lost, "
            "next_kept) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (consumer_group, topic, partition, first_lost) DO UPDATE "
            "SET next_kept = greatest(sync.offset_gaps.next_kept, EXCLUDED.next_kept)",
            (group, gap.topic, gap.partition, gap.first_lost, gap.next_kept))


def unresolved(conn: PgConn, group: str) -> list[dict[str, Any]]:
    """The group's unresolved gaps, oldest first: topic, partition, first_lost, next_kept,
    count, detected_at. Raises psycopg.errors.UndefinedTable on an ERP set up before the
    table existed."""
    rows = conn.execute(
        "SELECT topic, partition, first_lost, next_kept, next_kept - first_lost, detected_at "
        "FROM sync.offset_gaps WHERE consumer_group = %s AND resolved_at IS NULL "
        "ORDER BY detected_at, topic, partition", (group,)).fetchall()
    return [dict(zip(("topic", "partition", "first_lost", "next_kept", "count",
                      "detected_at"), r, strict=True)) for r in rows]


def resolve_before(conn: PgConn, started_at: datetime) -> int:
    """Mark resolved every gap detected before ``started_at`` (when a reconcile that found
    the ERP matching the CRM began reading): the CRM rows those events changed were read as
    they are now. Returns how many. Raises psycopg.errors.UndefinedTable as above."""
    cur = conn.execute(
        "UPDATE sync.offset_gaps SET resolved_at = clock_timestamp() "
        "WHERE resolved_at IS NULL AND detected_at < %s", (started_at,))
    return cur.rowcount


def attention_line(gap: dict[str, Any]) -> str:
    """The `status` line of one unresolved gap (a row of :func:`unresolved`)."""
    detected = gap["detected_at"]
    when = detected.strftime("%Y-%m-%d %H:%M:%S %Z") if isinstance(detected, datetime) \
        else str(detected)
    if gap["first_lost"] == 0:
        # recorded for a partition the group had no position on (newcomer10: a group renamed
        # or switched blue/green over an ERP another group keeps complete was told "missing")
        cause = ("the group had no position there (a new group, or one that never applied an "
                 "event of this partition) and the log no longer starts at 0")
        effect = ("unless another consumer group fed this ERP, the CRM changes they carried "
                  "are missing in it")
    else:
        cause = "retention or delete-records moved the log start past the group's position"
        effect = "the CRM changes they carried are missing in the ERP"
    return (f"events deleted from Kafka before they were applied: "
            f"{gap['topic']}[{gap['partition']}] offsets {gap['first_lost']}.."
            f"{gap['next_kept'] - 1} ({gap['count']} offset(s), transaction markers "
            f"included; detected {when}: {cause}); {effect}: run `{FIX}` (over all entities: "
            f"it marks the gap resolved once the ERP matches)")
