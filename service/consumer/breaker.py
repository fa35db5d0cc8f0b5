"""The dead-letter circuit breaker in a running consumer: what happens when a partition trips.

The ratio itself is ``policy.CircuitBreaker`` (pure). This module does the effects: a tripped
partition is paused (kafka-python ``consumer.pause``) and rewound to its first unapplied
message, while the other partitions go on; the trip is written to ``sync.breaker_trips`` in
the ERP, so that ``status`` shows it, every consumer of the group keeps it paused (also
after a restart or a rebalance), and ``crm-erp-sync resume`` can clear it. Running consumers
read that table every ``breaker_poll_s`` and resume what an operator resumed. ``/readyz``
says "degraded" (503) and ``crm_erp_sync_breaker_open`` is 1 while a partition is paused.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from kafka import TopicPartition

from service.consumer.policy import CircuitBreaker, DlqLimit, Partition, Trip
from service.errors import DecodeError, ErpNotSetUp, Permanent, Retryable, field_of
from service.health import Health
from service.metrics import ConsumerMetrics
from service.pg import PgConn
from service.settings import Settings

log = structlog.get_logger("consumer")

LAST_REASONS = 5


@dataclass(frozen=True)
class OpenTrip:
    topic: str
    partition: int
    from_offset: int
    through_offset: int
    message: str


def last_reasons(errors: Sequence[Permanent], n: int = LAST_REASONS) -> list[str]:
    """The last n distinct "ErrorClass: what" of a slice, for the trip's record (the
    operator's ``status`` screen, which may be pasted or captured anywhere): "what" is the
    field for a failure about one (``field_of``: a MappingError's reason may quote the
    CRM's word, and a status column can hold a name and a phone), the reason for a
    DecodeError (our own text about the bytes), else nothing (an ERP's refusal may quote
    the value it refused). The reasons are in the dead letters (``dlq show``)."""
    out: list[str] = []
    for err in reversed(errors):
        field = field_of(err)
        name = type(err).__name__
        text = (f"{name}: {field}" if field else f"{name}: {err.reason}"
                if isinstance(err, DecodeError) else name)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def last_errors(errors: Sequence[Permanent], n: int = LAST_REASONS) -> list[str]:
    """The last n distinct "ErrorClass" or "ErrorClass: field" of a slice, for the trip's
    log line: a reason may quote the CRM's word for a value (an unknown status, and a
    status column can hold a name and a phone), so the log names the field (a MappingError's,
    a capture letter's column) and the class only; the reasons are in the dead letters."""
    out: list[str] = []
    for err in reversed(errors):
        field = field_of(err)
        text = f"{type(err).__name__}: {field}" if field else type(err).__name__
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


class BreakerControl:
    def __init__(self, settings: Settings, limit: DlqLimit, metrics: ConsumerMetrics,
                 health: Health, connect: Callable[[], PgConn]) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(limit)
        self.metrics = metrics
        self.health = health
        self._connect = connect
        self.open: dict[Partition, OpenTrip] = {}
        # Paused by an operator (`crm-erp-sync pause`, sync.operator_pauses): who and why.
        self.paused: dict[Partition, str] = {}
        self._last_refresh = float("-inf")

    # ---- in the pipeline (Breaker stage) ------------------------------------------------------
    def is_open(self, partition: Partition) -> bool:
        """Tripped, or paused by an operator: its messages are not applied."""
        return partition in self.open or partition in self.paused

    def hold_back(self, consumer: Any, partition: Partition, first_offset: int) -> None:
        """Messages of an open partition were polled anyway (before its pause, or after a
        rebalance reset it): pause it and rewind so that they are consumed after the resume."""
        tp = TopicPartition(*partition)
        if consumer is None or tp not in (consumer.assignment() or set()):
            return  # rebalanced away meanwhile: the new owner starts from the committed offset
        consumer.pause(tp)
        consumer.seek(tp, first_offset)

    def trip(self, consumer: Any, trip: Trip, first_offset: int, last_offset: int,
             errors: Sequence[Permanent]) -> None:
        partition = (trip.topic, trip.partition)
        tp = TopicPartition(*partition)
        high = consumer.highwater(tp) if consumer is not None else None
        # The operator's resume accepts what was in the partition when it tripped.
        through = max(last_offset, (high or 0) - 1)
        reasons = last_reasons(errors)
        message = trip.message()
        try:
            conn = self._connect()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO sync.breaker_trips (consumer_group, topic, partition, "
                    "messages, dead_letters, max_ratio, min_messages, window_s, from_offset, "
                    "through_offset, message, last_reasons) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (consumer_group, topic, partition) WHERE state = 'tripped' "
                    "DO NOTHING",
                    (self.settings.consumer_group, trip.topic, trip.partition, trip.messages,
                     trip.dead_letters, trip.limit.max_ratio, trip.limit.min_messages,
                     trip.limit.window_s, first_offset, through, message, reasons))
        except psycopg.OperationalError as exc:
            raise Retryable(f"ERP: recording the breaker trip: {type(exc).__name__}") from exc
        self.hold_back(consumer, partition, first_offset)
        self.open[partition] = OpenTrip(trip.topic, trip.partition, first_offset, through,
                                        message)
        self.metrics.breaker_trips.labels(trip.topic, str(trip.partition)).inc()
        self._publish()
        log.error("circuit_breaker_tripped", topic=trip.topic, partition=trip.partition,
                  ratio=round(trip.ratio, 4), messages=trip.messages,
                  dead_letters=trip.dead_letters, limit=trip.limit.max_ratio,
                  from_offset=first_offset, message=message,
                  last_errors=last_errors(errors),
                  resume=f"crm-erp-sync resume --partition {trip.topic}:{trip.partition} "
                         "--reason '...'")

    # ---- in the run loop -------------------------------------------------------------------
    def refresh(self, consumer: Any, *, force: bool = False) -> None:
        """Every breaker_poll_s: read the group's breaker state; pause what is tripped (by us
        or another member, before a restart too) and resume what an operator resumed."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.settings.breaker_poll_s:
            return
        self._last_refresh = now
        try:
            conn = self._connect()
            with conn.transaction():
                rows = conn.execute(
                    "SELECT DISTINCT ON (topic, partition) topic, partition, state, "
                    "from_offset, through_offset, message FROM sync.breaker_trips "
                    "WHERE consumer_group = %s ORDER BY topic, partition, trip_id DESC",
                    (self.settings.consumer_group,)).fetchall()
                pauses = conn.execute(
                    "SELECT topic, partition, paused_by, reason FROM sync.operator_pauses "
                    "WHERE consumer_group = %s AND state = 'paused'",
                    (self.settings.consumer_group,)).fetchall()
        except psycopg.errors.UndefinedTable as exc:
            raise ErpNotSetUp("sync.breaker_trips table") from exc
        except psycopg.OperationalError as exc:
            raise Retryable(f"ERP: reading the breaker state: {type(exc).__name__}") from exc
        tripped: dict[Partition, OpenTrip] = {}
        for topic, partition, state, from_offset, through, message in rows:
            key = (topic, partition)
            if state == "tripped":
                tripped[key] = OpenTrip(topic, partition, from_offset, through, message)
            else:
                self.breaker.resumed(key, through)
        assigned = set(consumer.assignment() or ()) if consumer is not None else set()
        paused = {(t, p): f"{t}[{p}] paused by {who}: {why}" for t, p, who, why in pauses}
        for key, was in list(self.open.items()):
            if key in tripped:
                continue
            del self.open[key]
            with contextlib.suppress(KeyError):  # never set in this process
                self.metrics.breaker_open.remove(key[0], str(key[1]))
            tp = TopicPartition(*key)
            if tp in assigned and key not in paused:
                consumer.resume(tp)
            log.warning("circuit_breaker_resumed", topic=key[0], partition=key[1],
                        from_offset=was.from_offset)
        for key in list(self.paused):
            if key in paused:
                continue
            del self.paused[key]
            with contextlib.suppress(KeyError):
                self.metrics.paused.remove(key[0], str(key[1]))
            tp = TopicPartition(*key)
            if tp in assigned and key not in tripped:
                consumer.resume(tp)
            log.warning("consumption_resumed", topic=key[0], partition=key[1])
        for key, why in paused.items():
            if key not in self.paused:
                log.warning("consumption_paused_by_operator", topic=key[0], partition=key[1])
            self.paused[key] = why
            tp = TopicPartition(*key)
            if tp in assigned:
                consumer.pause(tp)
        for key, trip in tripped.items():
            self.open[key] = trip
            tp = TopicPartition(*key)
            if tp in assigned:
                consumer.pause(tp)
        self._publish()

    def repause(self, consumer: Any) -> None:
        """After something resumed every partition (the transient-failure wait)."""
        assigned = set(consumer.assignment() or ())
        paused = [TopicPartition(*k) for k in {*self.open, *self.paused}
                  if TopicPartition(*k) in assigned]
        if paused:
            consumer.pause(*paused)

    def _publish(self) -> None:
        for topic, partition in self.open:
            self.metrics.breaker_open.labels(topic, str(partition)).set(1)
        for topic, partition in self.paused:
            self.metrics.paused.labels(topic, str(partition)).set(1)
        self.health.set_degraded([t.message for t in self.open.values()])
        self.health.set_operator_paused(list(self.paused.values()))
