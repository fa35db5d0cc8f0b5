"""`crm-erp-sync resume`: clear the dead-letter circuit breaker of paused partitions.

The breaker's state is ``sync.breaker_trips`` in the ERP (see service/consumer/breaker.py);
running consumers read it every CRM_ERP_SYNC_BREAKER_POLL_S and resume the partitions whose
trip was resumed here. The resume is the audit record: who, when, why, on the trip's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.errors import ConfigError
from service.operator.common import broker_consumer, connect
from service.pg import PgConn
from service.settings import Settings

TRIP_COLUMNS = ("trip_id", "topic", "partition", "tripped_at", "messages", "dead_letters",
                "max_ratio", "from_offset", "through_offset", "message", "last_reasons")


@dataclass(frozen=True)
class BreakerTrip:
    trip_id: int
    topic: str
    partition: int
    tripped_at: datetime
    messages: int
    dead_letters: int
    max_ratio: float
    from_offset: int
    through_offset: int
    message: str
    last_reasons: list[str]

    @property
    def ratio(self) -> float:
        return self.dead_letters / self.messages if self.messages else 0.0

    @property
    def name(self) -> str:
        return f"{self.topic}[{self.partition}]"


def parse_partition(text: str) -> tuple[str, int]:
    """'crm.sales:1' -> ('crm.sales', 1). Raises ConfigError."""
    topic, sep, number = text.rpartition(":")
    if not sep or not topic or not number.isdigit():
        raise ConfigError("--partition", f"expected TOPIC:PARTITION (e.g. crm.sales:1), got "
                                         f"{text!r}")
    return topic, int(number)


def open_trips(conn: PgConn, group: str) -> list[BreakerTrip]:
    return [BreakerTrip(*row) for row in conn.execute(
        f"SELECT {', '.join(TRIP_COLUMNS)} FROM sync.breaker_trips "
        "WHERE consumer_group = %s AND state = 'tripped' ORDER BY topic, partition",
        (group,)).fetchall()]


def resume(settings: Settings, partitions: list[tuple[str, int]] | None, *, actor: str,
           reason: str) -> tuple[list[BreakerTrip], list[tuple[str, int]]]:
    """Resume the named partitions (None: every tripped one). Returns (resumed, named but not
    tripped)."""
    with connect(settings, "erp", autocommit=False) as conn, conn.transaction():
        tripped = {(t.topic, t.partition): t for t in open_trips(conn, settings.consumer_group)}
        wanted = list(tripped) if partitions is None else partitions
        chosen = [tripped[p] for p in wanted if p in tripped]
        not_tripped = [p for p in wanted if p not in tripped]
        if chosen:
            conn.execute(
                "UPDATE sync.breaker_trips SET state = 'resumed', resumed_at = clock_timestamp(),"
                " resumed_by = %s, resume_reason = %s "
                "WHERE trip_id = ANY(%s) AND state = 'tripped'",
                (actor, reason, [t.trip_id for t in chosen]))
    return chosen, not_tripped


# ---- `crm-erp-sync pause` / resume of an operator's pause ------------------------------------
@dataclass(frozen=True)
class Pause:
    topic: str
    partition: int
    paused_at: datetime
    paused_by: str
    reason: str

    @property
    def name(self) -> str:
        return f"{self.topic}[{self.partition}]"


def consumed_partitions(settings: Settings) -> list[tuple[str, int]]:
    """Every partition of the topics the group consumes, as the broker knows them. Raises
    BrokerUnreachable (exit 3) when no broker answers within ``BROKER_CHECK_S``."""
    probe = broker_consumer(settings, "partitions unknown, nothing changed", group_id=None)
    try:
        return [(t, p) for t in (settings.sales_topic, settings.market_topic)
                for p in sorted(probe.partitions_for_topic(t) or ())]
    finally:
        probe.close()


def check_partitions(settings: Settings, partitions: list[tuple[str, int]] | None
                     ) -> list[tuple[str, int]]:
    """The named partitions (None: every one), each checked against the broker's partitions
    of the group's topics. Raises ConfigError (exit 2) naming the unknown ones and the
    valid ones."""
    known = consumed_partitions(settings)
    wanted = known if partitions is None else partitions
    unknown = [f"{t}:{p}" for t, p in wanted if (t, p) not in known]
    if unknown:
        raise ConfigError("--partition", f"not consumed by {settings.consumer_group}: "
                          f"{', '.join(unknown)} (valid: "
                          f"{', '.join(f'{t}:{p}' for t, p in known)})")
    return wanted


def pause(settings: Settings, partitions: list[tuple[str, int]] | None, *, actor: str,
          reason: str) -> tuple[list[Pause], list[tuple[str, int]]]:
    """Pause consumption of the named partitions (None: all) for the whole group, until
    ``resume``; running consumers pause them within CRM_ERP_SYNC_BREAKER_POLL_S, and a
    consumer that starts later starts with them paused. Returns (paused now, already
    paused). Raises ConfigError for a partition the group does not consume."""
    wanted = check_partitions(settings, partitions)
    with connect(settings, "erp", autocommit=False) as conn, conn.transaction():
        rows = conn.execute(
            "INSERT INTO sync.operator_pauses (consumer_group, topic, partition, paused_by, "
            "reason) SELECT %s, t, p, %s, %s FROM unnest(%s::text[], %s::int[]) AS w(t, p) "
            "ON CONFLICT (consumer_group, topic, partition) WHERE state = 'paused' "
            "DO NOTHING RETURNING topic, partition, paused_at, paused_by, reason",
            (settings.consumer_group, actor, reason, [t for t, _ in wanted],
             [p for _, p in wanted])).fetchall()
    done = [Pause(*r) for r in rows]
    new = {(p.topic, p.partition) for p in done}
    return sorted(done, key=lambda p: (p.topic, p.partition)), [w for w in wanted
                                                                 if w not in new]


def open_pauses(conn: PgConn, group: str) -> list[Pause]:
    return [Pause(*r) for r in conn.execute(
        "SELECT topic, partition, paused_at, paused_by, reason FROM sync.operator_pauses "
        "WHERE consumer_group = %s AND state = 'paused' ORDER BY topic, partition",
        (group,)).fetchall()]


def resume_pauses(settings: Settings, partitions: list[tuple[str, int]] | None, *,
                  actor: str, reason: str) -> list[Pause]:
    """End an operator's pause of the named partitions (None: all); audited on the row."""
    with connect(settings, "erp", autocommit=False) as conn, conn.transaction():
        current = open_pauses(conn, settings.consumer_group)
        chosen = [p for p in current
                  if partitions is None or (p.topic, p.partition) in partitions]
        if chosen:
            conn.execute(
                "UPDATE sync.operator_pauses SET state = 'resumed', "
                "resumed_at = clock_timestamp(), resumed_by = %s, resume_reason = %s "
                "WHERE consumer_group = %s AND state = 'paused' AND (topic, partition) IN "
                "(SELECT * FROM unnest(%s::text[], %s::int[]))",
                (actor, reason, settings.consumer_group, [p.topic for p in chosen],
                 [p.partition for p in chosen]))
    return chosen
