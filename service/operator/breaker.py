"""`crm-erp-sync resume`: clear the dead-letter circuit breaker of paused partitions.

The breaker's state is ``sync.breaker_trips`` in the ERP (see service/consumer/breaker.py);
running consumers read it every CRM_ERP_SYNC_BREAKER_POLL_S and resume the partitions whose
trip was resumed here. The resume is the audit record: who, when, why, on the trip's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.errors import ConfigError
from service.operator.common import connect
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
