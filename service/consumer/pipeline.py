"""The ERP applier: poll -> decode -> transform -> apply -> commit.

Stages share one small interface (``Stage.submit(batch)`` then ``next_step``), as in arroyo.
A message that fails permanently is marked on its envelope and carried to the end, where the
dead letters are flushed to the broker before the ERP transaction commits, and the offsets
are committed only after that. A transient failure (``Retryable``) rolls the ERP transaction
back, pauses the partitions, waits with backoff and re-processes the same messages.

Per-key order and gaps ("hold the key"): when a message of a key (a customer) is
dead-lettered, the events of that key that follow are not applied over the gap: they are held
in ``sync.held_events`` (in the same ERP transaction, so nothing is lost) until the dead letter
is redriven or discarded. An order whose customer is not in the ERP yet is held the same way
and applied when the customer arrives, or dead-lettered after ``orphan_hold_s``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
import structlog
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    LogTruncationError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)

from service import pg
from service.avro import SchemaRegistry
from service.cdc import dead_letters as capture_letters
from service.consumer import dlq, gaps
from service.consumer.breaker import BreakerControl
from service.consumer.mappings_watch import MappingsWatcher
from service.consumer.membership import Membership
from service.consumer.policy import BatchPolicy, DlqLimit, RetryPolicy
from service.consumer.throttle import RateLimit
from service.erp.changes import (
    ErpChange,
    line_currency_errors,
    line_currency_lookups,
    to_erp,
)
from service.erp.mappings import Mappings
from service.erp.privileges import (
    README_GRANTS,
    Missing,
    describe,
    grant_sql,
    missing_erp_grants,
)
from service.erp.target import ErpTarget, Status, make_target
from service.errors import (
    ApplyError,
    ConfigError,
    ConnectionLost,
    DatabaseUnreachable,
    DecodeError,
    Permanent,
    PrivilegeMissing,
    Retryable,
    StackUnavailable,
    field_of,
)
from service.faults import transient
from service.health import Health, serve
from service.kafka_io import (
    close_producer,
    make_admin,
    make_consumer,
    make_producer,
    missing_topics,
)
from service.metrics import UNKNOWN_KIND, ConsumerMetrics
from service.pg import PgConn
from service.settings import Settings

log = structlog.get_logger("consumer")

# How long a failed dead-letter send waits for a broker to say whether the dead-letter topic
# exists (ErpApplier._dlq_send_failed): a broker that is down has already cost max_block_ms.
DLQ_TOPIC_CHECK_MS = 5_000

# Transient by class: the connection, deadlocks and serialization failures are all
# OperationalError subclasses in psycopg 3.
TRANSIENT_PG = (psycopg.OperationalError, psycopg.errors.DeadlockDetected,
                psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable)


@dataclass(slots=True)
class Message:
    """What we need of a consumed record (kafka-python's ConsumerRecord, or a held one)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    held_id: int | None = None


@dataclass(slots=True)
class Envelope:
    msg: Message
    kind: str = ""
    record: dict[str, Any] | None = None
    change: ErpChange | None = None
    error: Permanent | None = None
    held: str | None = None  # reason when held back instead of applied
    letter_exists: bool = False  # failed, but its dead letter exists already (a replay)


@dataclass
class Batch:
    envelopes: list[Envelope]
    dead_letters: list[dlq.DeadLetter] = field(default_factory=list)


class Stage(Protocol):
    def submit(self, batch: Batch) -> None: ...


class Decode:
    def __init__(self, registry: SchemaRegistry, next_step: Stage) -> None:
        self.registry = registry
        self.next_step = next_step

    def submit(self, batch: Batch) -> None:
        for env in batch.envelopes:
            if env.msg.value is None:
                env.error = DecodeError("message has no value (a tombstone?)")
                continue
            if capture_letters.is_marker(env.msg.value):
                # The producer could not make this change an event: its letter is already
                # on the dead-letter topic; here it is recorded and its key held.
                try:
                    env.error = capture_letters.read_marker(env.msg.value)
                except (ValueError, KeyError, TypeError):
                    env.error = DecodeError("malformed capture dead-letter marker")
                continue
            try:
                env.kind, env.record = self.registry.decode(env.msg.value)
            except Permanent as exc:
                env.error = exc
        self.next_step.submit(batch)


class Transform:
    def __init__(self, mappings: Mappings, next_step: Stage) -> None:
        self.mappings = mappings
        self.next_step = next_step

    def submit(self, batch: Batch) -> None:
        for env in batch.envelopes:
            if env.error is not None or env.record is None:
                continue
            try:
                env.change = to_erp(env.kind, env.record, self.mappings)
            except Permanent as exc:
                env.error = exc
        self.next_step.submit(batch)


class Apply:
    """One ERP transaction per batch; dead letters flushed before it commits."""

    def __init__(self, applier: ErpApplier, next_step: Stage) -> None:
        self.applier = applier
        self.next_step = next_step

    def submit(self, batch: Batch) -> None:
        self.applier.apply_batch(batch)
        self.next_step.submit(batch)


# How often, at most, the offsets of applied batches are committed to the group while
# batches keep coming. A commit is a broker round trip on kafka-python's IO thread; at a
# steady 200 changes/s every poll brings one event, and committing each batch cost about a
# fifth of a consumer's CPU. Offsets are still committed only after their batch's ERP
# transaction; what a crash or a rebalance leaves uncommitted (at most this long's batches)
# is consumed again, which the position guard, the dead-letter records and the held-event
# keys make harmless, as for the batch in flight.
COMMIT_EVERY_S = 1.0
# The last commit, on stop, waits at most this long for a broker that is away (the stop
# has a bound, CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S; what stays uncommitted is re-applied).
FINAL_COMMIT_TIMEOUT_MS = 5_000


class CommitOffsets:
    """Commits the offsets of applied batches: the first batch after a quiet spell at once,
    then at most every ``every_s`` (pending ones on :meth:`flush`: when a poll comes back
    empty, before a caught-up check, and on stop)."""

    def __init__(self, consumer: Any, every_s: float = COMMIT_EVERY_S) -> None:
        self.consumer = consumer
        self.every_s = every_s
        self.pending: dict[TopicPartition, OffsetAndMetadata] = {}
        self._last = float("-inf")

    def submit(self, batch: Batch) -> None:
        pending = self.pending
        for env in batch.envelopes:
            if env.msg.held_id is not None:
                continue
            tp = TopicPartition(env.msg.topic, env.msg.partition)
            if tp not in pending or pending[tp].offset <= env.msg.offset:
                pending[tp] = OffsetAndMetadata(env.msg.offset + 1, "", -1)
        if pending and time.monotonic() - self._last >= self.every_s:
            self.flush()

    def skip_to(self, tp: TopicPartition, offset: int) -> None:
        """Commit ``offset`` for ``tp`` with the next flush (unless a later one is pending):
        the records below it were deleted from the topic and their gap recorded, so the
        group's offset (and the lag `status` shows) moves past them without an event."""
        if tp not in self.pending or self.pending[tp].offset < offset:
            self.pending[tp] = OffsetAndMetadata(offset, "", -1)

    def flush(self, timeout_ms: int | None = None) -> None:
        """Commit what is pending, for the partitions still assigned (a partition a
        rebalance took away is its new owner's to commit), waiting at most ``timeout_ms``
        (None: kafka-python's request timeout). A refused or timed-out commit is logged."""
        if not self.pending or self.consumer is None:
            return
        owned = set(self.consumer.assignment() or ())
        offsets = {tp: o for tp, o in self.pending.items() if tp in owned}
        self.pending = {}
        self._last = time.monotonic()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=timeout_ms)
        except CommitFailedError as exc:
            # Rebalanced away: the new owner re-applies; positions make that harmless.
            log.warning("commit_failed_after_rebalance", error=str(exc))
        except KafkaError as exc:
            # The broker went away after the ERP committed: commits are cumulative, so the
            # next one covers these offsets; if none comes, the batch is consumed again and
            # positions make that harmless. Retrying the batch would re-send its dead letters.
            log.warning("offset_commit_failed", error=type(exc).__name__)


# Event kinds whose event carries the whole row: a newer one that maps replaces an older one.
FULL_STATE_KINDS = frozenset({"customer", "market_demand"})

# The message columns of sync.held_events, in the order _held_message reads them.
HELD_MESSAGE = 'topic, partition, "offset", msg_timestamp, msg_key, msg_value'

# True while the held event ``h`` (a sync.held_events row held 'key_blocked') must still wait:
# its key has a dead letter before it that is unresolved, or superseded by a newer letter of
# the same row that is (a re-snapshot replaced it; the row's trouble began at the first).
# What follows a resolved letter but precedes the key's next one is released (newcomer8's
# N10: it waited for that later letter too). Shared by the release paths and `status`.
STILL_BLOCKED = (
    "EXISTS (SELECT 1 FROM sync.dead_letters d WHERE d.topic = h.topic "
    "AND d.msg_key IS NOT DISTINCT FROM h.msg_key "
    'AND ARRAY[d.partition::bigint, d."offset"] < ARRAY[h.partition::bigint, h."offset"] '
    "AND (d.state IN ('open', 'failed_again') OR d.state = 'superseded' AND EXISTS ("
    "SELECT 1 FROM sync.dead_letters n WHERE n.topic = d.topic AND n.msg_key = d.msg_key "
    "AND n.event_kind = d.event_kind AND n.state IN ('open', 'failed_again'))))")


def _held_message(row: Any, held_id: int | None = None) -> Message:
    """A held (or dead-lettered) message back from a row that starts with HELD_MESSAGE."""
    topic, partition, offset, timestamp, key, value = row[:6]
    return Message(topic, partition, offset, timestamp, key, value, held_id=held_id)


def prepare(registry: SchemaRegistry, mappings: Mappings, msgs: list[Message]) -> Batch:
    """Messages outside a poll (held, redriven, dry-run) through the same decode and
    transform stages as the live pipeline."""
    batch = Batch([Envelope(m) for m in msgs])
    Decode(registry, Transform(mappings, _Collect())).submit(batch)
    return batch


def _dead_letter(msg: Message, error: Permanent, event_id: str | None = None
                 ) -> dlq.DeadLetter:
    return dlq.DeadLetter(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key,
                          msg.value, error, event_id=event_id)


def _audit_superseded(conn: PgConn, letter_ids: list[int], why: str) -> None:
    """One ``supersede`` action by the consumer per letter, in sync.dead_letter_actions."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO sync.dead_letter_actions (dead_letter_id, action, actor, reason, "
            "outcome) VALUES (%s, 'supersede', 'consumer', %s, 'superseded')",
            [(i, why) for i in letter_ids])


def _envelope_event_id(env: Envelope) -> str | None:
    """The producer's event id of a decoded event or of a capture letter's marker; None when
    the message did not decode."""
    if env.record is not None:
        eid = env.record.get("event_id")
        return str(eid) if eid else None
    if isinstance(env.error, capture_letters.CaptureDeadLetter):
        return env.error.event_id or None
    return None


class ErpApplier:
    """Applies envelopes to the ERP in one transaction, holding and dead-lettering."""

    def __init__(self, settings: Settings, registry: SchemaRegistry, mappings: Mappings,
                 dlq_producer: Any | None = None,
                 metrics: ConsumerMetrics | None = None,
                 target: ErpTarget | None = None) -> None:
        self.settings = settings
        # Where changes are applied (CRM_ERP_SYNC_ERP_TARGET); the sync state (held events,
        # dead letters) is in the database of erp_dsn whatever the target.
        self.target = target if target is not None else make_target(settings, mappings)
        self.registry = registry
        self.mappings = mappings
        self._dlq_producer = dlq_producer
        self.metrics = metrics or ConsumerMetrics()
        self.conn: PgConn | None = None
        self.applied = 0
        self.dead_lettered = 0
        self.held = 0

    @property
    def dlq_producer(self) -> Any:
        if self._dlq_producer is None:
            self._dlq_producer = make_producer(self.settings, client_id="crm-erp-sync-dlq")
        return self._dlq_producer

    def connect(self) -> PgConn:
        """The ERP session, opened if there is none (or it broke). A new session first
        asks the catalog whether the role holds the grants the configured target writes
        with (``service.erp.privileges``: one query), then attaches the target.

        Raises PrivilegeMissing (a ConfigError: exit 2) naming the ERP role, every table
        and privilege it lacks and the GRANTs (newcomer9 F6: rather than failing on the
        first batch at every restart, with advice about the CRM's capture role), other
        ConfigErrors (credentials, a missing database), and Retryable when the ERP cannot
        be reached."""
        if self.conn is None or self.conn.closed or self.conn.broken:
            try:
                # Wrong credentials or a missing database (ConfigError) are not retried.
                self.conn = pg.connect(self.settings.erp_dsn, "ERP", autocommit=False)
            except DatabaseUnreachable as exc:
                raise Retryable(str(exc)) from exc
            conn = self.conn
            try:
                self._attach(conn)
            except PrivilegeMissing:
                self.conn = None  # checked again at the next connect
                conn.close()
                raise
        return self.conn

    def _attach(self, conn: PgConn) -> None:
        try:
            missing = missing_erp_grants(conn, target=self.settings.erp_target)
            conn.rollback()  # the query's implicit transaction (autocommit is off)
            if missing:
                raise self._grants_missing(
                    conn, missing, "apply changes (checked when connecting, before anything "
                    "is applied)")
            with conn.transaction():
                self.target.attach(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise self._refused(conn, exc, "attach the ERP target") from exc
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc

    def _grants_missing(self, conn: PgConn, missing: list[Missing],
                        action: str) -> PrivilegeMissing:
        return pg.privilege_missing(
            conn, "ERP", f"{action}: it lacks {describe(missing)}",
            f"{' '.join(grant_sql(missing, conn.info.user))} ({README_GRANTS})")

    def _refused(self, conn: PgConn, exc: psycopg.errors.InsufficientPrivilege,
                 action: str) -> PrivilegeMissing:
        """A statement PostgreSQL refused for lack of a privilege (a grant revoked since
        the session's check): the PrivilegeMissing naming the ERP role and, asked of the
        catalog again, each table and privilege it lacks now; else PostgreSQL's own words
        ("permission denied for table t": an object, never a value)."""
        primary = exc.diag.message_primary or "permission denied"
        try:
            conn.rollback()  # a refused statement outside conn.transaction() fails it
            missing = missing_erp_grants(conn, target=self.settings.erp_target)
            conn.rollback()
        except psycopg.Error:
            missing = []
        if missing:
            return self._grants_missing(conn, missing, f"{action} ({primary})")
        return pg.privilege_missing(conn, "ERP", f"{action} ({primary})",
                                    f"grant it to {{role}} ({README_GRANTS})")

    def use_mappings(self, mappings: Mappings) -> None:
        """Map with a reloaded mappings file from now on (held and redriven events too) and
        update the ERP's status effects from it. Raises Retryable (ERP unreachable)."""
        self.mappings = mappings
        self.target.use_mappings(mappings)
        conn = self.connect()
        try:
            with conn.transaction():
                try:
                    self.target.attach(conn)
                except ConfigError as exc:
                    # A base unit changed: the database refuses differences in the new unit
                    # (stock_delta_in_base_unit) until `stock recount` has run.
                    log.error("stock_units_differ", problem=exc.problem)
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc

    def apply_batch(self, batch: Batch) -> None:
        started = time.monotonic()
        try:
            conn = self.connect()
            with conn.transaction():
                self._apply_in_txn(conn, batch)
                self._publish_dead_letters(conn, batch)
                self._supersede_held(conn, {(e.msg.topic, e.msg.key) for e in batch.envelopes
                                            if e.held == "key_blocked"})
        except psycopg.errors.InsufficientPrivilege as exc:
            assert self.conn is not None  # connect() names its own refusals
            raise self._refused(self.conn, exc, "apply a batch") from exc
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}: {exc}".strip()) from exc
        except KafkaError as exc:
            raise self._dlq_send_failed(exc) from exc
        except StackUnavailable as exc:  # the DLQ producer could not be built: broker down
            raise ConnectionLost("broker (dead-letter topic) unreachable") from exc
        self.applied += sum(1 for e in batch.envelopes if e.error is None and not e.held)
        self.held += sum(1 for e in batch.envelopes if e.held)
        self._observe(batch, time.monotonic() - started)

    def _observe(self, batch: Batch, duration_s: float) -> None:
        """Metrics of a committed batch: counts by topic and kind, the batch's duration, and
        each applied event's delay from its CRM commit to this ERP commit."""
        m = self.metrics
        now = time.time()
        m.batch_duration.observe(duration_s)
        consumed: list[tuple[str, str]] = []
        applied: list[tuple[str, str]] = []
        held: list[tuple[str, str]] = []
        # The histogram's child per topic is looked up once per batch, not per event
        # (``labels`` takes a lock and checks the label values each call).
        delays: dict[str, Any] = {}
        for env in batch.envelopes:
            msg = env.msg
            labels = (msg.topic, env.kind or UNKNOWN_KIND)
            if msg.held_id is None:
                consumed.append(labels)
            if env.held:
                held.append(labels)
            elif env.error is None:
                applied.append(labels)
                source = env.record.get("source") if env.record else None
                commit_time = source.get("commit_time") if source else None
                if commit_time is not None:
                    child = delays.get(msg.topic)
                    if child is None:
                        child = delays[msg.topic] = m.end_to_end.labels(msg.topic)
                    child.observe(max(0.0, now - commit_time.timestamp()))
        m.count(m.consumed, consumed)
        m.count(m.applied, applied)
        m.count(m.held, held)
        self._count_dead_letters(batch.dead_letters)

    def _count_dead_letters(self, letters: list[dlq.DeadLetter]) -> None:
        self.metrics.count(self.metrics.dead_lettered, (
            (d.topic, self._kind_of(d.value), d.error.stage) for d in letters))

    def _kind_of(self, value: bytes | None) -> str:
        try:
            return self.registry.writer_of(value).kind if value else UNKNOWN_KIND
        except Permanent:
            return UNKNOWN_KIND

    def _letter_kind(self, d: dlq.DeadLetter) -> str:
        """A letter's event kind: a capture letter's from its marker (its value is the
        marker, not an event), any other's from its value."""
        if isinstance(d.error, capture_letters.CaptureDeadLetter):
            return d.error.kind or UNKNOWN_KIND
        return self._kind_of(d.value)

    def _letter_event_id(self, d: dlq.DeadLetter) -> str | None:
        """A letter's event id when its maker did not know it (an expired orphan): a capture
        letter's from its marker, an event's from its value (a decode: letters are rare)."""
        if isinstance(d.error, capture_letters.CaptureDeadLetter):
            return d.error.event_id or None
        return self._event_id(d.value)

    def _event_id(self, value: bytes | None) -> str | None:
        try:
            return str(self.registry.decode(value)[1]["event_id"]) if value else None
        except (Permanent, KeyError):
            return None

    def count_open_dead_letters(self) -> int:
        conn = self.connect()
        try:
            with conn.transaction():
                row = conn.execute("SELECT count(*) FROM sync.dead_letters "
                                   "WHERE state IN ('open', 'failed_again')").fetchone()
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc
        count = int(row[0]) if row else 0
        self.metrics.open_dead_letters.set(count)
        return count

    def export_reconcile(self) -> None:
        """The newest ``crm-erp-sync reconcile`` run (``sync.reconcile_runs``) as gauges:
        drift by entity and kind, total, and when it finished (0 when none ran yet), so a
        scheduled reconcile can be alerted on from any consumer's /metrics."""
        conn = self.connect()
        try:
            with conn.transaction():
                row = conn.execute("SELECT extract(epoch FROM finished_at)::float8, counts, "
                                   "drift FROM sync.reconcile_runs "
                                   "ORDER BY run_id DESC LIMIT 1").fetchone()
        except psycopg.errors.UndefinedTable:
            return  # an ERP set up before the table: `setup` adds it
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc
        m = self.metrics
        if row is None:
            m.reconcile_last.set(0)
            return
        finished, counts, drift = row
        m.reconcile_last.set(finished)
        m.reconcile_last_drift.set(drift)
        m.drift.clear()  # an entity left out of the newest run is not reported as before
        for entity, kinds in sorted(counts.items()):
            for kind, n in sorted(kinds.items()):
                m.drift.labels(entity, kind).set(n)

    def _apply_in_txn(self, conn: PgConn, batch: Batch) -> None:
        letters, held = self._key_state(conn, [e.msg for e in batch.envelopes])
        released, changed = self._supersede(conn, batch.envelopes, set(letters))
        if released:  # older than everything in the batch: they go first
            batch.envelopes[:0] = released
        envs = batch.envelopes
        if changed:  # letters superseded, held events released: read the keys' state again
            letters, held = self._key_state(conn, [e.msg for e in envs])
        blocked = _blocked_from(letters, held)
        self._check_line_currencies(envs)
        # A replayed message that already has its dead letter (open or resolved) is not a new
        # failure: no second record on the dead-letter topic, and an operator's resolution
        # (discard, redrive) stands. The same for an event the producer re-sent (after a
        # crash, at new offsets): known by its event id, in the ERP or earlier in this batch.
        failing = [e for e in envs if e.error is not None]
        known = self._lettered(conn, [(e.msg, _envelope_event_id(e)) for e in failing])
        lettered_here: set[tuple[str, str]] = set()
        # Keys that get a dead letter in this batch block what follows them in it too; what
        # came before a key's first letter (applied already, seen again in a replay) is not
        # held behind it.
        runnable: list[Envelope] = []
        for env in envs:
            key = (env.msg.topic, env.msg.key)
            at = (env.msg.partition, env.msg.offset)
            if env.error is not None:
                eid = _envelope_event_id(env)
                if ((env.msg.topic, *at) in known
                        or (eid is not None and (env.msg.topic, eid) in lettered_here)):
                    env.letter_exists = True
                else:
                    if eid is not None:
                        lettered_here.add((env.msg.topic, eid))
                    blocked[key] = min(blocked.get(key, at), at)
            elif key in blocked and at > blocked[key]:
                env.held = "key_blocked"
            else:
                runnable.append(env)
        customers_here = {e.change.partner.crm_customer_id for e in runnable
                          if e.change and e.change.partner}
        needed = {e.change.needs_customer for e in runnable
                  if e.change and e.change.needs_customer is not None}
        present = self.target.present_customers(needed - customers_here) | customers_here
        waiting_keys: set[tuple[str, bytes | None]] = set()
        to_apply: list[Envelope] = []
        for env in runnable:
            assert env.change is not None
            key = (env.msg.topic, env.msg.key)
            need = env.change.needs_customer
            if (need is not None and need not in present) or key in waiting_keys:
                env.held = "awaiting_customer"
                waiting_keys.add(key)
            else:
                to_apply.append(env)
        self._apply_or_isolate(conn, to_apply)
        self._hold(conn, [e for e in envs if e.held and e.msg.held_id is None])
        for env in envs:
            if env.error is not None and not env.letter_exists:
                batch.dead_letters.append(_dead_letter(env.msg, env.error,
                                                       _envelope_event_id(env)))
        if customers_here:
            self._release_awaiting(conn, sorted(customers_here), batch)

    def _check_line_currencies(self, envs: list[Envelope]) -> None:
        """A line of a lines-only order event priced in another currency than its order's
        (``changes.line_currency_errors``) fails like a transform error: a MappingError on
        its envelope, dead-lettered and holding its key. The orders' currencies come from
        the target in one round trip per batch, and only when some line has a currency
        written with its price (none otherwise)."""
        changes = [e.change if e.error is None else None for e in envs]
        wanted = line_currency_lookups(changes)
        if not wanted:
            return
        stored = self.target.order_currencies(wanted)
        for n, error in line_currency_errors(changes, stored).items():
            envs[n].error = error

    def _apply_or_isolate(self, conn: PgConn, envs: list[Envelope]) -> None:
        """Apply through the target (the sql target isolates a refused row itself): a
        refused change becomes a dead letter with the target's reason, a held one waits
        for its customer."""
        live = [e for e in envs if e.change is not None]
        if not live:
            return
        outcomes = self.target.apply([e.change for e in live if e.change is not None])
        for env, outcome in zip(live, outcomes, strict=True):
            if outcome.status is Status.REFUSED:
                env.error = ApplyError(outcome.reason or "refused by the ERP")
            elif outcome.status is Status.HELD:
                env.held = "awaiting_customer"

    def _supersede(self, conn: PgConn, envs: list[Envelope],
                   lettered: set[tuple[str, bytes | None]] | None = None
                   ) -> tuple[list[Envelope], bool]:
        """A fixed CRM row supersedes its dead letter (issue #12 item 7).

        When an event of a full-state kind (customer, market_demand: the event carries the
        whole row) maps, and every unresolved dead letter of its key is of that same kind
        (the same row, an older state of it), those letters become ``superseded`` (audited
        in ``sync.dead_letter_actions``, actor ``consumer``) and the events held behind the
        key are released: returned, in their original order, for the caller to apply before
        the batch. Only letters older than the event are superseded (a newer failure is not
        repaired by an older fix). Orders are never superseding (an order event carries only
        the lines its transaction changed: a newer one does not repair an older one's line);
        their letters wait for the operator.

        ``lettered``: the (topic, key)s with an unresolved dead letter among these envelopes'
        keys, when the caller has read them already (:meth:`_key_state`). Returns the
        released envelopes and whether any letter was superseded.
        """
        released: list[Envelope] = []
        if lettered is None:
            lettered = set(self._key_state(conn, [
                env.msg for env in envs if env.error is None and env.msg.held_id is None
                and env.kind in FULL_STATE_KINDS])[0])
        if not lettered:
            return released, False
        failed: set[tuple[str, bytes | None]] = set()
        done: set[tuple[str, bytes | None]] = set()
        for env in envs:
            key = (env.msg.topic, env.msg.key)
            if env.error is not None:
                failed.add(key)
                continue
            if (key in failed or key in done or env.msg.held_id is not None
                    or env.kind not in FULL_STATE_KINDS or key not in lettered):
                continue
            letters = conn.execute(
                'SELECT dead_letter_id, event_kind, partition, "offset" FROM sync.dead_letters '
                "WHERE topic = %s AND msg_key IS NOT DISTINCT FROM %s "
                "AND state IN ('open', 'failed_again') ORDER BY dead_letter_id FOR UPDATE",
                key).fetchall()
            if not letters or any(kind != env.kind or (part, off) >= (env.msg.partition,
                                                                      env.msg.offset)
                                  for _, kind, part, off in letters):
                continue
            done.add(key)
            ids = [r[0] for r in letters]
            conn.execute("UPDATE sync.dead_letters SET state = 'superseded', "
                         "resolved_at = clock_timestamp() WHERE dead_letter_id = ANY(%s)",
                         (ids,))
            why = (f"a newer {env.kind} event of the same key maps "
                   f"({env.msg.topic}[{env.msg.partition}]@{env.msg.offset})")
            _audit_superseded(conn, ids, why)
            rows = conn.execute(
                "DELETE FROM sync.held_events WHERE reason = 'key_blocked' AND topic = %s "
                f"AND msg_key IS NOT DISTINCT FROM %s RETURNING {HELD_MESSAGE}",
                key).fetchall()
            held = self._prepared(sorted((_held_message(r) for r in rows),
                                         key=lambda m: (m.partition, m.offset)))
            released += held.envelopes
            log.info("dead_letters_superseded", key=_key_text(env.msg.key), letters=len(ids),
                     released=len(rows))
        return released, bool(done)

    def _key_state(self, conn: PgConn, msgs: list[Message]
                   ) -> tuple[dict[tuple[str, bytes | None], tuple[int, int]],
                              dict[tuple[str, bytes | None], tuple[int, int]]]:
        """Of these messages' keys, those with an unresolved dead letter and those with
        events held behind one ('key_blocked'), each with its first (partition, offset):
        one round trip per batch, read through the partial indexes on msg_key (a key-less
        letter, a capture letter whose key the row did not give, in its own branch). Only
        the lettered keys get a closer look (``_supersede``, one query per key); a round
        trip per event cost a burst a fifth of the consumer's time."""
        keys = sorted({m.key for m in msgs if m.key is not None})
        null_key = any(m.key is None for m in msgs)
        if not keys and not null_key:
            return {}, {}
        rows = conn.execute(
            'SELECT true, topic, msg_key, min(ARRAY[partition::bigint, "offset"]) '
            "FROM sync.dead_letters WHERE state IN ('open', 'failed_again') "
            f"AND (msg_key = ANY(%(keys)b){' OR msg_key IS NULL' if null_key else ''}) "
            'GROUP BY 2, 3 UNION ALL SELECT false, topic, msg_key, '
            'min(ARRAY[partition::bigint, "offset"]) FROM sync.held_events '
            "WHERE reason = 'key_blocked' AND msg_key = ANY(%(keys)b) GROUP BY 2, 3",
            # The keys in binary (%b): a bytea[] of hundreds of keys as text is each key
            # hex-escaped, ~1 us of this process's CPU per key, binary ~0.2.
            {"keys": keys}).fetchall()
        letters: dict[tuple[str, bytes | None], tuple[int, int]] = {}
        held: dict[tuple[str, bytes | None], tuple[int, int]] = {}
        for is_letter, topic, key, (partition, offset) in rows:
            (letters if is_letter else held)[(topic, key)] = (int(partition), int(offset))
        return letters, held

    def _supersede_held(self, conn: PgConn, keys: set[tuple[str, bytes | None]]) -> None:
        """The same, when the fix arrived in the batch that dead-lettered the old state: it
        was held behind the new letter; supersede from the held events and apply them."""
        for topic, key in sorted(keys, key=lambda k: (k[0], k[1] or b"")):
            rows = conn.execute(
                f"SELECT {HELD_MESSAGE} FROM sync.held_events WHERE reason = 'key_blocked' "
                "AND topic = %s AND msg_key IS NOT DISTINCT FROM %s", (topic, key)).fetchall()
            held = self._prepared(sorted((_held_message(r) for r in rows),
                                         key=lambda m: (m.partition, m.offset)))
            released, _ = self._supersede(conn, held.envelopes)
            if released:
                batch = Batch(released)
                self._apply_in_txn(conn, batch)
                self._publish_dead_letters(conn, batch)

    def _lettered(self, conn: PgConn, msgs: list[tuple[Message, str | None]]
                  ) -> set[tuple[str, int, int]]:
        """Of these (message, event id)s, the (topic, partition, offset)s that already have a
        dead letter (any state): at that position (a replay), or for that event id on that
        topic (the producer re-sent the event at a new offset)."""
        if not msgs:
            return set()
        rows = conn.execute(
            'SELECT m.topic, m.partition, m."offset" FROM unnest(%s::text[], %s::int[], '
            '%s::bigint[], %s::text[]) AS m(topic, partition, "offset", event_id) '
            "WHERE EXISTS (SELECT 1 FROM sync.dead_letters d WHERE d.topic = m.topic "
            'AND d.partition = m.partition AND d."offset" = m."offset") '
            "OR (m.event_id IS NOT NULL AND EXISTS (SELECT 1 FROM sync.dead_letters d "
            "WHERE d.topic = m.topic AND d.event_id = m.event_id))",
            ([m.topic for m, _ in msgs], [m.partition for m, _ in msgs],
             [m.offset for m, _ in msgs], [e for _, e in msgs])).fetchall()
        return {(topic, int(partition), int(offset)) for topic, partition, offset in rows}

    def _hold(self, conn: PgConn, envs: list[Envelope]) -> None:
        if not envs:
            return
        with conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO sync.held_events (topic, partition, "offset", msg_key, msg_value, '
                "msg_timestamp, reason, waits_for) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                'ON CONFLICT (topic, partition, "offset") DO NOTHING',
                [(e.msg.topic, e.msg.partition, e.msg.offset, e.msg.key, e.msg.value,
                  e.msg.timestamp, e.held,
                  # line-only changes held before their header: released with the
                  # customer's next events (the header may wait for the customer too)
                  (e.change.needs_customer or e.change.customer_id)
                  if e.change and e.held == "awaiting_customer" else None) for e in envs])
        log.info("events_held", count=len(envs), reasons=sorted({e.held or "" for e in envs}))

    def _prepared(self, msgs: list[Message]) -> Batch:
        return prepare(self.registry, self.mappings, msgs)

    def _release_awaiting(self, conn: PgConn, customer_ids: list[str], batch: Batch) -> None:
        rows = conn.execute(
            f"SELECT {HELD_MESSAGE}, held_id FROM sync.held_events "
            "WHERE reason = 'awaiting_customer' AND waits_for = ANY(%s) "
            "ORDER BY held_id FOR UPDATE", (customer_ids,)).fetchall()
        if not rows:
            return
        released = self._prepared([_held_message(r, held_id=r[6]) for r in rows])
        self._apply_in_txn(conn, released)
        conn.execute("DELETE FROM sync.held_events WHERE held_id = ANY(%s)",
                     ([e.msg.held_id for e in released.envelopes if not e.held],))
        batch.dead_letters.extend(released.dead_letters)
        log.info("held_events_released", count=len(rows))

    # ---- operator actions (crm-erp-sync dlq redrive/discard) ------------------------------
    def redrive_message(self, conn: PgConn, msg: Message) -> Envelope:
        """Re-process one dead-lettered message (decode -> transform -> apply, with the
        current mappings) inside the caller's transaction, then the events held behind its
        key, in (partition, offset) order.

        The caller has already marked its dead letter resolved (so that it no longer blocks
        its own key). Returns the envelope: ``error`` set when it failed again (then nothing
        was written: the savepoint is rolled back), ``held`` set when it was held (its
        customer is not in the ERP yet, or the key has another unresolved dead letter).
        """
        env = self._prepared([msg]).envelopes[0]
        if env.error is not None:
            return env
        try:
            with conn.transaction():
                self._reapply_key(conn, msg.topic, msg.key, env)
        except _RolledBack:
            pass
        return env

    def release_key(self, conn: PgConn, topic: str, key: bytes | None) -> int:
        """Re-apply the events held behind a key ('key_blocked'), in order, after a discard:
        those no unresolved letter before them blocks (``STILL_BLOCKED``); returns how many
        were released."""
        return self._reapply_key(conn, topic, key, None)

    def _reapply_key(self, conn: PgConn, topic: str, key: bytes | None,
                     first: Envelope | None) -> int:
        # Taken out of the hold (those no letter before them blocks any more); whatever
        # still cannot be applied is held again below.
        rows: list[Any] = conn.execute(
            "DELETE FROM sync.held_events h WHERE h.reason = 'key_blocked' AND h.topic = %s "
            f"AND h.msg_key IS NOT DISTINCT FROM %s AND NOT {STILL_BLOCKED} "
            f"RETURNING {HELD_MESSAGE}", (topic, key)).fetchall()
        if first is None and not rows:
            return 0
        released = self._prepared([_held_message(r) for r in rows])
        # In log order: a redriven letter may come after events released with it.
        batch = Batch(sorted(([first] if first is not None else []) + released.envelopes,
                             key=lambda e: (e.msg.partition, e.msg.offset)))
        self._apply_in_txn(conn, batch)
        if first is not None and first.error is not None:
            raise _RolledBack
        self._publish_dead_letters(conn, batch)
        if rows:
            log.info("held_events_released", count=len(rows), reason="key_blocked")
        return len(rows)

    def expire_orphans(self) -> int:
        """Dead-letter orders whose customer did not arrive within ``orphan_hold_s``."""
        try:
            return self._expire_orphans()
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc
        except KafkaError as exc:
            raise self._dlq_send_failed(exc) from exc
        except StackUnavailable as exc:
            raise ConnectionLost("broker (dead-letter topic) unreachable") from exc

    def _dlq_send_failed(self, exc: KafkaError) -> Retryable:
        """The Retryable for a failed send of dead letters. A send to a topic the broker
        does not have fails like a broker that never answers (KafkaTimeoutError "Failed to
        update metadata" after max_block_ms), so the broker is asked once (its bootstrap
        bounded by DLQ_TOPIC_CHECK_MS) whether the dead-letter topic exists: a topic deleted
        while consumers run is named with its setting and `crm-erp-sync setup`, not
        "broker (dead-letter topic) unreachable"."""
        self._drop_dlq_producer()
        try:
            admin = make_admin(self.settings, bootstrap_timeout_ms=DLQ_TOPIC_CHECK_MS,
                               request_timeout_ms=DLQ_TOPIC_CHECK_MS)
            try:
                existing: set[str] | None = set(admin.list_topics())
            finally:
                admin.close()
        except (KafkaError, StackUnavailable):  # no answer: unreachable it is
            existing = None
        if existing is not None:
            dlq_variable = self.settings.env_var("dlq_topic")
            for variable, problem in missing_topics(self.settings, existing):
                if variable == dlq_variable:
                    return Retryable(f"{variable}: {problem}")
        return (transient(exc, "broker (dead-letter topic)")
                or Retryable(f"dead-letter topic: {type(exc).__name__}"))

    def _drop_dlq_producer(self) -> None:
        """A failed send can leave kafka-python's idempotent producer failing every later
        send (NOTES.md): the next dead letter gets a new one."""
        producer, self._dlq_producer = self._dlq_producer, None
        if producer is not None:
            close_producer(producer, 0.0)

    def _expire_orphans(self) -> int:
        conn = self.connect()
        with conn.transaction():
            rows = conn.execute(
                f"SELECT {HELD_MESSAGE}, held_id, waits_for FROM sync.held_events "
                "WHERE reason = 'awaiting_customer' "
                "AND held_at < clock_timestamp() - make_interval(secs => %s) "
                "ORDER BY held_id FOR UPDATE SKIP LOCKED",
                (self.settings.orphan_hold_s,)).fetchall()
            if not rows:
                return 0
            batch = Batch([])
            for r in rows:
                msg = _held_message(r)
                batch.dead_letters.append(_dead_letter(msg, self._orphan_error(msg, r[7])))
            conn.execute("DELETE FROM sync.held_events WHERE held_id = ANY(%s)",
                         ([r[6] for r in rows],))
            self._publish_dead_letters(conn, batch)
        self._count_dead_letters(batch.dead_letters)
        return len(rows)

    def _orphan_error(self, msg: Message, waits_for: str | None) -> ApplyError:
        """Why a held event expired: its order's customer never arrived, or (line-only
        changes, held before their order's header by either target) the header: not in the
        ERP, deleted there by hand perhaps (newcomer9 F13). Decoded again to tell them
        apart: expiry is rare, the hot path never pays for it."""
        change = self._prepared([msg]).envelopes[0].change
        if change is not None and change.header is None and change.items:
            return ApplyError(
                f"the header of order {change.order_id} is not in the ERP and did not arrive "
                f"within {self.settings.orphan_hold_s:g}s (deleted there by hand?): discard "
                "this letter, then `crm-erp-sync reconcile --repair --entity orders` re-reads "
                "the order (while the letter is open, its key is held: repair leaves it)")
        return ApplyError(f"customer {waits_for} did not arrive in the ERP within "
                          f"{self.settings.orphan_hold_s:g}s")

    def _publish_dead_letters(self, conn: PgConn, batch: Batch) -> None:
        letters = batch.dead_letters
        if not letters:
            return
        # Never a second record on the dead-letter topic for a message, or an event the
        # producer re-sent, that has its letter (in the ERP, or earlier in this list).
        letters = [d if d.event_id is not None else replace(d, event_id=self._letter_event_id(d))
                   for d in letters]
        seen = self._lettered(conn, [(Message(d.topic, d.partition, d.offset, 0, None, None),
                                      d.event_id) for d in letters])
        events: set[tuple[str, str]] = set()
        kept: list[dlq.DeadLetter] = []
        for d in letters:
            if (d.topic, d.partition, d.offset) in seen or (d.topic, d.event_id) in events:
                continue
            if d.event_id is not None:
                events.add((d.topic, d.event_id))
            kept.append(d)
        letters = batch.dead_letters = kept
        if not letters:
            return
        # A capture dead letter is on the dead-letter topic already (the producer put it
        # there): only its place is recorded.
        to_send = [d for d in letters
                   if not isinstance(d.error, capture_letters.CaptureDeadLetter)]
        sent = iter(dlq.publish(self.dlq_producer, self.settings.dlq_topic,
                                self.settings.consumer_group, to_send) if to_send else [])
        metas = [_Place(d.error.dlq_partition, d.error.dlq_offset)
                 if isinstance(d.error, capture_letters.CaptureDeadLetter) else next(sent)
                 for d in letters]
        with conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO sync.dead_letters (topic, partition, "offset", msg_key, stage, '
                "error_class, error_message, dlq_partition, dlq_offset, event_kind, "
                "source_table, source_key, event_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                'ON CONFLICT (topic, partition, "offset") DO NOTHING',
                [(d.topic, d.partition, d.offset, d.key, d.error.stage, _error_class(d.error),
                  d.error.reason, m.partition, m.offset, self._letter_kind(d),
                  getattr(d.error, "table", None) or None,
                  getattr(d.error, "primary_key", None) or None, d.event_id)
                 for d, m in zip(letters, metas, strict=True)])
        self.dead_lettered += len(letters)
        for d in letters:
            # The reason stays in the letter (`dlq show`): it may quote the CRM's word for a
            # value (an unknown status, a unit), and a status column can hold anything, a
            # name or an address too; the log names the field and the error class only.
            log.warning("dead_lettered", topic=d.topic, partition=d.partition, offset=d.offset,
                        key=_key_text(d.key), event_id=d.event_id, stage=d.error.stage,
                        error=_error_class(d.error), field=field_of(d.error))
        self._supersede_older_letters(conn, letters)

    def _supersede_older_letters(self, conn: PgConn, letters: list[dlq.DeadLetter]) -> None:
        """A newer failing event of a full-state kind supersedes its key's older unresolved
        letters of that kind: each re-snapshot (``resync``, ``snapshot``) of a CRM row whose
        transform fails would otherwise add one more open letter for the same row, and the
        newest letter carries the row as it is now, so redriving it is what the operator
        wants. Only letters whose message decoded (stages transform and apply) supersede;
        letters of other kinds on the key (orders of the customer) stay open, and the key
        stays held behind the newest letter. The older letters become ``superseded`` (never
        deleted), audited in ``sync.dead_letter_actions`` naming the letter that replaced
        them."""
        newest: dict[tuple[str, bytes, str], dlq.DeadLetter] = {}
        for d in letters:
            if d.key is None or d.error.stage not in ("transform", "apply"):
                continue
            kind = self._kind_of(d.value)
            if kind not in FULL_STATE_KINDS:
                continue
            seen = newest.get((d.topic, d.key, kind))
            if seen is None or (seen.partition, seen.offset) < (d.partition, d.offset):
                newest[(d.topic, d.key, kind)] = d
        for (topic, key, kind), d in newest.items():
            rows = conn.execute(
                "WITH new AS (SELECT dead_letter_id FROM sync.dead_letters WHERE topic = %(t)s "
                'AND partition = %(p)s AND "offset" = %(o)s) '
                "UPDATE sync.dead_letters d SET state = 'superseded', "
                "resolved_at = clock_timestamp() FROM new "
                "WHERE d.topic = %(t)s AND d.msg_key = %(k)s AND d.event_kind = %(kind)s "
                "AND d.state IN ('open', 'failed_again') "
                'AND (d.partition, d."offset") < (%(p)s, %(o)s) '
                "RETURNING d.dead_letter_id, new.dead_letter_id",
                {"t": topic, "p": d.partition, "o": d.offset, "k": key, "kind": kind}
            ).fetchall()
            if not rows:
                continue
            why = (f"a newer {kind} event of the same key failed too: dead letter {rows[0][1]} "
                   f"({topic}[{d.partition}]@{d.offset}) replaces this one")
            _audit_superseded(conn, [old_id for old_id, _ in rows], why)
            log.info("dead_letters_superseded", key=_key_text(key), letters=len(rows),
                     by_dead_letter=rows[0][1])


@dataclass(frozen=True)
class _Place:
    """Where a dead letter is on the dead-letter topic (as kafka-python's RecordMetadata)."""

    partition: int
    offset: int


class _RolledBack(Exception):
    """Rolls a savepoint back (a redriven message failed again)."""


class _Collect:
    def submit(self, batch: Batch) -> None:
        return None


class Breaker:
    """Judges each partition's slice of a batch before anything of it is dead-lettered: a
    partition whose dead-letter share reaches the limit is taken out of the batch, paused and
    rewound (``BreakerControl.trip``); the other partitions go on. A partition already open
    (tripped here, by another member, or before a restart) is taken out the same way. The
    slices that went through are counted once the batch has committed."""

    def __init__(self, control: BreakerControl, consumer: Any, next_step: Stage) -> None:
        self.control = control
        self.consumer = consumer
        self.next_step = next_step

    def submit(self, batch: Batch) -> None:
        now = time.monotonic()
        kept: list[Envelope] = []
        passed: list[tuple[tuple[str, int], list[tuple[int, bool]]]] = []
        for partition, envs in by_partition_envelopes(batch.envelopes).items():
            first, last = envs[0].msg.offset, envs[-1].msg.offset
            if self.control.is_open(partition):
                self.control.hold_back(self.consumer, partition, first)
                continue
            outcomes = [(e.msg.offset, e.error is not None) for e in envs]
            trip = self.control.breaker.would_trip(partition, outcomes, now)
            if trip is not None:
                self.control.trip(self.consumer, trip, first, last,
                                  [e.error for e in envs if e.error is not None])
                continue
            kept.extend(envs)
            passed.append((partition, outcomes))
        if not kept:
            return
        batch.envelopes = kept
        self.next_step.submit(batch)
        for partition, outcomes in passed:
            self.control.breaker.record(partition, outcomes, now)


@dataclass
class ConsumerStats:
    batches: int = 0
    messages: int = 0
    retries: int = 0
    # With until_caught_up: True once every partition reached its end offset seen at start;
    # the partitions that could not, because the circuit breaker keeps them paused.
    caught_up: bool = False
    blocked: list[str] = field(default_factory=list)
    # With until_caught_up: stopped because the apply window is closed (until it opens).
    outside_window_until: datetime | None = None


class ErpConsumer:
    """A member of the consumer group; run one or many."""

    def __init__(self, settings: Settings, *, batch: BatchPolicy | None = None,
                 retry: RetryPolicy | None = None, dlq_limit: DlqLimit | None = None) -> None:
        self.settings = settings
        self.batch_policy = batch or BatchPolicy(settings.batch_max_events,
                                                 settings.batch_max_wait_ms)
        self.retry = retry or RetryPolicy.DEFAULT
        self._reconnect = RetryPolicy.RECONNECT.delays()
        self.registry = SchemaRegistry.load(settings.schemas_dir)
        self.metrics = ConsumerMetrics()
        # Reloaded without a restart: SIGHUP or a changed file (service/consumer/mappings_watch.py).
        self.watcher = MappingsWatcher(settings.mappings_file,
                                       check_interval_s=settings.mappings_check_s,
                                       metrics=self.metrics)
        self.mappings = self.watcher.mappings
        self.health = Health(settings, self.metrics)
        self.applier = ErpApplier(settings, self.registry, self.mappings, metrics=self.metrics)
        self.dlq_limit = dlq_limit or DlqLimit.from_settings(settings)
        self.breaker = BreakerControl(settings, self.dlq_limit, self.metrics, self.health,
                                      self.applier.connect)
        self.membership = Membership(settings, self.metrics, self.health, self.applier.connect)
        self.stats = ConsumerStats()
        # Protecting the ERP (service/consumer/throttle.py): outside the apply window every
        # owned partition is paused (the consumer stays in its group); the rate limit bounds
        # how many events one poll may take.
        self.window = settings.apply_window_parsed()
        # Wall-clock time for the window (a callable returning an aware datetime): tests
        # move it instead of waiting for 22:00.
        self.clock: Callable[[], datetime] = functools.partial(datetime.now, UTC)
        self.window_closed_until: datetime | None = None
        self._window_opened_at = float("-inf")
        self.rate = (RateLimit(settings.apply_max_rate, time.monotonic())
                     if settings.apply_max_rate else None)
        self._last_lag_update = 0.0
        self._stop = threading.Event()
        self.consumer: Any = None
        self._commits: CommitOffsets | None = None
        # Partitions moved past a recorded gap by the current _poll: their new position is
        # committed unless the poll returned records of theirs (those commit it when applied).
        self._moved: dict[TopicPartition, int] = {}

    def stop(self) -> None:
        self._stop.set()

    def _check_topics(self) -> None:
        """Raises ConfigError naming each topic setting whose topic the broker does not have.
        A broker that does not answer the metadata request now is not judged here: the loop
        retries it as any transient failure."""
        try:
            existing = set(self.consumer.topics())
        except KafkaError:
            return
        problems = missing_topics(self.settings, existing)
        if problems:
            (variable, problem), *more = problems
            raise ConfigError(variable, problem, more)

    def _pipeline(self) -> Stage:
        # One CommitOffsets for the consumer's life: a pipeline rebuilt for new mappings
        # keeps the offsets still pending.
        if self._commits is None or self._commits.consumer is not self.consumer:
            self._commits = CommitOffsets(self.consumer)
        return Decode(self.registry, Transform(self.mappings, Breaker(
            self.breaker, self.consumer, Apply(self.applier, self._commits))))

    def _flush_commits(self, timeout_ms: int | None = None) -> None:
        if self._commits is not None:
            self._commits.flush(timeout_ms)

    def run(self, *, until_idle_s: float | None = None,
            until_caught_up: bool = False) -> ConsumerStats:
        """Consume until stop(). With until_idle_s, return after that long without messages.
        With until_caught_up, return once the group has consumed every partition up to its
        end offset as seen at start (``stats.caught_up``), or when only partitions paused by
        the circuit breaker are left (``stats.blocked`` names them).

        Raises ConfigError (bad ERP credentials, missing database, a topic setting naming
        no topic on the broker) and StackUnavailable
        (broker unreachable at start); transient failures are retried, never raised."""
        http = serve(self.settings, self.health)
        try:
            # 'none': an out-of-range position is raised to us, not skipped silently
            # (_poll_records: a gap is recorded, then the consumer goes on; F12).
            self.consumer = make_consumer(self.settings, self.settings.sales_topic,
                                          self.settings.market_topic,
                                          client_id=self.membership.client_id,
                                          auto_offset_reset="none")
        except StackUnavailable:
            if http is not None:
                http.close()
            raise
        try:
            self._check_topics()
        except ConfigError:
            self.consumer.close(autocommit=False)
            if http is not None:
                http.close()
            raise
        try:
            # The ERP role's grants (connect checks them): exit 2 before joining the group.
            self._retrying(self.applier.connect)
        except ConfigError:
            self.consumer.close(autocommit=False)
            if http is not None:
                http.close()
            raise
        pipeline = self._pipeline()
        idle_since = time.monotonic()
        last_maintenance = 0.0
        last_target_check = 0.0
        try:
            # Before the first poll: a wrong password fails here, at once, not after a join;
            # partitions left tripped (before a restart) are known before anything is applied.
            self._retrying(functools.partial(self.breaker.refresh, self.consumer, force=True))
            targets = self._end_offsets() if until_caught_up else {}
            while not self._stop.is_set():
                self.health.beat()
                self._apply_window()
                if self._throttled():
                    continue
                msgs = self._hold_outside_window(self._poll_or_wait())
                if self.rate is not None and msgs:
                    self.rate.take(len(msgs), time.monotonic())
                self._retrying(functools.partial(self.membership.check, self.consumer))
                now = time.monotonic()
                self._retrying(functools.partial(self.breaker.refresh, self.consumer))
                if self._watch_mappings():
                    pipeline = self._pipeline()
                if now - last_maintenance > 5:
                    # Orders wait for customers still in Kafka behind a closed window: their
                    # orphan clock starts when the window opens.
                    if (self.window_closed_until is None and now - self._window_opened_at
                            > self.settings.orphan_hold_s):
                        self._retrying(self.applier.expire_orphans)
                    self._retrying(self.applier.count_open_dead_letters)
                    self._retrying(self.applier.export_reconcile)
                    last_maintenance = now
                if msgs:
                    idle_since = now
                    # A fresh batch per attempt: a failed attempt leaves marks on its envelopes.
                    self._retrying(functools.partial(_submit_fresh, pipeline, msgs), msgs)
                    self.stats.batches += 1
                    self.stats.messages += len(msgs)
                else:
                    self._flush_commits()  # a quiet moment: nothing pending is left behind
                    if until_idle_s is not None and now - idle_since > until_idle_s:
                        break
                if self._stop.is_set():
                    break  # the batch may have been rolled back: positions would overstate
                # Only after the batch: positions already count what was polled.
                if until_caught_up and now - last_target_check > (0.5 if not msgs else 1.0):
                    last_target_check = now
                    self._flush_commits()
                    if self._reached(targets):
                        break
        finally:
            # Graceful: the batch in flight was committed (offsets too) or rolled back;
            # close() leaves the group, so its partitions move on at once.
            self.health.set_ready(False, "stopping")
            if http is not None:
                http.close()
            try:  # every pending offset is of an applied batch; a broker away: not for long
                self._flush_commits(timeout_ms=FINAL_COMMIT_TIMEOUT_MS)
            except KafkaError as exc:  # flush() handles the broker's refusals; not a crash
                log.warning("offset_commit_failed", error=type(exc).__name__)
            self.consumer.close(autocommit=False)
            self.watcher.forget(self.applier.conn, self.settings.consumer_group)
            self.applier.target.close()
            self.membership.close()
            if self.applier.conn is not None:
                self.applier.conn.close()
            if self.applier._dlq_producer is not None:
                close_producer(self.applier._dlq_producer, 5.0)
        return self.stats

    def _apply_window(self) -> None:
        """Before each poll: outside the apply window, pause every partition we own (also
        ones a rebalance just gave us; a resume by ``BreakerControl.refresh`` is undone
        here); when it opens, resume all but those the breaker or an operator keeps
        paused. The consumer keeps polling, so it stays in its group."""
        if self.window is None:
            # No window set: changes may always be applied (the gauge's documented meaning;
            # left at its initial 0 it read as "outside the window" for every consumer).
            self.metrics.apply_window_open.set(1)
            return
        state = self.window.state(self.clock())
        assigned = list(self.consumer.assignment() or ())
        if not state.open:
            if self.window_closed_until is None:
                log.warning("apply_window_closed", window=self.window.text,
                            opens_at=state.until.isoformat())
            self.window_closed_until = state.until
            if assigned:
                self.consumer.pause(*assigned)
        elif self.window_closed_until is not None:
            self.window_closed_until = None
            self._window_opened_at = time.monotonic()
            self.consumer.resume(*(tp for tp in assigned
                                   if not self.breaker.is_open((tp.topic, tp.partition))))
            log.warning("apply_window_opened", window=self.window.text,
                        closes_at=state.until.isoformat())
        self.membership.apply_window_closed_until = self.window_closed_until
        self.metrics.apply_window_open.set(0 if self.window_closed_until else 1)
        self.health.set_apply_window(self.window_closed_until, self.window.text)

    def _hold_outside_window(self, msgs: list[Message]) -> list[Message]:
        """Records a poll returned although the window is closed (the poll that joined the
        group fetches before its new partitions could be paused): not applied; their
        partitions are paused and rewound to them."""
        if self.window_closed_until is None or not msgs:
            return msgs
        firsts: dict[TopicPartition, int] = {}
        for m in msgs:
            tp = TopicPartition(m.topic, m.partition)
            firsts[tp] = min(firsts.get(tp, m.offset), m.offset)
        owned = set(self.consumer.assignment() or ())
        for tp, offset in firsts.items():
            if tp in owned:
                self.consumer.pause(tp)
                self.consumer.seek(tp, offset)
        return []

    def _throttled(self) -> bool:
        """The rate limit is spent: wait (polling with our partitions paused, so membership
        is kept) until one event may be taken; True when it waited."""
        if self.rate is None or self.window_closed_until is not None:
            return False
        wait = self.rate.wait_s(time.monotonic())
        if wait <= 0:
            return False
        self.metrics.apply_throttled.inc(wait)
        self._pause_and_wait(wait, [])
        return True

    def _poll_or_wait(self) -> list[Message]:
        """One poll; when the broker is unreachable, wait (``RetryPolicy.RECONNECT``) and
        return nothing: kafka-python reconnects by itself, the next poll tries again."""
        try:
            msgs = self._poll()
            self._observe_assignment()
        except KafkaError as exc:
            fault = transient(exc, "broker")
            if fault is None:
                raise
            delay = next(self._reconnect)
            if isinstance(fault, ConnectionLost):
                self.health.disconnected(fault.reason)
            else:
                self.health.failing()
            self.metrics.retries.inc()
            self.stats.retries += 1
            log.warning("broker_unavailable_retrying", error=str(fault), backoff_s=delay)
            self._wait(delay)
            return []
        if self._reconnect.attempts:
            self._reconnect = RetryPolicy.RECONNECT.delays()
            self.health.recovered()
        return msgs

    def _wait(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.health.beat()
            self._stop.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def _watch_mappings(self) -> bool:
        """Once per loop iteration: a changed, valid mappings file is applied from the next
        batch on (True: rebuild the stages); an invalid one is refused by the watcher. The
        version in use is reported to ``sync.consumers`` for ``status``."""
        fresh = self.watcher.poll()
        if fresh is not None:
            self.mappings = fresh
            self._retrying(functools.partial(self.applier.use_mappings, fresh))
        if self.watcher.report_due():
            self._retrying(functools.partial(self.watcher.report, self.applier.connect,
                                             self.settings.consumer_group))
        return fresh is not None

    def _end_offsets(self) -> dict[TopicPartition, int]:
        """The end offset of every partition of our topics, now (the --until-caught-up goal)."""
        tps = [TopicPartition(t, p)
               for t in (self.settings.sales_topic, self.settings.market_topic)
               for p in sorted(self.consumer.partitions_for_topic(t) or ())]
        ends: dict[TopicPartition, int] = self.consumer.end_offsets(tps)
        return {tp: end for tp, end in ends.items() if end > 0}

    def _reached(self, targets: dict[TopicPartition, int]) -> bool:
        """Drops the partitions that reached their target; True when none is left, or only
        breaker-paused ones (then stats.blocked names them). Our own partitions count by
        position (every polled message was processed and committed before this check, and
        a position also passes transaction markers); the others by the group's commits."""
        assigned = set(self.consumer.assignment() or ())
        for tp, end in list(targets.items()):
            try:
                done = (self.consumer.position(tp, timeout_ms=2000) if tp in assigned
                        else self.consumer.committed(tp))
            except KafkaError:
                continue
            if done is not None and done >= end:
                del targets[tp]
        if not targets:
            self.stats.caught_up = True
            return True
        if self.window_closed_until is not None:
            self.stats.outside_window_until = self.window_closed_until
            return True
        blocked = [tp for tp in targets if self.breaker.is_open((tp.topic, tp.partition))]
        if len(blocked) == len(targets):
            self.stats.blocked = [f"{tp.topic}[{tp.partition}]" for tp in sorted(blocked)]
            return True
        return False

    def _poll(self) -> list[Message]:
        policy = self.batch_policy
        deadline = time.monotonic() + policy.max_wait_ms / 1000
        most = policy.max_events
        if self.rate is not None:  # never more than the rate limit allows now (at least 1)
            most = max(1, min(most, self.rate.available(time.monotonic())))
        out: list[Message] = []
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            polled = self._poll_records(remaining_ms if out else max(remaining_ms, 200),
                                        most - len(out))
            out.extend(_messages(polled.values()))
            if len(out) >= most or time.monotonic() >= deadline or (
                    not out and policy.max_wait_ms == 0):
                break
            if self._stop.is_set():
                break
        if self._moved:
            # Not for a partition with records in `out`: committing past them before they
            # are applied (a stop during their retry flushes pending offsets) would skip them.
            taken = {(m.topic, m.partition) for m in out}
            for tp, offset in self._moved.items():
                if (tp.topic, tp.partition) not in taken and self._commits is not None:
                    self._commits.skip_to(tp, offset)
            self._moved = {}
        out.sort(key=lambda m: (m.topic, m.partition, m.offset))
        return out

    def _poll_records(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        """``consumer.poll``, handling what ``auto_offset_reset='none'`` raises (kafka-python
        3.0.12 raises only when the poll drained no records, keeping the error for the next
        poll otherwise; a seek clears it): a partition without a committed offset (a new
        group, or one that never applied an event there) starts at its beginning, as
        'earliest' did, after :meth:`_lost` recorded offsets ``[0, beginning)`` if a log
        start above 0 says events were deleted before the group read any; an out-of-range
        position is
        checked by :meth:`_out_of_range`; a truncated log (KIP-320, an unclean leader
        election) goes on from the divergent offset, or the beginning when none is known.
        Those polls return nothing; the caller polls again."""
        try:
            polled: dict[Any, list[Any]] = self.consumer.poll(timeout_ms=timeout_ms,
                                                             max_records=max_records)
            return polled
        except NoOffsetForPartitionError as exc:
            owned = set(self.consumer.assignment() or ())
            fresh = sorted(tp for tp in (exc.args[0] if exc.args else ()) if tp in owned)
            starts = self.consumer.beginning_offsets(fresh) if fresh else {}
            for tp in fresh:
                gap = gaps.lost_range(tp.topic, tp.partition, 0, starts[tp])
                if gap is not None and not self._lost(gap, committed=False):
                    return {}
                self.consumer.seek(tp, starts[tp])
                if gap is not None:
                    self._moved[tp] = starts[tp]
        except OffsetOutOfRangeError as exc:
            self._out_of_range(exc.args[0] if exc.args and isinstance(exc.args[0], dict)
                               else {})
        except LogTruncationError as exc:
            owned = set(self.consumer.assignment() or ())
            for tp, at in exc.divergent_offsets.items():
                if tp not in owned:
                    continue
                log.warning("log_truncated", topic=tp.topic, partition=tp.partition,
                            resume_at=None if at is None else at.offset)
                if at is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, at.offset)
        return {}

    def _out_of_range(self, positions: dict[TopicPartition, int]) -> None:
        """The broker no longer has the offset a partition's position names. Below the log
        start: the records between were deleted before this group applied them; the gap is
        recorded in ``sync.offset_gaps`` (before moving on, so a stop or crash meanwhile
        detects it again from the committed offset), logged as ``records_lost`` and counted,
        then the partition goes on from the log start. Past the end (a topic re-created):
        from the beginning, as 'earliest' did, with a warning. Inside the range (a follower
        behind): fetched again. Raises KafkaError when the broker does not answer the
        offsets request (the poll loop retries)."""
        owned = set(self.consumer.assignment() or ())
        tps = sorted(tp for tp in positions if tp in owned)
        if not tps:
            return
        starts = self.consumer.beginning_offsets(tps)
        ends = self.consumer.end_offsets(tps)
        for tp in tps:
            position, start = positions[tp], starts[tp]
            gap = gaps.lost_range(tp.topic, tp.partition, position, start)
            if gap is not None:
                if not self._lost(gap, committed=True):
                    return
                self.consumer.seek(tp, start)
                self._moved[tp] = start
            elif position > ends[tp]:
                log.warning("offset_beyond_end_restarting_at_beginning", topic=tp.topic,
                            partition=tp.partition, position=position, end=ends[tp],
                            log_start=start)
                self.consumer.seek(tp, start)

    def _lost(self, gap: gaps.OffsetGap, *, committed: bool) -> bool:
        """Record ``gap`` in the ERP (retried like any transient failure), then log it as
        ``records_lost`` (offsets and count, no event content) and count it. False when
        stopping before it was recorded: the caller must not move past it, so the next
        start detects it again. ``committed``: the group had a position there (False: it
        never committed one for this partition). An ERP set up by an older version (no
        sync.offset_gaps), or a role granted its tables before `setup` made this one, does
        not stop the stream: the log line says it was not recorded and what fixes that."""
        recorded: list[str | None] = []
        self._retrying(functools.partial(self._record_gap, gap, recorded))
        if not recorded:
            return False
        extra = {} if recorded[0] is None else {"recorded": False, "setup_needed": recorded[0]}
        log.error("records_lost", topic=gap.topic, partition=gap.partition,
                  first_lost=gap.first_lost, next_kept=gap.next_kept, count=gap.count,
                  group_had_offset=committed, consumer_group=self.settings.consumer_group,
                  fix=gaps.FIX, **extra)
        self.metrics.events_lost.labels(gap.topic, str(gap.partition)).inc(gap.count)
        return True

    def _record_gap(self, gap: gaps.OffsetGap, recorded: list[str | None]) -> None:
        """Appends None once recorded, or why it cannot be (the fix, for the log line)."""
        conn = self.applier.connect()
        try:
            gaps.record(conn, self.settings.consumer_group, gap)
        except psycopg.errors.UndefinedTable:  # an ERP set up by an older version
            recorded.append("the ERP has no sync.offset_gaps table: run `crm-erp-sync setup` "
                            "so that `status` names such gaps")
            return
        except psycopg.errors.InsufficientPrivilege:  # granted before setup made the table
            recorded.append("the consumer's ERP role may not write sync.offset_gaps: GRANT "
                            "SELECT, INSERT, UPDATE ON sync.offset_gaps TO it")
            return
        except TRANSIENT_PG as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc
        recorded.append(None)

    def _observe_assignment(self) -> None:
        """Readiness (partitions assigned) every loop; lag at most once a second."""
        assigned = self.consumer.assignment() or set()
        if assigned:
            self.health.set_ready(True, "consuming", assigned_partitions=len(assigned))
        else:
            self.health.set_ready(False, "no partitions assigned")
        now = time.monotonic()
        if now - self._last_lag_update < 1.0:
            return
        self._last_lag_update = now
        lags: dict[tuple[str, int], int] = {}
        for tp in assigned:
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=200)
            except KafkaError:
                continue
            if position is not None:
                lags[(tp.topic, tp.partition)] = max(0, high - position)
        self.metrics.set_lag(lags)
        self.metrics.assigned.set(len(assigned))

    def _retrying(self, action: Any, msgs: list[Message] | None = None) -> None:
        delays = self.retry.delays()
        while True:
            try:
                action()
                self.health.recovered()
                return
            except Retryable as exc:
                if self._stop.is_set():
                    # Stopping: the ERP transaction was rolled back and no offset committed;
                    # these messages are consumed again after the restart.
                    log.warning("batch_rolled_back_on_stop", error=str(exc),
                                messages=len(msgs or []))
                    return
                if isinstance(exc, ConnectionLost):
                    self.health.disconnected(exc.reason)
                else:
                    self.health.failing()
                self.metrics.retries.inc()
                delay = next(delays)
                self.stats.retries += 1
                log.warning("transient_failure_retrying", error=str(exc), attempt=delays.attempts,
                            backoff_s=delay)
                self._pause_and_wait(delay, msgs or [])

    def _pause_and_wait(self, delay: float, msgs: list[Message]) -> None:
        """Pause everything we own, keep the group membership alive, then rewind."""
        assigned = list(self.consumer.assignment())
        self.consumer.pause(*assigned)
        polled: list[Message] = []
        deadline = time.monotonic() + delay
        while True:  # in slices: a stop request ends the wait, and liveness is kept
            self.health.beat()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                break
            try:
                stray = self.consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000))
            except KafkaError:  # the broker is away too: just wait out the slice
                self._stop.wait(min(remaining, 0.5))
                continue
            polled.extend(_messages(stray.values()))
        firsts: dict[TopicPartition, int] = {}
        # The batch itself is retried by the caller; only records polled meanwhile (from
        # partitions assigned during the wait) must be rewound, or they would be skipped.
        for m in polled:
            tp = TopicPartition(m.topic, m.partition)
            firsts[tp] = min(firsts.get(tp, m.offset), m.offset)
        owned = set(self.consumer.assignment())
        # A rebalance during the wait (a long outage, a member leaving) may have taken some
        # away: resuming a partition we no longer own raises KeyError in kafka-python.
        self.consumer.resume(*(tp for tp in assigned if tp in owned))
        self.breaker.repause(self.consumer)
        if self.window_closed_until is not None and owned:
            self.consumer.pause(*owned)
        for tp, offset in firsts.items():
            if tp in owned:
                self.consumer.seek(tp, offset)


def _blocked_from(letters: dict[tuple[str, bytes | None], tuple[int, int]],
                  held: dict[tuple[str, bytes | None], tuple[int, int]]
                  ) -> dict[tuple[str, bytes | None], tuple[int, int]]:
    """Keys held back, with the (partition, offset) from which they are: the first
    unresolved dead letter of the key, or its first held event (key-less messages are never
    held back)."""
    out = dict(held)
    for key, at in letters.items():
        out[key] = min(out.get(key, at), at)
    return {k: at for k, at in out.items() if k[1] is not None}


def _error_class(error: Permanent) -> str:
    """The class a dead letter is filed under: a capture letter's is the producer's (the
    same word in sync.dead_letters, `dlq list`, `status` and both processes' log lines)."""
    return getattr(error, "error_class", "") or type(error).__name__


def _key_text(key: bytes | None) -> str | None:
    """Keys are record ids (customer_id, demand_id) as decimal ASCII, not personal data."""
    return None if key is None else key.decode("utf-8", "replace")


def _submit_fresh(pipeline: Stage, msgs: list[Message]) -> None:
    pipeline.submit(Batch([Envelope(m) for m in msgs]))


def _messages(groups: Iterable[list[Any]]) -> list[Message]:
    return [Message(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
            for records in groups for r in records]


def by_partition_envelopes(envs: list[Envelope]) -> dict[tuple[str, int], list[Envelope]]:
    """Live envelopes by (topic, partition), in offset order (held ones are not live)."""
    out: dict[tuple[str, int], list[Envelope]] = defaultdict(list)
    for env in envs:
        out[(env.msg.topic, env.msg.partition)].append(env)
    for group in out.values():
        group.sort(key=lambda e: e.msg.offset)
    return out


def by_partition(msgs: list[Message]) -> dict[tuple[str, int], list[Message]]:
    out: dict[tuple[str, int], list[Message]] = defaultdict(list)
    for m in msgs:
        out[(m.topic, m.partition)].append(m)
    return out
