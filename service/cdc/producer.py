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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg2.errors
import structlog
from kafka.errors import KafkaError

from service import pg
from service.avro import SchemaRegistry
from service.cdc import pgoutput
from service.cdc.capture import (
    OWN_SCHEMA,
    WATERMARK_TABLE,
    TableInfo,
    chunk_query,
    ensure_capture_objects,
    read_chunk,
    read_table_info,
    typed_row,
)
from service.cdc.events import (
    CREATE,
    DELETE,
    READ,
    UPDATE,
    CommittedTxn,
    Outgoing,
    References,
    RowChange,
    build_events,
    canonical,
    converter_for,
)
from service.cdc.profile import SourceProfile, load_profile
from service.cdc.source import ChangeSource, source_for
from service.errors import PgOutputError, Retryable, SlotLost, StackUnavailable
from service.health import Health, serve
from service.kafka_io import make_producer
from service.metrics import ProducerMetrics
from service.pg import PgConn
from service.settings import Settings

log = structlog.get_logger("producer")

HEARTBEAT_PREFIX = "crm-erp-sync.heartbeat"
# Each query costs the CRM a little CPU; at one batch per transaction (a steady low rate on the
# streaming transport) per-batch checks would cost it more than decoding does. So the capture
# lock's session is checked, and new snapshot requests are looked for, at most this often.
LOCK_CHECK_S = 1.0
SNAPSHOT_POLL_S = 1.0


def connect(dsn: str) -> PgConn:
    """A CRM session whose text output of timestamps is UTC (pgoutput sends text)."""
    conn = pg.connect(dsn, "CRM")
    conn.execute("SET TimeZone = 'UTC'")
    return conn


def lock_key(slot_name: str) -> str:
    return f"crm-erp-sync:{slot_name}"


@dataclass
class _Relation:
    table: str
    columns: list[tuple[str, Callable[[str], Any]]]


class ChangeDecoder:
    """Turns peeked pgoutput rows into committed transactions with typed rows."""

    def __init__(self) -> None:
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
                raise PgOutputError(
                    f"{rel.table}.{name}: unchanged TOASTed value; the table needs "
                    "REPLICA IDENTITY FULL"
                )
            row[name] = None if value is pgoutput.NULL else convert(value)
        return row

    def feed(self, data: bytes) -> CommittedTxn | None:
        """Feed one pgoutput message; returns the transaction when its Commit arrives.

        Relations are remembered across transactions (a replication stream sends each one
        once); raises :class:`PgOutputError` on a malformed or out-of-order message."""
        msg = pgoutput.decode_message(data)
        if isinstance(msg, pgoutput.Begin):
            self._txn = CommittedTxn(msg.xid, msg.final_lsn, 0, msg.commit_time)
            return None
        if isinstance(msg, pgoutput.Relation):
            self._relations[msg.relation_id] = _Relation(
                f"{msg.namespace}.{msg.name}",
                [(c.name, converter_for(c.type_oid)) for c in msg.columns],
            )
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
        if isinstance(msg, pgoutput.Insert):
            after = self._row(msg.relation_id, msg.new)
            table = self._relations[msg.relation_id].table
            txn.changes.append(RowChange(table, CREATE, None, after))
        elif isinstance(msg, pgoutput.Update):
            table = self._relations[msg.relation_id].table
            # Even with REPLICA IDENTITY FULL, PostgreSQL 15 sends an unchanged out-of-line
            # (TOASTed) column of the new row as 'u'; the old row carries its full value.
            new = pgoutput.fill_unchanged_toast(msg.new, msg.old)
            txn.changes.append(RowChange(table, UPDATE, self._row(msg.relation_id, msg.old),
                                         self._row(msg.relation_id, new)))
        elif isinstance(msg, pgoutput.Delete):
            table = self._relations[msg.relation_id].table
            before = self._row(msg.relation_id, msg.old if msg.old is not None else msg.key)
            txn.changes.append(RowChange(table, DELETE, before, None))
        elif isinstance(msg, pgoutput.Truncate):
            # Never silently: a truncate has no per-row events; say so loudly.
            log.error("crm_truncate_not_propagated", relation_ids=list(msg.relation_ids),
                      hint="run `crm-erp-sync reconcile` after a CRM truncate")
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


@dataclass
class ProducerStats:
    transactions: int = 0
    events: int = 0
    snapshot_rows: int = 0
    batches: int = 0
    heartbeats: int = 0
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
        self._conn: PgConn | None = None
        self.refs = References(self._load_reference)
        self._kafka = kafka_producer
        self._stop = threading.Event()
        self.stats = ProducerStats()
        self.metrics = ProducerMetrics()
        self.health = Health(settings, self.metrics)
        self._last_slot_check = 0.0
        self._source: ChangeSource | None = None
        self._next_snapshot_poll = 0.0
        self._chunk: _Chunk | None = None
        self._pending_progress: list[tuple[_Chunk, int]] = []
        self._last_advance = time.monotonic()
        self._topics = {"customer": settings.sales_topic, "order": settings.sales_topic,
                        "market_demand": settings.market_topic}
        # Called with the events of each batch once the broker acknowledged them all
        # (benchmarks measure commit-to-acknowledgement latency with it).
        self.on_acknowledged: Callable[[list[Outgoing]], None] | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def kafka(self) -> Any:
        if self._kafka is None:
            self._kafka = make_producer(self.settings)
        return self._kafka

    # ---- leadership -------------------------------------------------------------------
    def acquire_leadership(self, conn: PgConn, wait: bool = True) -> bool:
        """Block until this process holds the capture lock (or stop() is called)."""
        waited = False
        while not self._stop.is_set():
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                               (lock_key(self.settings.slot_name),)).fetchone()
            self.health.beat()
            if row and row[0]:
                log.info("capture_lock_acquired", slot=self.settings.slot_name,
                         after_standby=waited)
                self.metrics.active.set(1)
                self.health.set_ready(True, "active", role="active")
                return True
            if not wait:
                return False
            if not waited:
                log.info("standby", reason="another producer holds the capture lock")
                self.metrics.active.set(0)
                self.health.set_ready(True, "standby", role="standby")
            waited = True
            self._stop.wait(1.0)
        return False

    # ---- setup ------------------------------------------------------------------------
    def ensure_slot(self, conn: PgConn) -> bool:
        """Create the slot if missing; on first creation request the initial snapshot."""
        added = ensure_capture_objects(conn, self.settings, self.profile)
        if added:
            log.warning("publication_repaired", publication=self.settings.publication_name,
                        tables_added=added)
        self._tables = read_table_info(conn, self.profile)
        self._conn = conn
        exists = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                              (self.settings.slot_name,)).fetchone()
        if exists and exists[0] == "lost":
            self._slot_lost(conn)
            exists = None
        if exists:
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
        log.info("slot_created", slot=self.settings.slot_name, initial_snapshot=True)
        return True

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
        and no snapshot is left."""
        http = serve(self.settings, self.health)
        try:
            lock_conn = connect(self.settings.crm_dsn)
            conn = connect(self.settings.crm_dsn)
        except StackUnavailable:
            if http is not None:
                http.close()
            raise
        try:
            if not self.acquire_leadership(lock_conn):
                return self.stats
            self.ensure_slot(conn)
            backoff = 0.2
            lock_checked = 0.0
            while not self._stop.is_set():
                self.health.beat()
                try:
                    if time.monotonic() >= lock_checked + LOCK_CHECK_S:
                        lock_conn.execute("SELECT 1")  # lose the session, lose the lock: stop
                        lock_checked = time.monotonic()
                    moved = self.step(conn)
                    self._observe_slot(conn)
                    backoff = 0.2
                    self.health.recovered()
                except Retryable as exc:
                    self.health.failing()
                    self.metrics.retries.inc()
                    log.warning("retrying", error=str(exc), backoff_s=backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    conn = self._reconnect(conn)
                    continue
                except (psycopg.errors.ObjectNotInPrerequisiteState,
                        psycopg2.errors.ObjectNotInPrerequisiteState) as exc:
                    # Peeking a slot whose WAL was removed: not transient. ensure_slot fails
                    # (SlotLost) or starts over; anything else is retried with backoff.
                    log.warning("slot_not_readable", error=exc.diag.message_primary)
                    self.ensure_slot(conn)
                    self._chunk = None
                    self._pending_progress.clear()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                except psycopg.OperationalError as exc:
                    self.health.failing()
                    self.metrics.retries.inc()
                    log.warning("crm_connection_lost", error=type(exc).__name__)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    if lock_conn.closed or lock_conn.broken:
                        raise StackUnavailable("lost the capture lock's session") from exc
                    conn = self._reconnect(conn)
                    continue
                if not moved:
                    if (until_idle and self._chunk is None and self._caught_up(conn)
                            and not self._has_pending_snapshot(conn)):
                        break
                    self._maybe_heartbeat(conn)
        finally:
            self.health.set_ready(False, "stopping")
            self.metrics.active.set(0)
            if http is not None:
                http.close()
            if self._kafka is not None:
                self._kafka.flush()
            if self._source is not None:
                self._source.close()
                self._source = None
            conn.close()
            lock_conn.close()  # releases the capture lock: a standby takes over
        return self.stats

    def _observe_slot(self, conn: PgConn) -> None:
        """The slot's retained WAL, at most every few seconds (one catalog query)."""
        now = time.monotonic()
        if now - self._last_slot_check < 5.0:
            return
        self._last_slot_check = now
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (self.settings.slot_name,)).fetchone()
        if row is not None:
            self.metrics.retained_wal.set(row[0] or 0)
            self.metrics.unconfirmed_wal.set(row[1] or 0)

    def _reconnect(self, conn: PgConn) -> PgConn:
        try:
            conn.close()
        finally:
            self._chunk = None  # the chunk's watermarks are re-read; the chunk is redone
            self._pending_progress.clear()
        try:
            self._conn = connect(self.settings.crm_dsn)
            return self._conn
        except StackUnavailable:
            return conn  # next step fails again and backs off

    def step(self, conn: PgConn) -> bool:
        """One batch: maybe open a snapshot chunk, read whole transactions (waiting up to
        ``producer_poll_ms`` for the first), publish, wait for acks, confirm."""
        if (self._chunk is None and time.monotonic() >= self._next_snapshot_poll
                and not self._open_chunk(conn)):
            self._next_snapshot_poll = time.monotonic() + SNAPSHOT_POLL_S
        source = self._change_source()
        txns = source.next_transactions(conn, self.settings.producer_poll_ms / 1000)
        if not txns:
            return False
        outgoing: list[Outgoing] = []
        for txn in txns:
            outgoing.extend(self._events_for(txn))
        self._publish(outgoing)
        self._commit_progress(conn)
        last_end = txns[-1].end_lsn
        source.confirm(conn, last_end)
        self._last_advance = time.monotonic()
        self.stats.transactions += len(txns)
        self.metrics.transactions.inc(len(txns))
        self.stats.batches += 1
        self.stats.last_commit_lsn = last_end
        return True

    def _change_source(self) -> ChangeSource:
        if self._source is None:
            self._source = source_for(self.settings, ChangeDecoder, self._stop)
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
        found = cur.execute(query, params).fetchone()
        if found is None:
            return None
        return canonical(ent, typed_row(info, found), self.refs)

    def _events_for(self, txn: CommittedTxn) -> list[Outgoing]:
        changes: list[RowChange] = []
        high_closed = False
        chunk = self._chunk
        for change in txn.changes:
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
            changes.append(change)
            if chunk is not None and chunk.window_open:
                row = change.after if change.after is not None else change.before
                assert row is not None
                chunk.rows.pop((change.table, ent.key_text(row)), None)
        events = build_events(changes, profile=self.profile, refs=self.refs,
                              lsn=txn.commit_lsn, xid=txn.xid, commit_time=txn.commit_time)
        if high_closed and chunk is not None:
            reads = [RowChange(table, READ, None, row)
                     for (table, _key), row in chunk.rows.items()]
            events.extend(build_events(reads, profile=self.profile, refs=self.refs,
                                       lsn=txn.commit_lsn, xid=0,
                                       commit_time=txn.commit_time, snapshot=True,
                                       first_seq=len(txn.changes)))
            self._pending_progress.append((chunk, len(reads)))
            self.stats.snapshot_rows += len(reads)
            self._chunk = None
        return events

    def _publish(self, outgoing: list[Outgoing]) -> None:
        if not outgoing:
            return
        producer = self.kafka
        futures = []
        try:
            for event in outgoing:
                value = self.registry.encode(event.kind, event.record)
                futures.append(producer.send(
                    self._topics[event.kind], key=event.key, value=value,
                    headers=[("event_id", event.event_id.encode()),
                             ("event_kind", event.kind.encode())]))
            producer.flush(timeout=self.settings.heartbeat_interval_s * 6)
        except KafkaError as exc:
            raise Retryable(f"publishing failed: {type(exc).__name__}") from exc
        failed = [f for f in futures if not f.is_done or f.failed()]
        if failed:
            first = failed[0].exception if failed[0].is_done else "not acknowledged in time"
            raise Retryable(f"{len(failed)} of {len(futures)} events not acknowledged: {first}")
        self.stats.events += len(futures)
        self.metrics.count_published((self._topics[e.kind], e.kind) for e in outgoing)
        if self.on_acknowledged is not None:
            self.on_acknowledged(outgoing)

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
        head, lines = read_chunk(conn, self._tables, self.profile, info.entity, after=last_key,
                                 keys=keys, limit=chunk_size)
        ent = info.entity
        rows: dict[tuple[str, str], dict[str, Any]] = {
            (table, ent.key_text(r)): r for r in head}
        line_ent = self.profile.entity("order_line")
        if line_ent is not None:
            for line in lines:
                rows[(line_ent.table, line_ent.key_text(line))] = line
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
                             last_key=ent.key_text(head[-1]), low_id=low[0], high_id=high[0])
        return True

    def _commit_progress(self, conn: PgConn) -> None:
        for chunk, emitted in self._pending_progress:
            conn.execute(
                f"UPDATE {OWN_SCHEMA}.snapshots SET last_key = %s, chunks_done = chunks_done + 1,"
                " rows_emitted = rows_emitted + %s WHERE snapshot_id = %s",
                (chunk.last_key, emitted, chunk.snapshot_id))
            log.info("snapshot_chunk_published", snapshot_id=chunk.snapshot_id,
                     table=chunk.table, chunk_no=chunk.chunk_no, rows=emitted)
        if self._pending_progress:
            conn.execute(f"DELETE FROM {WATERMARK_TABLE} "
                         "WHERE written_at < now() - interval '1 hour'")
        self._pending_progress.clear()

    def _maybe_heartbeat(self, conn: PgConn) -> None:
        """A quiet slot on a busy database retains WAL; a logical message moves it on."""
        if time.monotonic() - self._last_advance < self.settings.heartbeat_interval_s:
            return
        conn.execute("SELECT pg_logical_emit_message(true, %s, now()::text)",
                     (HEARTBEAT_PREFIX,))
        self._last_advance = time.monotonic()
        self.stats.heartbeats += 1
