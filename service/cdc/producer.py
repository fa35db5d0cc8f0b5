"""The CDC producer: CRM write-ahead log -> Avro events on Kafka, nothing lost.

Transactions come from a :class:`~service.cdc.source.ChangeSource`: by default the streaming
replication protocol, or the SQL decoding interface (``capture_transport``). The delivery rule
is the same for both: take a batch of whole transactions, publish every event, wait for the
broker to acknowledge all of them (acks=all, idempotent producer), and only then confirm the
slot past their commits. A crash anywhere re-reads the same transactions and re-sends the
same events with the same ids; nothing committed is skipped.

One producer captures at a time: the active one holds a session-level advisory lock; a
standby polls for it and takes over when the active one's session ends.

Snapshots follow DBLog's watermarks: write a low watermark, read a chunk, write a high
watermark; rows that change between the two in the log are dropped from the chunk (the log's
event is newer); the rest are published as READ events positioned at the high watermark.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

import psycopg
import psycopg2.errors
import structlog
from kafka.codec import zstd_encode
from kafka.errors import KafkaError, KafkaTimeoutError
from psycopg import sql

from service import pg
from service.avro import SchemaRegistry
from service.cdc import contract, pgoutput, slot_guard
from service.cdc.capture import (
    CAPTURED_TABLES,
    CONTRACT_DDL,
    CONTRACT_TABLE,
    LETTERS_SENT_TABLE,
    OWN_SCHEMA,
    RETYPE_REASON,
    TRUNCATES_TABLE,
    WATERMARK_TABLE,
    Retype,
    TableInfo,
    chunk_query,
    ensure_capture_objects,
    lines_query,
    normalised_filters,
    note_column_types,
    note_table_identities,
    publication_drift,
    read_table_info,
    repair_publication,
    request_snapshot,
    snapshot_name,
    typed_or_rejected,
    typed_row,
)
from service.cdc.dead_letters import CaptureLetter, TextRow, as_text, key_text, text_row
from service.cdc.events import (
    CREATE,
    DELETE,
    READ,
    TRUNCATE,
    UPDATE,
    CommittedTxn,
    Outgoing,
    References,
    RowChange,
    build_events,
    canonical,
    converter_for,
    event_id,
    split_key_change,
    truncate_event,
)
from service.cdc.prerequisites import check_capture_privileges
from service.cdc.profile import EVENT_KIND, EntityMapping, SourceProfile, load_profile
from service.cdc.source import ChangeSource, source_for
from service.cdc.zone import crm_naive_zone
from service.consumer.policy import RetryPolicy
from service.errors import (
    CaptureBroken,
    CaptureRejected,
    CaptureStoppedAtTruncate,
    ConnectionLost,
    PgOutputError,
    PublicationNotRepaired,
    Retryable,
    SlotLost,
    SourceContractBroken,
    SourceContractError,
    StackUnavailable,
    UnrepresentableValue,
    UnresolvedReference,
)
from service.faults import TRANSIENT_CLASSES, transient
from service.health import Health, serve
from service.kafka_io import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    close_producer,
    make_producer,
    max_message_bytes,
)
from service.metrics import ProducerMetrics
from service.ops import (
    CAPTURE_COSTS_DDL,
    CAPTURE_COSTS_TABLE,
    oldest_transaction,
    read_slot,
    slot_wal_danger,
)
from service.pg import PgConn, privilege_missing
from service.settings import Settings

log = structlog.get_logger("producer")

HEARTBEAT_PREFIX = "crm-erp-sync.heartbeat"
# Each query costs the CRM a little CPU; at one batch per transaction (a steady low rate on the
# streaming transport) per-batch checks would cost it more than decoding does. So the capture
# lock's session is checked, and new snapshot requests are looked for, at most this often.
LOCK_CHECK_S = 1.0
SNAPSHOT_POLL_S = 1.0
# How often the publication is checked for captured tables dropped from it (one query).
PUBLICATION_CHECK_S = 5.0
# While capture is stopped on a broken slot or publication, how often the producer looks
# whether `crm-erp-sync resync` has run.
BLOCKED_POLL_S = 2.0


def connect(dsn: str) -> PgConn:
    """A CRM session whose text output of timestamps is UTC (pgoutput sends text)."""
    conn = pg.connect(dsn, "CRM")
    conn.execute("SET TimeZone = 'UTC'")
    return conn


def lock_key(slot_name: str) -> str:
    return f"crm-erp-sync:{slot_name}"


# What build_events raises for one change that cannot become an event: a capture dead letter
# (redriven by re-reading the row once the CRM is right); the rest keeps flowing. A table that
# breaks the source contract never gets here: its Relation message stops capture first
# (SourceContractBroken, see _check_relation). The SourceContractError build_events may still
# raise is about one row (a NULL reference key), so it is a letter too.
BUILD_ERRORS = (CaptureRejected, PgOutputError, SourceContractError, UnresolvedReference)
# What a query naming a captured table's columns raises after a DDL changed the table (a
# column renamed, dropped or retyped): checked against the source contract.
SCHEMA_ERRORS = (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable,
                 psycopg.errors.UndefinedFunction, psycopg.errors.DatatypeMismatch)
# fastavro's writer raises these for a value its schema cannot take (a NaN decimal, a scale
# that no longer fits, a wrong type)
AVRO_ERRORS = (TypeError, ValueError, ArithmeticError, AttributeError)
# Batch and record framing around one record's key, value and headers (Kafka's record batch
# header is 61 bytes; a record's own varints and the header names take the rest).
RECORD_OVERHEAD = 512
# kafka-python refuses a record larger than this before compression (max_request_size).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
COMPRESSION = "zstd"


def _typed(info: TableInfo, raw: dict[str, Any]) -> tuple[dict[str, Any], Rejection | None]:
    """A snapshot row (read as text) converted like the log's values, or its Rejection
    (capture.typed_or_rejected's error, with the row as text for the dead letter)."""
    typed = typed_or_rejected(info, raw)
    if isinstance(typed, CaptureRejected):
        return {}, Rejection(typed, None, text_row(raw))
    return typed, None


def _rejected(exc: Exception) -> CaptureRejected:
    if isinstance(exc, CaptureRejected):
        return exc
    if isinstance(exc, SourceContractError):
        return CaptureRejected(f"source contract broken: {exc.problem}", column=exc.column)
    if isinstance(exc, UnresolvedReference):
        return CaptureRejected(f"the {exc.entity} it names cannot be found", column=exc.column)
    # PgOutputError messages are ours: table and operation, never a value
    return CaptureRejected(f"cannot become an event: {exc}")


# A snapshot row: its entity, the row as text, typed (empty when rejected), its Rejection.
_Read = tuple[EntityMapping, dict[str, Any], dict[str, Any], "Rejection | None"]


@dataclass(frozen=True)
class _Position:
    lsn: int
    xid: int
    commit_time: datetime
    snapshot: bool = False
    first_seq: int = 0


@dataclass(frozen=True)
class Rejection:
    """Why a decoded change cannot become an event, with its rows as text."""

    error: CaptureRejected
    before: TextRow | None
    after: TextRow | None


@dataclass
class _Relation:
    table: str
    columns: list[tuple[str, Callable[[str], Any]]]
    # Set when the table broke the source contract when these changes were written but has
    # been fixed since: each change under this relation is a capture dead letter.
    broken: CaptureRejected | None = None


# Called with each Relation message: None when it keeps the source contract, a rejection for
# its changes when it broke it then (the table is fixed now); raises SourceContractBroken when
# the table breaks it still (capture stops).
RelationCheck = Callable[[pgoutput.Relation], CaptureRejected | None]


class ChangeDecoder:
    """Turns peeked pgoutput rows into committed transactions with typed rows.

    ``naive_zone`` is the zone of ``timestamp without time zone`` values; ``check_relation``
    sees every Relation message before any change under it (the source contract,
    service.cdc.contract); what it raises ends ``feed``.
    """

    def __init__(self, naive_zone: tzinfo = UTC,
                 check_relation: RelationCheck | None = None) -> None:
        self._naive_zone = naive_zone  # the zone of `timestamp without time zone` values
        self._check_relation = check_relation
        self._relations: dict[int, _Relation] = {}
        self._txn: CommittedTxn | None = None
        self.watermarks: list[tuple[CommittedTxn, int, str]] = []

    def _row(self, relation_id: int, tuple_data: Any) -> dict[str, Any] | None:
        if tuple_data is None:
            return None
        rel = self._relations.get(relation_id)
        if rel is None:
            raise PgOutputError(f"change for unknown relation id {relation_id}")
        row: dict[str, Any] = {}
        for (name, convert), value in zip(rel.columns, tuple_data, strict=True):
            if value is pgoutput.UNCHANGED_TOAST:
                raise CaptureRejected("unchanged TOASTed value without the old row: the table "
                                      "needs REPLICA IDENTITY FULL", name)
            try:
                row[name] = None if value is pgoutput.NULL else convert(value)
            except CaptureRejected as exc:
                raise UnrepresentableValue(exc.detail, name) from None
            except (ValueError, ArithmeticError) as exc:
                # a text the converter cannot read; the library's message quotes the value
                raise UnrepresentableValue(f"cannot be read ({type(exc).__name__})",
                                           name) from None
        return row

    def _raw(self, relation_id: int, tuple_data: Any) -> TextRow | None:
        """A tuple's column values as pgoutput sent them (text), for a capture dead letter."""
        if tuple_data is None:
            return None
        rel = self._relations[relation_id]
        out: TextRow = {}
        for (name, _), value in zip(rel.columns, tuple_data, strict=True):
            if value is pgoutput.NULL:
                out[name] = None
            elif value is pgoutput.UNCHANGED_TOAST:
                out[name] = "[unchanged TOASTed value, not sent by PostgreSQL]"
            else:
                out[name] = as_text(value)
        return out

    def _change(self, txn: CommittedTxn, msg: Any) -> None:
        """Append one Insert/Update/Delete to the transaction; a change whose values cannot
        be read is kept as a rejection at its place (a placeholder without rows)."""
        relation = self._relations[msg.relation_id]
        table = relation.table
        if isinstance(msg, pgoutput.Insert):
            op, old, new = CREATE, None, msg.new
        elif isinstance(msg, pgoutput.Update):
            # Even with REPLICA IDENTITY FULL, PostgreSQL 15 sends an unchanged out-of-line
            # (TOASTed) column of the new row as 'u'; the old row carries its full value.
            op, old, new = UPDATE, msg.old, pgoutput.fill_unchanged_toast(msg.new, msg.old)
        else:
            op, old, new = DELETE, msg.old if msg.old is not None else msg.key, None
        try:
            if relation.broken is not None:
                raise relation.broken
            change = RowChange(table, op, self._row(msg.relation_id, old),
                               self._row(msg.relation_id, new))
        except CaptureRejected as exc:
            txn.rejected[len(txn.changes)] = Rejection(
                exc, self._raw(msg.relation_id, old), self._raw(msg.relation_id, new))
            change = RowChange(table, op, None, None)
        txn.changes.append(change)

    @property
    def open_changes(self) -> int:
        """Changes held of the transaction under way (0 between transactions)."""
        return 0 if self._txn is None else len(self._txn.changes)

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit (pieces cut meanwhile included)."""
        return self._txn is not None

    def cut(self) -> CommittedTxn | None:
        """The transaction under way so far, as a piece (``complete`` False); its next changes
        start a new piece. None between transactions or when nothing is held. This is what
        bounds memory for a big transaction: no more than one piece of it is ever held."""
        txn = self._txn
        if txn is None or not txn.changes:
            return None
        self._txn = CommittedTxn(txn.xid, txn.commit_lsn, 0, txn.commit_time,
                                 first_change=txn.first_change + len(txn.changes))
        txn.complete = False
        return txn

    def feed(self, data: bytes) -> CommittedTxn | None:
        """Feed one message; returns the transaction (or its last piece, see :meth:`cut`)
        when its Commit arrives."""
        msg = pgoutput.decode_message(data)
        if isinstance(msg, pgoutput.Begin):
            self._txn = CommittedTxn(msg.xid, msg.final_lsn, 0, msg.commit_time)
            return None
        if isinstance(msg, pgoutput.Relation):
            broken = self._check_relation(msg) if self._check_relation is not None else None
            self._relations[msg.relation_id] = _Relation(
                f"{msg.namespace}.{msg.name}",
                [(c.name, converter_for(c.type_oid, self._naive_zone)) for c in msg.columns],
                broken)
            return None
        txn = self._txn
        if isinstance(msg, pgoutput.Commit):
            if txn is None:
                raise PgOutputError("Commit without Begin")
            txn.end_lsn = msg.end_lsn
            txn.commit_lsn = msg.commit_lsn
            self._txn = None
            return txn
        if txn is None:
            if isinstance(msg, pgoutput.Message):
                return None  # a non-transactional logical message: not ours to publish
            raise PgOutputError(f"{type(msg).__name__} outside a transaction")
        if isinstance(msg, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
            if msg.relation_id not in self._relations:
                raise PgOutputError(f"change for unknown relation id {msg.relation_id}")
            self._change(txn, msg)
        elif isinstance(msg, pgoutput.Truncate):
            # One change without rows per truncated table, at its place in the transaction
            # (PostgreSQL sends the Relation of each before the Truncate). What becomes of it
            # is the producer's choice (CRM_ERP_SYNC_ON_TRUNCATE).
            for relation_id in msg.relation_ids:
                rel = self._relations.get(relation_id)
                if rel is None:
                    raise PgOutputError(f"truncate of unknown relation id {relation_id}")
                txn.changes.append(RowChange(rel.table, TRUNCATE, None, None))
        return None


@dataclass
class _Chunk:
    snapshot_id: int
    chunk_no: int
    table: str
    rows: dict[tuple[str, str], dict[str, Any]]
    last_key: str | None
    low_id: int = 0
    high_id: int = 0
    window_open: bool = False
    # rows whose values cannot become an event (NaN, infinity, BC dates): capture letters
    rejected: dict[tuple[str, str], Rejection] = field(default_factory=dict)


def snapshot_event_id(snapshot_id: int, chunk_no: int, what: str, key: str) -> str:
    """A snapshot read's event id: ``snap/<snapshot id>/<chunk no>/<what>/<key>``, ``what``
    the event kind (or a letter's table). A chunk read again after a crash (published, its
    progress not recorded) is at a new high watermark, so the position-based id
    (``snap/<lsn>/<seq>``) would differ; this one names the same read of the same row the
    same, and the consumer knows the copy by it. The kind (or table) has no ``/``, so the
    key, however spelled, is the rest: ids of different rows never collide."""
    return f"snap/{snapshot_id}/{chunk_no}/{what}/{key}"


def _chunk_ids(chunk: _Chunk, items: list[Outgoing | CaptureLetter]
               ) -> list[Outgoing | CaptureLetter]:
    """The chunk's events and letters with :func:`snapshot_event_id` ids. Their positions
    (source lsn, seq) stay the high watermark's: ordering against the log is unchanged."""
    out: list[Outgoing | CaptureLetter] = []
    for item in items:
        if isinstance(item, Outgoing):
            eid = snapshot_event_id(chunk.snapshot_id, chunk.chunk_no, item.kind,
                                    str(item.record["key"]))
            out.append(replace(item, event_id=eid, record={**item.record, "event_id": eid}))
        else:
            out.append(replace(item, event_id=snapshot_event_id(
                chunk.snapshot_id, chunk.chunk_no, item.table, key_text(item.primary_key))))
    return out


@dataclass(frozen=True)
class TruncateSeen:
    """A TRUNCATE of a captured table and what became of it ('propagated', 'skipped',
    'stopped'), recorded in crm_erp_sync.truncates for `status`."""

    table: str
    commit_lsn: int
    xid: int
    commit_time: datetime
    outcome: str


class _Wire(NamedTuple):
    """An event as it goes to Kafka. Its record (the canonical dicts, several times the size
    of its Avro bytes) is dropped once encoded, unless ``on_acknowledged`` wants it: a built
    batch waits while the previous one is acknowledged, and memory is what it holds then."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    kind: str
    event: Outgoing | None


@dataclass
class _Batch:
    """One batch of transactions on its way from the source to the broker (see
    :meth:`CdcProducer.step`): built and encoded, then sent, then confirmed once acked."""

    # in commit order: each event's record, or a capture dead letter; emptied once sent
    encoded: list[_Wire | CaptureLetter]
    complete: int  # whole transactions it ends
    last_end: int  # the end LSN of its last whole transaction; 0 when it ends none
    progress: list[tuple[_Chunk, int]]  # snapshot chunks it closes, with their rows
    truncates: list[TruncateSeen]
    futures: list[Any] = field(default_factory=list)
    published: list[tuple[str, str]] = field(default_factory=list)  # (topic, kind) per event
    events: list[Outgoing] = field(default_factory=list)  # kept for on_acknowledged only
    letters: int = 0
    done: int = 0  # futures[:done] are known complete (acknowledged or failed)

    def in_flight(self) -> bool:
        """True while some event of the batch awaits the broker's answer (amortized O(1):
        futures complete roughly in order, and those seen complete are not looked at
        again)."""
        futures, done = self.futures, self.done
        while done < len(futures) and futures[done].is_done:
            done += 1
        self.done = done
        return done < len(futures)


@dataclass
class ProducerStats:
    transactions: int = 0
    events: int = 0
    snapshot_rows: int = 0
    batches: int = 0
    heartbeats: int = 0
    dead_letters: int = 0
    truncates: int = 0
    last_commit_lsn: int = 0
    started: float = field(default_factory=time.monotonic)


class CdcProducer:
    def __init__(self, settings: Settings, registry: SchemaRegistry,
                 kafka_producer: Any | None = None,
                 profile: SourceProfile | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.profile = profile if profile is not None else load_profile(settings.source_profile)
        self._tables: dict[str, TableInfo] = {}
        self._naive_zone: tzinfo = UTC
        self._ceiling = 0  # slot_guard: the recorded bound of what the slot may confirm
        self._bound = 0  # the same, exact, for the sources of this process (0: none yet)
        self._conn: PgConn | None = None
        self.refs = References(self._load_reference)
        self._kafka = kafka_producer
        self._limits: dict[str, int] = {}
        self._lock_conn: PgConn | None = None
        self._reconnect_delays = RetryPolicy.RECONNECT.delays()
        self._stop = threading.Event()
        self.stats = ProducerStats()
        self.metrics = ProducerMetrics()
        self.health = Health(settings, self.metrics)
        self._last_slot_check = 0.0
        self._warned_wal_danger = False  # logged once per episode, not every check
        self._source: ChangeSource | None = None
        self._next_snapshot_poll = 0.0
        self._chunk: _Chunk | None = None
        self._pending_progress: list[tuple[_Chunk, int]] = []  # of the batch being built
        # The batch sent and not yet acknowledged (step: the next one is read meanwhile).
        self._sent: _Batch | None = None
        # (commit LSN, first change of the next piece) -> its first event seq
        self._piece_seqs: dict[tuple[int, int], int] = {}
        self._letters_resent = 0  # of the last _send_letters: already on the DLQ topic
        self._costs_table = False  # CAPTURE_COSTS_TABLE created by this process
        # TRUNCATEs met in the batch being built, recorded once it is published
        self._truncates: list[TruncateSeen] = []
        # Set while capture waits before a TRUNCATE (CRM_ERP_SYNC_ON_TRUNCATE=stop)
        self.stopped_at: CaptureStoppedAtTruncate | None = None
        self._last_advance = time.monotonic()
        self._topics = {"customer": settings.sales_topic, "order": settings.sales_topic,
                        "market_demand": settings.market_topic}
        # The source contract: each table's last good shape (from the catalog), and what
        # stops capture now (None while capturing).
        self._known: dict[str, contract.Shape] = {}
        # the profile's row filters as PostgreSQL prints them (set by ensure_slot)
        self._want_filters: dict[str, str | None] | None = None
        self._broken: list[contract.Violation] | None = None
        # tables whose types were recorded while they broke the contract (see
        # _record_broken_types): compared with the record again once they keep it
        self._broken_recorded: set[str] = set()
        self._contract_delays = RetryPolicy.RECONNECT.delays()
        self._last_publication_check = 0.0
        # Called with the events of each batch once the broker acknowledged them all
        # (benchmarks measure commit-to-acknowledgement latency with it).
        self.on_acknowledged: Callable[[list[Outgoing]], None] | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def kafka(self) -> Any:
        """The Kafka producer, built on first use and again after a broker fault dropped it;
        each time the topics' size limits are read again (an operator may have raised them).
        Compression is zstd: CRM rows are text, and a long note compresses several times."""
        if self._kafka is None:
            self._limits = max_message_bytes(
                self.settings, [self.settings.sales_topic, self.settings.market_topic])
            self._kafka = make_producer(self.settings, compression_type=COMPRESSION,
                                        max_request_size=MAX_REQUEST_BYTES)
        return self._kafka

    # ---- leadership -------------------------------------------------------------------
    def acquire_leadership(self, conn: PgConn, wait: bool = True) -> bool:
        """Block until this process holds the capture lock (or stop() is called).

        Before it waits as a standby, raises PrivilegeMissing (a ConfigError: exit 2) when
        the CRM role lacks a grant capture needs, and so does the active producer before it
        reads anything (``_refuse_without_grants``)."""
        waited = False
        while not self._stop.is_set():
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                               (lock_key(self.settings.slot_name),)).fetchone()
            self.health.beat()
            self.health.recovered()  # the CRM answered: connected (again)
            if row and row[0]:
                if not waited:  # a standby checked before it waited
                    self._refuse_without_grants(conn, "start capturing",
                                                "checked at start, before anything is read")
                log.info("capture_lock_acquired", slot=self.settings.slot_name,
                         after_standby=waited)
                self.metrics.active.set(1)
                self.health.set_ready(True, "active", role="active")
                return True
            if not wait:
                return False
            if not waited:
                self._refuse_without_grants(
                    conn, "take over capture from the producer that holds the capture lock",
                    "checked before waiting as its standby")
                log.info("standby", reason="another producer holds the capture lock")
                self.metrics.active.set(0)
                self.health.set_ready(True, "standby", role="standby")
            waited = True
            self._stop.wait(1.0)
        return False

    def _refuse_without_grants(self, conn: PgConn, action: str, when: str) -> None:
        """Runs the read-only privilege checks of `setup --check` that a producer's start
        depends on (``check_capture_privileges``: REPLICATION, SELECT on the captured tables,
        the producer's schema) and raises PrivilegeMissing (a ConfigError: exit 2) naming
        the role, each object and its grant: "cannot ``action`` (``when``; the failed
        checks): the grants".

        Once per start (or reconnect), before the active producer reads anything, and
        before a standby waits: a standby lacking a grant would wait, ready, and fail only
        when it takes over (a failover failing when it is needed); an active producer that
        cannot read a captured table would run, healthy, until the next snapshot of it, and
        then exit at every start (newcomer9 F11). The cost is a few catalog reads per
        captured table, once."""
        failed = [c for c in check_capture_privileges(
            conn, tables=self.profile.tables,
            row_filters=any(e.row_filter is not None for e in self.profile.entities.values()))
            if not c.ok]
        if not failed:
            return
        # each once: a schema's missing USAGE is the fix of every captured table in it
        fixes = " ".join(dict.fromkeys(line.strip() for c in failed if c.fix_sql
                                       for line in c.fix_sql.splitlines()))
        listed = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        raise privilege_missing(
            conn, "CRM", f"{action} ({when}; {listed})",
            f"{fixes} (`crm-erp-sync setup --check --role {{role_name}}` prints every "
            "prerequisite)")

    # ---- setup ------------------------------------------------------------------------
    def ensure_slot(self, conn: PgConn) -> bool:
        """Create the slot if missing; on first creation request the initial snapshot.

        Raises SourceContractBroken (naming table, column and the fix) before anything is
        created when a captured table breaks the source contract (service.cdc.contract), and
        CaptureBroken when the recorded slot or publication is gone or replaced."""
        shapes = contract.read_shapes(conn, self.profile.tables)
        violations = contract.check_profile(self.profile, shapes, known=self._known)
        if violations:
            raise SourceContractBroken(violations)
        self._known = {t: shape for t, shape in shapes.items() if shape is not None}
        self._naive_zone = crm_naive_zone(conn, self.settings)
        self._tables = read_table_info(conn, self.profile, self._naive_zone)
        # Before the publication is (re)created: a dropped one is a gap, not a first start.
        slot_guard.ensure_table(conn)
        self._check_capture(conn)
        # The profile's row filters as PostgreSQL prints them, once per start (a temporary
        # table each): what the publication is compared with from now on.
        self._want_filters = normalised_filters(conn, self.profile)
        ensure_capture_objects(conn, self.settings, self.profile, repair=False)
        # Before the slot exists the initial snapshot reads every table anyway.
        self._sync_publication(conn, resnapshot=conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
            (self.settings.slot_name,)).fetchone() is not None)
        self._conn = conn
        exists = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                              (self.settings.slot_name,)).fetchone()
        if exists and exists[0] == "lost":
            self._slot_lost(conn)
            exists = None
        if exists:
            if slot_guard.load(conn, self.settings.slot_name) is None:
                slot_guard.record(conn, self.settings)  # kept no state yet (an upgrade)
            self._load_ceiling(conn)
            return False
        # Requests first, then the slot: a crash in between leaves requests that run once the
        # slot exists, never a slot without its initial snapshot.
        pending = conn.execute(
            f"SELECT count(*) FROM {OWN_SCHEMA}.snapshots WHERE reason = 'initial' "
            "AND state = 'pending'").fetchone()
        if not pending or not pending[0]:
            for ent in self.profile.snapshot_entities:
                if ent.kind is not None:
                    conn.execute(f"INSERT INTO {OWN_SCHEMA}.snapshots (table_name, reason) "
                                 "VALUES (%s, 'initial')", (ent.table,))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                     (self.settings.slot_name,))
        slot_guard.record(conn, self.settings)
        self._load_ceiling(conn)
        self._bound = 0
        log.info("slot_created", slot=self.settings.slot_name, initial_snapshot=True)
        return True

    def _load_ceiling(self, conn: PgConn) -> None:
        state = slot_guard.load(conn, self.settings.slot_name)
        self._ceiling = state.confirmed_ceiling if state is not None else 0

    def _check_capture(self, conn: PgConn) -> None:
        """Raises CaptureBroken when the recorded slot or publication is gone or replaced
        (the problem is recorded for `status` first)."""
        problem = slot_guard.inspect(conn, self.settings,
                                     slot_guard.load(conn, self.settings.slot_name),
                                     confirmed_at_most=self._bound or None)
        if (problem is not None and problem.kind == "slot_lost"
                and self.settings.on_slot_lost == "resnapshot"):
            return  # ensure_slot's _slot_lost starts over (and clears the record)
        if problem is not None:
            slot_guard.mark(conn, self.settings, problem)
            raise problem

    def _capture_stopped(self, problem: CaptureBroken) -> None:
        """Capture cannot go on without a resync: stay up (an always-on process that exits
        would only be restarted into the same state), not ready, saying why and how to
        recover, until `crm-erp-sync resync` cleared the problem; then capture again."""
        self._reset_capture_state()
        self.metrics.active.set(0)
        self.health.recovered()  # connected: not "reconnecting", stopped for a reason
        self.health.set_ready(False, "capture_stopped", problem=problem.kind,
                              reason=problem.detail, recover=problem.command)
        log.error("capture_stopped", problem=problem.kind, reason=problem.detail,
                  recover=problem.command)
        while not self._stop.is_set():
            self.health.beat()
            self._stop.wait(BLOCKED_POLL_S)
            assert self._conn is not None and self._lock_conn is not None
            self._lock_conn.execute("SELECT 1")  # a lost lock session raises: reconnect
            state = slot_guard.load(self._conn, self.settings.slot_name)
            if state is None or state.problem is None:
                log.info("capture_resumed_after_resync", slot=self.settings.slot_name)
                self._bound = 0  # a new slot: nothing confirmed through it yet
                self.health.set_ready(True, "active", role="active")
                self.metrics.active.set(1)
                return

    def _slot_lost(self, conn: PgConn) -> None:
        """The slot's WAL is gone: fail (default), or start over with a new full snapshot."""
        if self.settings.on_slot_lost != "resnapshot":
            raise SlotLost(self.settings.slot_name)
        log.error("slot_lost_resnapshotting", slot=self.settings.slot_name,
                  hint="rows deleted while the slot was lost: crm-erp-sync reconcile --repair")
        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.settings.slot_name,))
        conn.execute(f"UPDATE {OWN_SCHEMA}.snapshots SET state = 'done', finished_at = now() "
                     "WHERE state = 'pending' AND reason = 'initial'")

    # ---- main loop --------------------------------------------------------------------
    def run(self, *, until_idle: bool = False) -> ProducerStats:
        """Capture until stop(); with until_idle, return once the slot has nothing pending
        and no snapshot is left.

        Raises StackUnavailable when the CRM cannot be reached at start (exit 3). Once
        running, no transient fault ends it: a lost CRM session (restart, kill) or an
        unreachable broker is retried with ``RetryPolicy.RECONNECT`` backoff, the capture lock
        is taken again (or waited for, as a standby), and capture resumes from the slot's
        confirmed position; ``/readyz`` says "reconnecting" meanwhile.
        """
        http = serve(self.settings, self.health)
        try:
            self._lock_conn = connect(self.settings.crm_dsn)
            self._conn = connect(self.settings.crm_dsn)
        except StackUnavailable:
            if http is not None:
                http.close()
            raise
        self._reconnect_delays = RetryPolicy.RECONNECT.delays()
        try:
            while not self._stop.is_set():
                try:
                    if self._lock_conn is None or self._conn is None:
                        self._lock_conn = connect(self.settings.crm_dsn)
                        self._conn = connect(self.settings.crm_dsn)
                    if not self.acquire_leadership(self._lock_conn):
                        break
                    try:
                        if not self._start_capture(self._lock_conn, self._conn, until_idle):
                            break
                        self._capture(self._lock_conn, self._conn, until_idle)
                        break
                    except CaptureBroken as problem:
                        if self._conn is not None:
                            slot_guard.mark(self._conn, self.settings, problem)  # for status
                        if until_idle:
                            raise
                        self._capture_stopped(problem)  # until resync (a lost session raises)
                except TRANSIENT_CLASSES as exc:
                    fault = transient(exc, "CRM database")
                    if fault is None:
                        raise
                    self._session_lost(fault, next(self._reconnect_delays))
        finally:
            self.health.set_ready(False, "stopping")
            self.metrics.active.set(0)
            if http is not None:
                http.close()
            self._close_kafka(flush=True)
            if self._source is not None:
                self._source.close()
                self._source = None
            self._close_sessions()  # releases the capture lock: a standby takes over
        return self.stats

    def _start_capture(self, lock_conn: PgConn, conn: PgConn, until_idle: bool) -> bool:
        """ensure_slot, waiting (not ready, re-checking with backoff) while the source
        contract is broken; False when stop() was called meanwhile. With ``until_idle`` a
        broken contract raises SourceContractBroken instead (a one-shot run cannot wait).
        A privilege the CRM role lacks raises PrivilegeMissing (a ConfigError: exit 2), not
        retried: only a grant helps."""
        while not self._stop.is_set():
            try:
                self.ensure_slot(conn)
            except psycopg.errors.InsufficientPrivilege as exc:
                # Those ensure_slot's steps do not name themselves (the slot, the snapshot
                # requests, the state row): PostgreSQL's own words name the object.
                raise privilege_missing(
                    conn, "CRM", f"start capturing ({exc.diag.message_primary})",
                    "run `crm-erp-sync setup --check --role {role_name}` and the SQL it "
                    "prints") from exc
            except SourceContractBroken as exc:
                if until_idle:
                    raise
                self._contract_stopped(conn, exc.violations)
                self._stop.wait(next(self._contract_delays))
                lock_conn.execute("SELECT 1")  # a lost lock session ends the wait too
                self.health.beat()
                continue
            self._contract_restored(conn)
            return True
        return False

    def _capture(self, lock_conn: PgConn, conn: PgConn, until_idle: bool) -> None:
        """The active producer's loop, until stop() (or idle). A lost CRM session raises
        (the caller reconnects and takes the lock again); a broker fault is retried here."""
        backoff = RetryPolicy.DEFAULT.delays()
        lock_checked = 0.0
        while not self._stop.is_set():
            self.health.beat()
            # Lose the lock's session, lose the lock: stop capturing before anything else.
            if time.monotonic() >= lock_checked + LOCK_CHECK_S:
                lock_conn.execute("SELECT 1")
                lock_checked = time.monotonic()
            if self.stopped_at is not None:
                # Waits for the operator (a new CRM_ERP_SYNC_ON_TRUNCATE and a restart): up,
                # holding the lock, the slot where it is; `status` says what to do.
                if until_idle:
                    raise self.stopped_at
                # again each time: a reconnect (acquire_leadership) reports "active"
                self.health.set_ready(False, "capture_stopped", reason=str(self.stopped_at))
                self._stop.wait(LOCK_CHECK_S)
                continue
            if self._broken is not None and not self._contract_recheck(conn):
                self._stop.wait(next(self._contract_delays))
                continue
            try:
                moved = self.step(conn)
                self._observe_slot(conn)
                self._observe_publication(conn)
            except SourceContractBroken as exc:
                # Raised while decoding, before anything of the transaction was published:
                # the source is dropped without a last position report (measured: the
                # stream's close moved the slot past the Relation message read), so the
                # transaction is decoded again once the table is fixed.
                if until_idle:
                    raise
                self._abandon_source()
                self._contract_stopped(conn, exc.violations)
                self._stop.wait(next(self._contract_delays))
                continue
            except (psycopg.errors.ObjectNotInPrerequisiteState,
                    psycopg2.errors.ObjectNotInPrerequisiteState) as exc:
                # Peeking a slot whose WAL was removed: not transient. ensure_slot fails
                # (SlotLost) or starts over; anything else is retried with backoff.
                log.warning("slot_not_readable", error=exc.diag.message_primary)
                self.ensure_slot(conn)
                self._reset_capture_state()
                self._stop.wait(next(backoff))
                continue
            except (psycopg.errors.UndefinedObject, psycopg2.errors.UndefinedObject) as exc:
                # "replication slot ... does not exist", "publication ... does not exist":
                # named and recorded by _check_capture; anything else is retried. The
                # stream's last keepalive first: psycopg2 confirmed an idle slot up to its WAL
                # end, and a bound older than that took our own slot for a replaced one
                # (newcomer9's F5: a dropped publication named "slot replaced").
                if self._source is not None:
                    self._bound = max(self._bound, self._source.confirm_bound())
                self._check_capture(conn)
                self._broker_fault(ConnectionLost(
                    f"replication slot not readable ({type(exc).__name__})"), next(backoff))
                continue
            except (KafkaError, StackUnavailable, Retryable) as exc:
                fault = transient(exc, "broker") if not isinstance(exc, Retryable) else exc
                if fault is None:
                    raise
                self._broker_fault(fault, next(backoff))
                continue
            backoff = RetryPolicy.DEFAULT.delays()
            self._reconnect_delays = RetryPolicy.RECONNECT.delays()
            self.health.recovered()
            if not moved:
                if (until_idle and self._chunk is None and self._caught_up(conn)
                        and not self._has_pending_snapshot(conn)):
                    return
                self._maybe_heartbeat(conn)  # the source itself waited for changes
        # stop(): the batch sent last is finished (acks, then confirm) as before pipelining,
        # so a graceful stop leaves nothing to re-send; a broker that does not answer now
        # leaves it unconfirmed (re-sent at the next start)
        last, self._sent = self._sent, None
        if last is not None and self._source is not None:
            try:
                self._finish(conn, self._source, last)
            except (KafkaError, Retryable) as exc:
                log.warning("last_batch_unconfirmed_at_stop", error=str(exc))

    # ---- source contract ----------------------------------------------------------------
    def _check_relation(self, relation: pgoutput.Relation) -> CaptureRejected | None:
        """The source contract on one Relation message (see ChangeDecoder).

        The message gives the table's shape when its next changes were written. When that
        shape breaks the contract, the catalog says whether the table breaks it still (raise
        SourceContractBroken: capture stops) or was fixed since (its changes of then are
        capture dead letters: redrive re-reads each row as it is now)."""
        table = relation.qualified_name
        ent = self.profile.table(table)
        if ent is None:
            return None
        shape = contract.Shape(table, relation.replica_identity,
                               {c.name: c.type_oid for c in relation.columns},
                               typmods={c.name: c.type_modifier for c in relation.columns})
        then = contract.check(ent, shape, known=self._known.get(table))
        conn = self._conn
        assert conn is not None
        if not then:
            seen = contract.retyped(ent, self._known.get(table), shape)
            if seen:
                self._note_retyped(conn, {table: seen})
            return None
        now = contract.check(ent, contract.read_shapes(conn, [table])[table],
                             known=self._known.get(table))
        if now:
            raise SourceContractBroken(now)
        first = then[0]
        log.warning("source_contract_broken_then_fixed", table=table, column=first.column,
                    problem=first.problem,
                    hint="changes written meanwhile are capture dead letters; "
                         "`crm-erp-sync dlq redrive` re-reads those rows")
        return CaptureRejected(
            f"written while {table} broke the source contract ({first.message}); the table "
            "is fixed now: redrive re-reads the row",
            None if first.column == contract.TABLE else first.column)

    @contextmanager
    def _reading_tables(self, conn: PgConn) -> Iterator[None]:
        """Around a read of captured tables by column name (a snapshot chunk, a referenced
        row): the query fails when a DDL broke the table since start-up; that is the source
        contract (SourceContractBroken, capture stops), not a crash."""
        try:
            yield
        except SCHEMA_ERRORS:
            violations = contract.check_profile(
                self.profile, contract.read_shapes(conn, self.profile.tables),
                known=self._known)
            if violations:
                raise SourceContractBroken(violations) from None
            raise

    def _contract_stopped(self, conn: PgConn, violations: list[contract.Violation]) -> None:
        """Capture stops on a broken contract: not ready, the metric and ``status`` name
        table and column, one error line per new problem (no values)."""
        previous = {(v.table, v.column) for v in self._broken or []}
        self._broken = violations
        first = violations[0]
        self.health.set_ready(False, "source_contract_broken", table=first.table,
                              column=first.column, problem=first.problem)
        for v in violations:
            self.metrics.contract_violations.labels(v.table, v.column).set(1)
            if (v.table, v.column) not in previous:
                log.error("source_contract_broken", table=v.table, column=v.column,
                          problem=v.problem, fix=v.fix,
                          hint="capture stopped before publishing anything of the change; "
                               "the slot does not move; capture resumes by itself once the "
                               "table is fixed")
        self._record_violations(conn, violations)

    def _contract_recheck(self, conn: PgConn) -> bool:
        """While stopped: True once the catalog keeps the contract again (capture resumes
        from the slot's confirmed position), else the state is refreshed and False."""
        shapes = contract.read_shapes(conn, self.profile.tables)
        violations = contract.check_profile(self.profile, shapes, known=self._known)
        if not violations:
            try:
                self._sync_publication(conn)
            except SourceContractBroken as exc:
                violations = exc.violations
        if violations:
            self._record_broken_types(conn, {
                t: shape for t, shape in shapes.items() if t in {v.table for v in violations}})
            self._contract_stopped(conn, violations)
            return False
        self._known.update({t: shape for t, shape in shapes.items() if shape is not None})
        self._tables = read_table_info(conn, self.profile, self._naive_zone)
        self._contract_restored(conn)
        return True

    def _contract_restored(self, conn: PgConn) -> None:
        """The contract holds (at start-up, or after a fix): clear what stop recorded."""
        for v in self._broken or []:
            self.metrics.contract_violations.labels(v.table, v.column).set(0)
        if self._broken is not None:
            log.info("source_contract_restored",
                     tables=sorted({v.table for v in self._broken}))
            self.health.set_ready(True, "active", role="active")
        self._broken = None
        self._contract_delays = RetryPolicy.RECONNECT.delays()
        self._record_violations(conn, [])
        self._note_recreated(conn)
        self._note_retyped(conn, {})

    def _note_recreated(self, conn: PgConn) -> None:
        """A captured table dropped and re-created (a new OID under its name; see
        CAPTURED_TABLES): its old rows left no delete events, so they stay live in the ERP.
        Recorded for `status` (until a reconcile of the entity) and logged; a refused write
        is logged, not fatal, like the contract state."""
        try:
            recreated = note_table_identities(conn, self.settings.slot_name,
                                              self.profile.tables)
        except psycopg.errors.InsufficientPrivilege:
            log.warning("captured_tables_not_written", table=CAPTURED_TABLES,
                        hint=f"GRANT SELECT, INSERT, UPDATE ON {CAPTURED_TABLES} to the "
                             "capture role, so that `status` names a dropped and re-created "
                             "table")
            return
        for table in recreated:
            log.warning("captured_table_recreated", table=table,
                        hint="the table was dropped and created again: it is re-snapshotted, "
                             "but rows dropped with the old table stay live in the ERP until "
                             "`crm-erp-sync reconcile --repair --entity ENTITY` (`status` "
                             "names the entity until then)")

    def _note_retyped(self, conn: PgConn, seen: dict[str, list[str]]) -> None:
        """A mapped column changed type and the contract holds: the table was rewritten
        (``ALTER COLUMN ... TYPE ... USING``), and a rewrite leaves no row change in the
        WAL, so a snapshot of the table is requested (``note_column_types``: the types are
        recorded, so a retype made while the producer was down is found at its start).

        ``seen``: the tables (and columns) a Relation message showed retyped against the
        shape captured under; {}: every captured table, against the recorded types (at
        start and after a contract fix, ``self._known`` being the catalog's shapes). Logged
        by table and column, never a value. Without the grants on ``captured_tables`` the
        snapshot of each table in ``seen`` is still requested (a retype while the producer
        was down is then not found)."""
        if seen:
            shapes = contract.read_shapes(conn, list(seen))
            # A later DDL may break the table by now: no snapshot of it (it could not be
            # read), and never its shape as the last good one (the fix SQL restores that).
            broken = {t: shape for t, shape in shapes.items() if shape is not None
                      and (ent := self.profile.table(t)) is not None
                      and contract.check(ent, shape)}
            if broken:
                self._record_broken_types(conn, broken)
                shapes = {t: shape for t, shape in shapes.items() if t not in broken}
                seen = {t: c for t, c in seen.items() if t not in broken}
                if not seen:
                    return
        else:
            shapes = {t: self._known.get(t) for t in self.profile.tables}
        slot = self.settings.slot_name
        try:
            retypes = note_column_types(conn, slot, self.profile, shapes, seen=seen)
        except psycopg.errors.InsufficientPrivilege:
            log.warning("captured_tables_not_written", table=CAPTURED_TABLES,
                        hint=f"GRANT SELECT, INSERT, UPDATE ON {CAPTURED_TABLES} to the "
                             "capture role, so that a column retyped while the producer was "
                             "down is re-snapshotted at its start")
            retypes = []
            with conn.transaction():
                for table, columns in seen.items():
                    ent = self.profile.table(table)
                    if ent is None or ent.kind is None:
                        continue
                    retypes.append(Retype(table, columns, request_snapshot(
                        conn, self.profile, snapshot_name(ent), reason=RETYPE_REASON)))
        self._known.update({t: shape for t, shape in shapes.items() if shape is not None})
        self._broken_recorded.difference_update(shapes)
        if not retypes:
            return
        self._tables = read_table_info(conn, self.profile, self._naive_zone)
        for r in retypes:
            log.warning("captured_column_retyped", table=r.table, columns=r.columns,
                        snapshot_id=r.snapshot_id,
                        hint="a mapped column changed type: the table was rewritten, and a "
                             "rewrite (ALTER COLUMN ... TYPE ... USING) leaves no row change "
                             "in the WAL, so the table is re-snapshotted to bring every row's "
                             "current values to the ERP (`crm-erp-sync snapshot list`)")

    def _record_violations(self, conn: PgConn, violations: list[contract.Violation]) -> None:
        """What ``status`` reads (crm_erp_sync.contract_violations): these unresolved, any
        other row of this slot resolved. A refused write is logged, not fatal: the log,
        the metric and /readyz still say it."""
        slot = self.settings.slot_name
        try:
            with conn.transaction():
                conn.execute(CONTRACT_DDL)
                for v in violations:
                    conn.execute(
                        f"INSERT INTO {CONTRACT_TABLE} (slot_name, table_name, column_name, "
                        "problem, fix) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (slot_name, "
                        "table_name, column_name) DO UPDATE SET problem = excluded.problem, "
                        "fix = excluded.fix, seen_at = now(), since = CASE WHEN "
                        f"{CONTRACT_TABLE}.resolved_at IS NULL THEN {CONTRACT_TABLE}.since "
                        "ELSE now() END, resolved_at = NULL",
                        (slot, v.table, v.column, v.problem, v.fix))
                conn.execute(
                    f"UPDATE {CONTRACT_TABLE} SET resolved_at = now() WHERE slot_name = %s "
                    "AND resolved_at IS NULL AND (table_name, column_name) NOT IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                    (slot, [v.table for v in violations], [v.column for v in violations]))
        except psycopg.errors.InsufficientPrivilege:
            log.warning("contract_state_not_written", table=CONTRACT_TABLE,
                        hint=f"GRANT SELECT, INSERT, UPDATE ON {CONTRACT_TABLE} to the "
                             "capture role, so that `status` shows why capture stopped")

    def _observe_publication(self, conn: PgConn) -> None:
        """Every few seconds: the publication still matches the profile (every captured
        table in it, with the profile's row filter); see _sync_publication.

        Raises SourceContractBroken when a captured table left it by being renamed or
        dropped (it cannot be added back), or when the publication drifted and this role may
        not repair it."""
        now = time.monotonic()
        if now - self._last_publication_check < PUBLICATION_CHECK_S:
            return
        self._last_publication_check = now
        self._sync_publication(conn)
        self._observe_types(conn)

    def _observe_types(self, conn: PgConn) -> None:
        """With the publication check: a mapped column retyped in the catalog (the contract
        holding) is re-snapshotted now, without waiting for a change of the table (whose
        Relation message would show it): a rewrite alone (``ALTER COLUMN ... TYPE ...
        USING``) may be the last thing done to the table for a long time. A shape that breaks
        the contract is left to the stream (its Relation message stops capture first)."""
        shapes = contract.read_shapes(conn, self.profile.tables)
        seen: dict[str, list[str]] = {}
        broken: dict[str, contract.Shape | None] = {}
        for ent in self.profile.entities.values():
            shape = shapes.get(ent.table)
            if shape is None:
                continue
            if contract.check(ent, shape):
                broken[ent.table] = shape
                continue
            columns = contract.retyped(ent, self._known.get(ent.table), shape)
            if columns or ent.table in self._broken_recorded:
                seen[ent.table] = columns
        if seen:
            self._note_retyped(conn, seen)
        if broken:
            self._record_broken_types(conn, broken)

    def _record_broken_types(self, conn: PgConn,
                             shapes: Mapping[str, contract.Shape | None]) -> None:
        """Record the types of tables that break the contract now (no snapshot: it could
        not read them), so that the fix (``TYPE date USING ...`` after a ``TYPE text``: a
        second rewrite) differs from the record and re-snapshots the table once the contract
        holds. A refused write is left to ``_note_retyped``'s warning."""
        with suppress(psycopg.errors.InsufficientPrivilege):
            note_column_types(conn, self.settings.slot_name, self.profile, shapes,
                              record_only=True)
            self._broken_recorded.update(shapes)

    def _sync_publication(self, conn: PgConn, *, resnapshot: bool = True) -> None:
        """A captured table missing from the publication, or filtered there otherwise than
        the profile says, is brought to the profile and a snapshot of it is queued in the
        same transaction (changes made meanwhile were not decoded, or decoded under the old
        filter; rows deleted meanwhile need `reconcile --repair`). Logged, never silent.

        Raises SourceContractBroken (capture stops, the slot kept, nothing skipped) when a
        captured table is gone or renamed (it cannot be added back), or when this role may
        not alter the publication (not its and the table's owner): the violations name the
        table, both filters and `crm-erp-sync setup` as the publication's owner."""
        drifts = publication_drift(conn, self.settings, self.profile, self._want_filters)
        if not drifts:
            return
        # A table renamed or dropped has left the publication too, and cannot be added back
        # (UndefinedTable): that is the source contract (capture stops, named), not a crash.
        violations = contract.check_profile(
            self.profile, contract.read_shapes(conn, self.profile.tables), known=self._known)
        if violations:
            raise SourceContractBroken(violations)
        try:
            repairs = repair_publication(conn, self.settings, self.profile, drifts,
                                         resnapshot=resnapshot)
        except PublicationNotRepaired as exc:
            raise SourceContractBroken([
                contract.Violation(d.table, contract.TABLE, d.problem, d.fix)
                for d in exc.drifts]) from None
        for r in repairs:
            d = r.drift
            log.warning("publication_repaired", publication=d.publication, table=d.table,
                        re_added=d.missing, row_filter_was=d.have, row_filter_now=d.want,
                        snapshot_id=r.snapshot_id, rows_leaving_filter=r.left_filter,
                        named_by_status=r.gap_noted,
                        hint="changes made while the table was out of the publication (or "
                             "outside its old filter) are re-read by the snapshot; rows "
                             "deleted meanwhile, and rows applied before that a narrower "
                             "filter now excludes (rows_leaving_filter: how many the CRM "
                             "holds; null: not counted), stay live in the ERP until "
                             "`crm-erp-sync reconcile --repair` (`status` names the entity "
                             "until then)")
            if r.leaves_rows and not r.gap_noted and self.profile.table(d.table) is not None:
                log.warning("captured_tables_not_written", table=CAPTURED_TABLES,
                            hint=f"GRANT SELECT, INSERT, UPDATE ON {CAPTURED_TABLES} to the "
                                 "capture role, so that `status` names a table repaired into "
                                 "the publication until it is reconciled")
        if any(r.drift.missing for r in repairs):
            # a table re-created between two checks never broke the contract
            self._note_recreated(conn)

    def _broker_fault(self, fault: Retryable, delay: float) -> None:
        """Publishing failed: drop the Kafka producer (its buffer may hold a poisoned or
        half-sent batch; the slot did not move, so the batch is peeked and sent again with
        the same event ids), wait, and go on."""
        if isinstance(fault, ConnectionLost):
            self.health.disconnected(fault.reason)
        else:
            self.health.failing()
        self.metrics.retries.inc()
        log.warning("retrying", error=str(fault), backoff_s=delay)
        self._close_kafka(flush=False)
        self._reset_capture_state()
        self._stop.wait(delay)

    def _session_lost(self, fault: Retryable, delay: float) -> None:
        """A CRM session (the lock's or the capture's) is gone: both are closed, so the
        capture lock is released for sure, and re-opened after ``delay``."""
        self.health.disconnected(str(fault))
        self.metrics.retries.inc()
        self.metrics.active.set(0)
        log.warning("crm_connection_lost", error=str(fault), backoff_s=delay)
        self._close_sessions()
        self._reset_capture_state()
        self._stop.wait(delay)

    def _close_sessions(self) -> None:
        for conn in (self._conn, self._lock_conn):
            if conn is not None:
                conn.close()
        self._conn = self._lock_conn = None

    def _close_kafka(self, *, flush: bool) -> None:
        producer, self._kafka = self._kafka, None
        if producer is None:
            return
        close_producer(producer, 5.0 if flush else 0.0)

    def _reset_capture_state(self) -> None:
        # The source re-reads from the slot's confirmed position: nothing unconfirmed is lost.
        source, self._source = self._source, None
        if source is not None:
            source.close()
            self._bound = max(self._bound, source.confirm_bound())
        self._chunk = None  # the chunk's watermarks are re-read; the chunk is redone
        self._pending_progress.clear()
        self._sent = None  # never confirmed: read again and re-sent
        self._piece_seqs.clear()  # a transaction under way is re-sent from its start

    def _abandon_source(self) -> None:
        """_reset_capture_state without the source's last position report: the stream was
        left in the middle of a transaction it must decode again (psycopg2 may report its
        flush position past the last message read, see StreamSource)."""
        source, self._source = self._source, None
        if source is not None:
            source.abandon()
            self._bound = max(self._bound, source.confirm_bound())
        self._chunk = None
        self._pending_progress.clear()
        self._sent = None

    def _observe_slot(self, conn: PgConn) -> None:
        """The slot's retained and unconfirmed WAL, and whether it is about to lose WAL
        (``slot_wal_danger``: logged once when it starts), for the metrics, at most every few
        seconds (one catalog query). The slot guard's ceiling is not raised here:
        ``_keep_ceiling_ahead`` does it every step from the stream's bound, which is at or past
        the slot's confirmed_flush_lsn."""
        now = time.monotonic()
        if now - self._last_slot_check < 5.0:
            return
        self._last_slot_check = now
        slot = read_slot(conn, self.settings.slot_name)
        if slot is not None:
            self.metrics.retained_wal.set(slot["retained_wal_bytes"] or 0)
            self.metrics.unconfirmed_wal.set(slot["unconfirmed_bytes"] or 0)
            safe = slot["safe_wal_bytes"]
            # -1: unlimited (max_slot_wal_keep_size = -1), so no alert compares against it
            self.metrics.safe_wal.set(-1 if safe is None else safe)
            danger = slot_wal_danger(self.settings.slot_name, slot["wal_status"], safe,
                                     slot["keep_size_bytes"])
            self.metrics.slot_wal_danger.set(1 if danger is not None else 0)
            if danger is not None and not self._warned_wal_danger:
                log.warning("slot_wal_in_danger", slot=self.settings.slot_name,
                            wal_status=slot["wal_status"], safe_wal_bytes=safe, detail=danger)
            self._warned_wal_danger = danger is not None
        self.metrics.set_oldest_transaction(oldest_transaction(conn))
        source = self._source
        if source is not None and source.peek_s is not None:
            self.metrics.peek_seconds.set(source.peek_s)
            self.metrics.peek_backoff.set(source.backoff_s)
            self._report_costs(conn, source.peek_s, source.backoff_s)

    def _report_costs(self, conn: PgConn, peek_s: float, backoff_s: float) -> None:
        """The SQL peek's cost, where `status` reads it (one small row in our own schema)."""
        if not self._costs_table:
            conn.execute(CAPTURE_COSTS_DDL)
            self._costs_table = True
        conn.execute(
            f"INSERT INTO {CAPTURE_COSTS_TABLE} (slot_name, peek_s, backoff_s) "
            "VALUES (%s, %s, %s) ON CONFLICT (slot_name) DO UPDATE SET peek_s = "
            "excluded.peek_s, backoff_s = excluded.backoff_s, measured_at = now()",
            (self.settings.slot_name, peek_s, backoff_s))

    def step(self, conn: PgConn) -> bool:
        """One turn of the capture pipeline; False when there was nothing to do.

        Batch N+1 is read, decoded, built and encoded while the broker acknowledges batch N
        (sent by the previous turn); then N's acknowledgements are awaited and the slot
        confirmed past N, and only then is N+1 sent. So at most two batches are held (one on
        the wire, one built), the slot never passes an unacknowledged transaction, and
        batches are confirmed in order. With nothing in flight the read waits up to
        ``producer_poll_ms`` for a first transaction; with a batch in flight it does not
        wait, and finding nothing it finishes that batch (flush, acks, confirm); finding
        some, it goes on gathering while that batch is unacknowledged (it could not be sent
        before anyway): at a steady low rate a batch holds what arrived during one broker
        round trip, not one transaction, and the broker and this process do a round trip
        per batch rather than per transaction. Snapshot
        chunks open only with nothing in flight (a chunk's progress is recorded when the
        batch closing it is acknowledged)."""
        if self._source is None:
            # (re)opening the slot: is it still ours? (a slot dropped and created again
            # while the stream was down would otherwise be read from its new position)
            self._check_capture(conn)
        sent = self._sent
        if (sent is None and self._chunk is None
                and time.monotonic() >= self._next_snapshot_poll):
            with self._reading_tables(conn):
                opened = self._open_chunk(conn)
            if not opened:
                self._next_snapshot_poll = time.monotonic() + SNAPSHOT_POLL_S
        source = self._change_source()
        self._keep_ceiling_ahead(conn, source)
        try:
            txns = source.next_transactions(
                conn, 0.0 if sent is not None else self.settings.producer_poll_ms / 1000,
                gather_while=sent.in_flight if sent is not None else None)
            stop_at = self._truncate_stop(txns)
            stopping = txns[stop_at] if stop_at is not None else None
            ready = txns if stop_at is None else txns[:stop_at]
            built = self._prepare(ready) if ready else None
            read = bool(txns)
            # the decoded rows are not needed past here: only one batch's worth is held
            # while the previous batch is finished
            del txns, ready
        except SourceContractBroken:
            # nothing of the offending transaction was sent; what is in flight before it is
            # finished first, as if it had been published alone
            if sent is not None:
                self._sent = None
                self._finish(conn, source, sent)
            raise
        if sent is not None:
            self._sent = None
            self._finish(conn, source, sent)
        if built is not None and not self._stop.is_set():
            # (after stop() nothing more goes out: the built batch is never confirmed)
            self._send(conn, built)
            self._sent = built
        if stopping is not None:
            last, self._sent = self._sent, None
            if last is not None:
                self._finish(conn, source, last)
            self._stop_before(conn, stopping)
        return read or sent is not None

    def _keep_ceiling_ahead(self, conn: PgConn, source: ChangeSource) -> None:
        """Raise the recorded ceiling (slot_guard) once the stream has seen WAL within half
        the slack of it. psycopg2 confirms an idle stream up to a keepalive's WAL end by
        itself, and on a cluster whose other databases write much WAL that end runs far
        ahead of our own transactions: a ceiling raised only by our batches and every 5 s
        was passed between two raises, and the next start took the slot for a replaced one
        (``slot_replaced``). Checked every step from what the stream has seen (no query; the
        only raise besides a batch's); the UPDATE runs only when the ceiling is near."""
        seen = source.confirm_bound()
        if seen + slot_guard.CEILING_SLACK // 2 > self._ceiling:
            self._ceiling = slot_guard.raise_ceiling(conn, self.settings, seen)

    def _prepare(self, txns: list[CommittedTxn]) -> _Batch:
        """The transactions' events in commit order, encoded (a letter in place of each that
        cannot be), with what their acknowledgement must record."""
        self._truncates.clear()
        self._pending_progress.clear()
        keep = self.on_acknowledged is not None
        encoded: list[_Wire | CaptureLetter] = []
        # Encoded one transaction at a time, so that a batch's built events (records as
        # dicts) are not all held beside their bytes: catching up 20,000 one-change
        # transactions, the producer's RSS rose 16-16.4 MiB instead of 20-21.
        for txn in txns:
            for item in self._events_for(txn):
                if isinstance(item, Outgoing):
                    value = self._encoded(item)
                    if isinstance(value, CaptureLetter):
                        encoded.append(value)
                        continue
                    encoded.append(_Wire(
                        self._topic(item), item.key, value,
                        [("event_id", item.event_id.encode()),
                         ("event_kind", item.kind.encode()), *item.headers],
                        item.kind, item if keep else None))
                else:
                    encoded.append(item)
        # A piece of a transaction under way is published but never confirmed: the slot moves
        # past a transaction only once its last piece (its Commit) reached the broker.
        complete = [txn for txn in txns if txn.complete]
        batch = _Batch(encoded, len(complete), complete[-1].end_lsn if complete else 0,
                       list(self._pending_progress), list(self._truncates))
        self._pending_progress.clear()
        self._truncates.clear()
        return batch

    def _finish(self, conn: PgConn, source: ChangeSource, batch: _Batch) -> None:
        """Wait for every ack of the batch, record what it did, then confirm the slot."""
        self._acknowledged(batch)
        self._commit_progress(conn, batch.progress)
        self._record_truncates(conn, batch.truncates)
        if batch.last_end > self._ceiling:  # recorded before the slot may confirm past it
            self._ceiling = slot_guard.raise_ceiling(conn, self.settings, batch.last_end)
        source.confirm(conn, batch.last_end)
        self._last_advance = time.monotonic()
        self.stats.transactions += batch.complete
        self.metrics.transactions.inc(batch.complete)
        self.stats.batches += 1
        if batch.complete:
            self.stats.last_commit_lsn = batch.last_end

    # ---- TRUNCATE (CRM_ERP_SYNC_ON_TRUNCATE) -------------------------------------------
    def _truncated_tables(self, txn: CommittedTxn) -> list[str]:
        """The published tables this transaction truncates (products only feed references:
        their truncate is nobody's to propagate)."""
        out: list[str] = []
        for change in txn.changes:
            if change.op == TRUNCATE:
                ent = self.profile.table(change.table)
                if ent is not None and ent.kind is not None and change.table not in out:
                    out.append(change.table)
        return out

    def _truncate_stop(self, txns: list[CommittedTxn]) -> int | None:
        """With CRM_ERP_SYNC_ON_TRUNCATE=stop: the index of the first transaction that
        truncates a captured table (None: none does, or another setting)."""
        if self.settings.on_truncate != "stop":
            return None
        for index, txn in enumerate(txns):
            if self._truncated_tables(txn):
                return index
        return None

    def _stop_before(self, conn: PgConn, txn: CommittedTxn) -> None:
        """Stop capture before ``txn``: nothing of it is published and the slot stays
        before it (the source is closed: a restart reads it again). Recorded for `status`."""
        tables = self._truncated_tables(txn)
        self._record_truncates(conn, [TruncateSeen(t, txn.commit_lsn, txn.xid,
                                                   txn.commit_time, "stopped")
                                      for t in tables])
        stopped = CaptureStoppedAtTruncate(tables, pgoutput.lsn_to_str(txn.commit_lsn))
        # /readyz and the metric first: whoever sees stopped_at sees them already
        self.metrics.capture_stopped.set(1)
        self.health.set_ready(False, "capture_stopped", reason=str(stopped))
        self.stopped_at = stopped
        self._reset_capture_state()
        log.error("capture_stopped_before_truncate", tables=tables,
                  commit_lsn=pgoutput.lsn_to_str(txn.commit_lsn), xid=txn.xid,
                  setting=Settings.env_var("on_truncate"), value=self.settings.on_truncate,
                  hint="set CRM_ERP_SYNC_ON_TRUNCATE=propagate or skip and restart")

    def _truncate_item(self, change: RowChange, at: _Position, seq: int) -> Outgoing | None:
        """The truncate event of a captured table (propagate), or None (skip, or a table
        that is not published); each is remembered for crm_erp_sync.truncates."""
        ent = self.profile.table(change.table)
        if ent is None or ent.kind is None:
            return None
        outcome = "propagated" if self.settings.on_truncate == "propagate" else "skipped"
        self._truncates.append(TruncateSeen(change.table, at.lsn, at.xid, at.commit_time,
                                            outcome))
        if outcome == "skipped":
            return None
        return truncate_event(ent, lsn=at.lsn, seq=seq, xid=at.xid,
                              commit_time=at.commit_time, profile=self.profile.name)

    def _record_truncates(self, conn: PgConn, seen: list[TruncateSeen]) -> None:
        """Upsert what became of each TRUNCATE (a replay after a crash, or a restart with a
        new setting after a stop, overwrites the same row), log and count it."""
        if not seen:
            return
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {TRUNCATES_TABLE} (commit_lsn, table_name, xid, commit_time, "
                "outcome, setting) VALUES (%s::pg_lsn, %s, %s, %s, %s, %s) "
                "ON CONFLICT (commit_lsn, table_name) DO UPDATE SET outcome = EXCLUDED.outcome,"
                " setting = EXCLUDED.setting, seen_at = now()",
                [(pgoutput.lsn_to_str(t.commit_lsn), t.table, t.xid, t.commit_time,
                  t.outcome, self.settings.on_truncate) for t in seen])
        for t in seen:
            self.metrics.truncates.labels(t.table, t.outcome).inc()
            if t.outcome != "stopped":
                self.stats.truncates += 1
                log.warning("crm_truncate", table=t.table, outcome=t.outcome,
                            commit_lsn=pgoutput.lsn_to_str(t.commit_lsn), xid=t.xid,
                            setting=Settings.env_var("on_truncate"))

    def _change_source(self) -> ChangeSource:
        if self._source is None:
            zone = self._naive_zone
            self._source = source_for(
                self.settings, lambda: ChangeDecoder(zone, self._check_relation), self._stop)
        return self._source

    def _caught_up(self, conn: PgConn) -> bool:
        return self._change_source().caught_up(conn)

    def _load_reference(self, entity: str, key: str) -> dict[str, Any] | None:
        """A referenced order/product the producer has not seen: read its current CRM row."""
        ent = self.profile.entity(entity)
        if ent is None or self._conn is None or ent.table not in self._tables:
            return None
        info = self._tables[ent.table]
        query, params = chunk_query(info, after=None, keys=[key], limit=1)
        cur = self._conn.cursor(row_factory=psycopg.rows.dict_row)
        with self._reading_tables(self._conn):
            found = cur.execute(query, params).fetchone()
        if found is None:
            return None
        return canonical(ent, typed_row(info, found), self.refs)

    def _events_for(self, txn: CommittedTxn) -> list[Outgoing | CaptureLetter]:
        """The transaction's events in commit order, with a capture dead letter in place of
        each change that cannot become one (and the snapshot chunk it closes, if any)."""
        changes: list[RowChange] = []
        rejected: dict[int, Rejection] = {}  # position in `changes`
        high_closed = False
        chunk = self._chunk
        for position, change in enumerate(txn.changes):
            if change.table == WATERMARK_TABLE:
                if chunk is not None and change.after is not None:
                    wid = change.after["watermark_id"]
                    if wid == chunk.low_id:
                        chunk.window_open = True
                    elif wid == chunk.high_id:
                        high_closed = True
                continue
            ent = self.profile.table(change.table)
            if ent is None:
                continue
            if position in txn.rejected:
                rejected[len(changes)] = txn.rejected[position]
            changes.append(change)
            if chunk is None or not chunk.window_open:
                continue
            if change.op == TRUNCATE:
                # every row of the table changed inside the window: none of the chunk's
                # rows of it may be published (the truncate is newer)
                for held in (chunk.rows, chunk.rejected):
                    for key in [k for k in held if k[0] == change.table]:
                        del held[key]
                continue
            # a primary-key change: the row's old key and its new one
            for half in split_key_change(ent, change):
                row = half.after if half.after is not None else half.before
                if row is not None:
                    chunk.rows.pop((change.table, ent.key_text(row)), None)
                    chunk.rejected.pop((change.table, ent.key_text(row)), None)
        # A big transaction comes in pieces: its events' seqs go on from the previous piece's
        # (the source cuts pieces at fixed change counts, so a re-send after a crash gives every
        # change the same seq again).
        if txn.first_change == 0:
            self._piece_seqs.clear()
        first_seq = self._piece_seqs.get((txn.commit_lsn, txn.first_change), 0)
        if not txn.complete:
            self._piece_seqs[(txn.commit_lsn, txn.first_change + len(txn.changes))] = \
                first_seq + len(changes)
        at = _Position(txn.commit_lsn, txn.xid, txn.commit_time, first_seq=first_seq)
        items = self._build(changes, rejected, at)
        if high_closed and chunk is not None:
            reads = [RowChange(table, READ, None, row)
                     for (table, _key), row in chunk.rows.items()]
            bad_reads = {len(reads) + i: rejection
                         for i, rejection in enumerate(chunk.rejected.values())}
            reads += [RowChange(table, READ, None, None) for table, _key in chunk.rejected]
            items.extend(_chunk_ids(chunk, self._build(
                reads, bad_reads, _Position(txn.commit_lsn, 0, txn.commit_time, snapshot=True,
                                            first_seq=txn.first_change + len(txn.changes)))))
            self._pending_progress.append((chunk, len(reads)))
            self.stats.snapshot_rows += len(reads)
            self._chunk = None
        return items

    def _build(self, changes: list[RowChange], rejected: dict[int, Rejection],
               at: _Position) -> list[Outgoing | CaptureLetter]:
        """Events for runs of good changes, a letter at the place of each rejected one."""
        items: list[Outgoing | CaptureLetter] = []
        start = 0
        truncated = {i for i, c in enumerate(changes) if c.op == TRUNCATE}
        for stop in [*sorted(set(rejected) | truncated), len(changes)]:
            if stop > start:
                items.extend(self._isolated(changes[start:stop], at, at.first_seq + start))
            if stop in truncated:
                event = self._truncate_item(changes[stop], at, at.first_seq + stop)
                if event is not None:
                    items.append(event)
            elif stop < len(changes):
                letter = self._letter(changes[stop], rejected[stop], at, at.first_seq + stop)
                if letter is not None:
                    items.append(letter)
            start = stop + 1
        return items

    def _isolated(self, changes: list[RowChange], at: _Position,
                  first_seq: int) -> list[Outgoing | CaptureLetter]:
        """build_events on the run; when it refuses a change, change by change, so that only
        the refused ones become letters (an order's header and lines then travel apart)."""
        try:
            return list(build_events(changes, profile=self.profile, refs=self.refs,
                                     lsn=at.lsn, xid=at.xid, commit_time=at.commit_time,
                                     snapshot=at.snapshot, first_seq=first_seq))
        except SourceContractBroken:
            raise  # a table broken now (read for a reference): capture stops
        except BUILD_ERRORS:
            pass
        out: list[Outgoing | CaptureLetter] = []
        for offset, change in enumerate(changes):
            try:
                out.extend(build_events([change], profile=self.profile, refs=self.refs,
                                        lsn=at.lsn, xid=at.xid, commit_time=at.commit_time,
                                        snapshot=at.snapshot, first_seq=first_seq + offset))
            except SourceContractBroken:
                raise
            except BUILD_ERRORS as exc:
                letter = self._letter(change, Rejection(
                    _rejected(exc), text_row(change.before), text_row(change.after)),
                    at, first_seq + offset)
                if letter is not None:
                    out.append(letter)
        return out

    def _letter(self, change: RowChange, rejection: Rejection, at: _Position,
                seq: int) -> CaptureLetter | None:
        """The letter in place of a change (None for an entity that is not published:
        products only feed references)."""
        ent = self.profile.table(change.table)
        if ent is None or ent.kind is None:
            return None
        row = rejection.after or rejection.before or {}
        return CaptureLetter(
            topic=self._topics[ent.kind], key=self._letter_key(ent, row),
            table=change.table, op=change.op,
            primary_key={c: row.get(c) for c in ent.key}, commit_lsn=at.lsn, xid=at.xid,
            commit_time=at.commit_time, event_id=event_id(at.lsn, seq, at.snapshot),
            error=rejection.error, before=rejection.before, after=rejection.after,
            kind=ent.kind)

    def _letter_key(self, ent: EntityMapping, row: TextRow) -> bytes | None:
        """The key the change's event would have had (so its partition and its hold): the
        customer's for orders and lines, the entity's own otherwise; None when the row does
        not say (then the letter is still recorded, on some partition)."""
        try:
            if ent.entity == "order" and ent.customer_column:
                value = row.get(ent.customer_column)
            elif ent.entity == "order_line":
                value = row.get(ent.customer_column) if ent.customer_column else None
                order_key = row.get(ent.order_column) if ent.order_column else None
                if value is None and order_key is not None:
                    known = self.refs.lookup("order", order_key)
                    value = None if known is None else str(known["customer_key"])
            else:
                value = ent.key_text(row)
        except (KeyError, TypeError, psycopg.Error):
            return None  # a key we cannot name from the letter's row: no hold, still a letter
        return None if value is None else str(value).encode()

    def _letter_for_event(self, event: Outgoing, error: CaptureRejected) -> CaptureLetter:
        """A letter for an event that was built but cannot be sent (schema, size)."""
        record = event.record
        source = record["source"]
        return CaptureLetter(
            topic=self._topic(event), key=event.key, table=source["table"],
            op=record["op"], primary_key={"key": as_text(record.get("key"))},
            commit_lsn=source["lsn"], xid=source["txid"], commit_time=source["commit_time"],
            event_id=event.event_id, error=error, before=text_row(record.get("before")),
            after=text_row(record.get("after")), kind=event.kind)

    def _topic(self, event: Outgoing) -> str:
        """An event's topic: its kind's, or for a truncate event its entity's kind's."""
        if event.kind == "truncate":
            return self._topics[EVENT_KIND[event.record["entity"]]]
        return self._topics[event.kind]

    def _encoded(self, event: Outgoing) -> bytes | CaptureLetter:
        """The event's bytes, or its letter when it does not fit its schema or its topic."""
        try:
            value = self.registry.encode(event.kind, event.record)
        except AVRO_ERRORS as exc:
            # fastavro names the field in its message next to the value: only the class here
            return self._letter_for_event(event, CaptureRejected(
                f"the event does not fit its Avro schema ({type(exc).__name__})"))
        topic = self._topic(event)
        limit = self._limits.get(topic, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) - RECORD_OVERHEAD
        size = len(value) + len(event.key) + len(event.event_id) + len(event.kind)
        if size <= limit and size <= MAX_REQUEST_BYTES:
            return value
        compressed = len(zstd_encode(value)) + size - len(value)
        if compressed > limit or size > MAX_REQUEST_BYTES:
            return self._letter_for_event(event, CaptureRejected(
                f"event too large: {size} bytes, {compressed} compressed ({COMPRESSION}); "
                f"{topic} takes at most {limit + RECORD_OVERHEAD} (max.message.bytes)"))
        return value

    def _send(self, conn: PgConn, batch: _Batch) -> None:
        """Send the batch's events in order, without waiting for their acknowledgement
        (:meth:`_acknowledged` does).

        Capture dead letters go to the dead-letter topic first, acknowledged (their places
        there are needed for the markers); then events and markers go out in commit order.
        Raises Retryable (ConnectionLost when the broker is away): nothing was confirmed, the
        slot does not move, the same events are sent again.
        """
        encoded, batch.encoded = batch.encoded, []  # kafka-python holds the bytes now
        if not encoded:
            return
        letters = [i for i in encoded if isinstance(i, CaptureLetter)]
        producer = self.kafka
        futures = batch.futures
        try:
            places = self._send_letters(conn, producer, letters)
            for item in encoded:
                if isinstance(item, CaptureLetter):
                    futures.append(producer.send(
                        item.topic, key=item.key, value=item.marker(*places[id(item)]),
                        headers=[("event_id", item.event_id.encode()),
                                 ("event_kind", b"capture_dead_letter")]))
                    continue
                futures.append(producer.send(item.topic, key=item.key, value=item.value,
                                             headers=item.headers))
                batch.published.append((item.topic, item.kind))
                if item.event is not None:
                    batch.events.append(item.event)
        except KafkaError as exc:
            raise (transient(exc, "broker")
                   or Retryable(f"publishing failed: {type(exc).__name__}")) from exc
        batch.letters = len(letters) - self._letters_resent

    def _acknowledged(self, batch: _Batch) -> None:
        """Wait until the broker acknowledged every event of the batch (and so of every
        batch sent before it). Raises Retryable (ConnectionLost when the broker did not
        answer in time) when one was not."""
        futures = batch.futures
        if not futures:
            return
        try:
            self._flush(self.kafka)
        except KafkaError as exc:
            raise (transient(exc, "broker")
                   or Retryable(f"publishing failed: {type(exc).__name__}")) from exc
        failed = [f for f in futures if not f.is_done or f.failed()]
        if failed:
            what = f"{len(failed)} of {len(futures)} events not acknowledged"
            if not failed[0].is_done:  # the broker did not answer within the flush timeout
                raise ConnectionLost(f"broker unreachable: {what} in time")
            error = failed[0].exception
            fault = transient(error, "broker") if error is not None else None
            raise fault or Retryable(f"{what}: {type(error).__name__}")
        self.stats.events += len(batch.published)
        self.stats.dead_letters += batch.letters
        self.metrics.count_published(batch.published)
        if self.on_acknowledged is not None:
            self.on_acknowledged(batch.events)

    def _flush(self, producer: Any) -> None:
        """``producer.flush`` within ``6 * heartbeat_interval_s``, in one-second waits between
        which the change source tells the CRM we are alive (a piece of a big transaction is
        being published while its walsender waits; see ``StreamSource``). Raises
        KafkaTimeoutError when the broker did not acknowledge everything in time."""
        deadline = time.monotonic() + self.settings.heartbeat_interval_s * 6
        while True:
            try:
                producer.flush(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                return
            except KafkaTimeoutError:
                if time.monotonic() >= deadline:
                    raise
            if self._source is not None:
                self._source.keep_alive()

    def _send_letters(self, conn: PgConn, producer: Any,
                      letters: list[CaptureLetter]) -> dict[int, tuple[int, int]]:
        """Capture dead letters onto the dead-letter topic, acknowledged; their places.

        A letter already there (its change read again after a crash: the same event id and
        xid in ``capture_letters_sent``) is not sent again: its recorded place is returned,
        so its re-sent marker points at the one letter. The place is recorded only once the
        broker acknowledged the letter, so a crash in between sends a second copy (the
        consumer records one: it knows the marker's event id), never none."""
        self._letters_resent = 0
        if not letters:
            return {}
        dlq_topic = self.settings.dlq_topic
        known = {(eid, int(xid)): (int(part), int(off)) for eid, xid, part, off in conn.execute(
            f"SELECT event_id, xid, dlq_partition, dlq_offset FROM {LETTERS_SENT_TABLE} "
            "WHERE dlq_topic = %s AND event_id = ANY(%s)",
            (dlq_topic, [d.event_id for d in letters])).fetchall()}
        places: dict[int, tuple[int, int]] = {}
        for letter in letters:
            place = known.get((letter.event_id, letter.xid))
            if place is not None:
                places[id(letter)] = place
                log.info("capture_dead_letter_resent", table=letter.table,
                         event_id=letter.event_id, dlq_partition=place[0],
                         dlq_offset=place[1])
        self._letters_resent = len(places)
        letters = [d for d in letters if id(d) not in places]
        if not letters:
            return places
        futures = [producer.send(dlq_topic, key=d.key, value=d.value(),
                                 headers=d.headers()) for d in letters]
        self._flush(producer)
        sent: list[tuple[str, str, int, int, int]] = []
        for letter, future in zip(letters, futures, strict=True):
            meta = future.get(timeout=0.1)
            places[id(letter)] = (meta.partition, meta.offset)
            sent.append((dlq_topic, letter.event_id, letter.xid, meta.partition, meta.offset))
            self.metrics.capture_dead_letters.labels(letter.table,
                                                     type(letter.error).__name__).inc()
            # identity and reason only: the values are in the letter, never in a log line
            # The same keys as the consumer's `dead_lettered` line: `key` is the Kafka key
            # as text, `error` the class; the CRM row's own key is `primary_key`.
            log.error("capture_dead_letter", table=letter.table,
                      key=letter.key.decode("utf-8", "replace") if letter.key else None,
                      primary_key=letter.primary_key, stage=letter.error.stage,
                      error=type(letter.error).__name__,
                      commit_lsn=letter.commit_lsn, xid=letter.xid, event_id=letter.event_id,
                      column=letter.error.column, reason=letter.error.detail,
                      dlq_partition=meta.partition, dlq_offset=meta.offset)
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {LETTERS_SENT_TABLE} (dlq_topic, event_id, xid, dlq_partition, "
                "dlq_offset) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", sent)
            # a re-send follows a crash within the batch in flight: a week is plenty
            cur.execute(f"DELETE FROM {LETTERS_SENT_TABLE} "
                        "WHERE sent_at < now() - interval '7 days'")
        return places

    # ---- snapshots --------------------------------------------------------------------
    def _has_pending_snapshot(self, conn: PgConn) -> bool:
        row = conn.execute(
            f"SELECT 1 FROM {OWN_SCHEMA}.snapshots WHERE state = 'pending' LIMIT 1").fetchone()
        return row is not None

    def _open_chunk(self, conn: PgConn) -> bool:
        """Open the next chunk of the oldest pending snapshot; False when none is pending."""
        request = conn.execute(
            f"SELECT snapshot_id, table_name, keys, chunk_size, last_key, chunks_done "
            f"FROM {OWN_SCHEMA}.snapshots WHERE state = 'pending' "
            "ORDER BY snapshot_id LIMIT 1").fetchone()
        if request is None:
            return False
        snapshot_id, table, keys, chunk_size, last_key, chunks_done = request
        info = self._tables.get(table)
        if info is None:
            # A request for a table this profile does not capture (the profile changed):
            # finish it rather than block every later snapshot behind it.
            conn.execute(f"UPDATE {OWN_SCHEMA}.snapshots SET state = 'done', "
                         "finished_at = now() WHERE snapshot_id = %s", (snapshot_id,))
            log.error("snapshot_table_not_captured", snapshot_id=snapshot_id, table=table,
                      profile=self.profile.name)
            return True
        low = conn.execute(
            f"INSERT INTO {WATERMARK_TABLE} (snapshot_id, chunk_no, kind) "
            "VALUES (%s, %s, 'low') RETURNING watermark_id", (snapshot_id, chunks_done)
        ).fetchone()
        ent = info.entity
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        rejected: dict[tuple[str, str], Rejection] = {}
        head, lines = self._read_chunk(conn, info, after=last_key, keys=keys, limit=chunk_size)
        for item_ent, text, row, rejection in [*head, *lines]:
            key = (item_ent.table, item_ent.key_text(text))
            if rejection is None:
                rows[key] = row
            else:
                rejected[key] = rejection
        if not head:
            conn.execute(f"UPDATE {OWN_SCHEMA}.snapshots SET state = 'done', "
                         "finished_at = now() WHERE snapshot_id = %s", (snapshot_id,))
            log.info("snapshot_done", snapshot_id=snapshot_id, table=table)
            return True
        high = conn.execute(
            f"INSERT INTO {WATERMARK_TABLE} (snapshot_id, chunk_no, kind) "
            "VALUES (%s, %s, 'high') RETURNING watermark_id", (snapshot_id, chunks_done)
        ).fetchone()
        assert low is not None and high is not None
        self._chunk = _Chunk(snapshot_id, chunks_done, table, rows,
                             last_key=ent.key_text(head[-1][1]), low_id=low[0],
                             high_id=high[0], rejected=rejected)
        return True

    def _read_chunk(self, conn: PgConn, info: TableInfo, *, after: str | None,
                    keys: list[str] | None, limit: int) -> tuple[list[_Read], list[_Read]]:
        """capture.read_chunk, row by row: a row whose values cannot become an event (NaN,
        infinity, BC dates) comes with its Rejection instead of failing the whole chunk."""
        ent = info.entity
        query, params = chunk_query(info, after=after, keys=keys, limit=limit)
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            with self._snapshot_read(conn, ent.table):
                head = [(ent, r, *_typed(info, r))
                        for r in cur.execute(query, params).fetchall()]
            lines: list[_Read] = []
            line_ent = self.profile.entity("order_line")
            if ent.entity == "order" and head and line_ent is not None:
                line_info = self._tables[line_ent.table]
                lq, lp = lines_query(line_info, info, [ent.key_text(r[1]) for r in head])
                with self._snapshot_read(conn, line_ent.table):
                    lines = [(line_ent, r, *_typed(line_info, r))
                             for r in cur.execute(lq, lp).fetchall()]
        return head, lines

    @staticmethod
    @contextmanager
    def _snapshot_read(conn: PgConn, table: str) -> Iterator[None]:
        """A snapshot's read of ``table`` (``schema.table``) that PostgreSQL refuses for lack
        of SELECT (a grant revoked while the producer ran: the start checks them) raises
        PrivilegeMissing (exit 2) naming the role, the table and the GRANT, instead of
        PostgreSQL's bare "permission denied for table". The snapshot stays pending: it runs
        once the grant is given and the producer restarted."""
        try:
            yield
        except psycopg.errors.InsufficientPrivilege as exc:
            quoted = sql.Identifier(*table.split(".", 1)).as_string(None)
            raise privilege_missing(
                conn, "CRM", f"read {table} for a snapshot (SELECT refused)",
                f"GRANT SELECT ON TABLE {quoted} TO {{role}}; (and USAGE on its schema if "
                "that is missing too: `crm-erp-sync setup --check --role {role_name}` "
                "prints every grant)") from exc

    def _commit_progress(self, conn: PgConn, progress: list[tuple[_Chunk, int]]) -> None:
        for chunk, emitted in progress:
            conn.execute(
                f"UPDATE {OWN_SCHEMA}.snapshots SET last_key = %s, chunks_done = chunks_done + 1,"
                " rows_emitted = rows_emitted + %s WHERE snapshot_id = %s",
                (chunk.last_key, emitted, chunk.snapshot_id))
            log.info("snapshot_chunk_published", snapshot_id=chunk.snapshot_id,
                     table=chunk.table, chunk_no=chunk.chunk_no, rows=emitted)
        if progress:
            conn.execute(f"DELETE FROM {WATERMARK_TABLE} "
                         "WHERE written_at < now() - interval '1 hour'")

    def _maybe_heartbeat(self, conn: PgConn) -> None:
        """A quiet slot on a busy database retains WAL; a logical message moves it on."""
        if time.monotonic() - self._last_advance < self.settings.heartbeat_interval_s:
            return
        conn.execute("SELECT pg_logical_emit_message(true, %s, now()::text)",
                     (HEARTBEAT_PREFIX,))
        self._last_advance = time.monotonic()
        self.stats.heartbeats += 1
