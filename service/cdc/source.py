"""Where the producer's committed transactions come from: the slot behind one small seam.

Two implementations of :class:`ChangeSource`:

* :class:`StreamSource` (the default, ``CRM_ERP_SYNC_CAPTURE_TRANSPORT=stream``): the
  streaming replication protocol (``START_REPLICATION ... LOGICAL``) over psycopg2's
  ``LogicalReplicationConnection``. One walsender decodes each WAL record once and keeps its
  decoding state between reads, so capture costs the CRM little CPU.
* :class:`SqlPeekSource` (``CRM_ERP_SYNC_CAPTURE_TRANSPORT=sql``): the SQL interface,
  ``pg_logical_slot_peek_binary_changes`` + ``pg_replication_slot_advance``. Each peek
  re-decodes the WAL from the slot's ``restart_lsn`` (it trails by up to ~15 s, more behind an
  open transaction), so it costs the CRM far more CPU; it stays for CRMs that only allow
  ordinary sessions (a transaction-mode pooler in front, no free ``max_wal_senders``) and as
  the baseline of ``bench/capture_cpu.py``.

The delivery rule is the same for both: the producer publishes what ``next_transactions``
returned and may read the next batch while the broker acknowledges it (a bounded pipeline,
``CdcProducer``), but calls ``confirm(end_lsn)`` for each batch, in the order they were
returned, only once the broker acknowledged every event of it and of every batch before it;
the slot's confirmed position never passes an unacknowledged transaction, so a crash re-sends
and never skips. Batches returned but not confirmed (their publish failed) are read again
from the slot after ``close()``, which the producer calls on every failure.

Both sources cut batches the same way (:class:`Batcher`).
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import structlog

from service.cdc import pgoutput
from service.cdc.events import CommittedTxn
from service.errors import ConnectionLost, Retryable
from service.pg import PgConn
from service.settings import Settings

log = structlog.get_logger("producer.source")

# How often the streaming source reports its confirmed position to the walsender (psycopg2
# sends it from read_message once this many seconds passed since the last report).
FEEDBACK_INTERVAL_S = 1
# While a batch gathers behind an unacknowledged one: how long one wait for the stream lasts
# before the acknowledgement is looked at again (a broker round trip is a few ms here).
GATHER_TICK_S = 0.001


def _send_feedback(cur: psycopg2.extras.ReplicationCursor, **kwargs: Any) -> None:
    """``cur.send_feedback(**kwargs)``; the method has no type information in the stubs."""
    cast(Any, cur).send_feedback(**kwargs)


class TxnDecoder(Protocol):
    """Turns pgoutput messages into committed transactions (``producer.ChangeDecoder``)."""

    def feed(self, data: bytes) -> CommittedTxn | None: ...

    @property
    def open_changes(self) -> int: ...

    @property
    def in_transaction(self) -> bool: ...

    def cut(self) -> CommittedTxn | None: ...


class Batcher:
    """One batch, fed message by message: whole transactions until they hold ``limit``
    changes, or one piece (``decoder.cut()``) of a transaction that reaches ``limit`` changes
    by itself, so memory stays bounded whatever a transaction's size and the cuts fall at the
    same changes when a transaction is read again. Our own few lines: both sources read
    differently (a peek's rows, the stream's messages) but must cut identically."""

    __slots__ = ("_decoder", "_limit", "changes", "ready")

    def __init__(self, decoder: TxnDecoder, limit: int) -> None:
        self._decoder = decoder
        self._limit = limit
        self.ready: list[CommittedTxn] = []  # whole transactions (or the piece), in order
        self.changes = 0

    def feed(self, data: bytes) -> bool:
        """Decode one pgoutput message; True when the batch is full (hand ``ready`` out)."""
        decoder = self._decoder
        txn = decoder.feed(data)
        if txn is not None:
            self.ready.append(txn)
            self.changes += len(txn.changes)
            return self.changes >= self._limit
        if decoder.open_changes >= self._limit:
            # a big transaction: hand out this piece; the slot is confirmed past it only
            # after its last piece (events.CommittedTxn)
            piece = decoder.cut()
            assert piece is not None
            self.ready.append(piece)
            return True
        return False


class DecoderFactory(Protocol):
    def __call__(self) -> TxnDecoder: ...


class ChangeSource(Protocol):
    """Committed transactions from the replication slot, confirmed once published."""

    # What the last read of the slot cost the CRM, in seconds (the SQL peek; None when the
    # transport does not measure it), and the wait it imposed after finding nothing.
    peek_s: float | None
    backoff_s: float

    def next_transactions(self, conn: PgConn, max_wait_s: float,
                          gather_while: Callable[[], bool] | None = None) -> list[CommittedTxn]:
        """The next batch: committed transactions in commit order, after those of every batch
        returned before (confirmed or not), about ``producer_max_changes`` changes at most;
        ``[]`` when none was committed within ``max_wait_s`` seconds, or at once when the
        source cannot read on before the batches it returned are confirmed (the stream's
        keepalive rule, the end of a peek). A transaction with more changes comes in pieces
        (``complete`` False but the last) cut every ``producer_max_changes`` changes
        (:class:`Batcher`); the cuts fall at the same changes when it is read again.
        ``conn`` is the producer's CRM session.

        ``gather_while`` (the stream; a peek reads what it found): once a transaction is
        ready and nothing more has arrived, keep waiting for more while it returns True (the
        previous batch is still on its way to the broker), at most ``producer_poll_ms``, so
        a batch grows with the broker's round trip instead of being one transaction at a
        time at a steady low rate (group commit, as a database's WAL flush does).

        Raises :class:`Retryable` when the slot cannot be read for a transient reason
        (connection lost, slot still held by a dead producer's walsender), and the driver's
        ``ObjectNotInPrerequisiteState`` when the slot's WAL is gone (a lost slot)."""
        ...

    def confirm(self, conn: PgConn, end_lsn: int) -> None:
        """The oldest batch returned and not yet confirmed reached the broker, and so did
        every batch before it; the slot may forget every transaction ending at or before
        ``end_lsn`` (an LSN as an int; 0 when the batch held only a piece of a transaction
        under way: nothing to forget). Called once per non-empty batch, in order."""
        ...

    @property
    def unconfirmed(self) -> int:
        """Batches returned and not confirmed yet."""
        ...

    def keep_alive(self) -> None:
        """Called while a batch is being published (a slow broker): tell the server this
        client is alive, so it neither drops the connection nor asks for a reply."""
        ...

    def caught_up(self, conn: PgConn) -> bool:
        """True when every transaction committed before the call has been returned and
        confirmed (``run(until_idle=True)`` stops then). May need a few calls, each followed
        by ``next_transactions``, to become true."""
        ...

    def close(self) -> None:
        """Report the confirmed position one last time and release the slot."""
        ...

    def abandon(self) -> None:
        """Drop the connection without reporting a position (the producer stopped in the
        middle of a transaction it will decode again)."""
        ...

    def confirm_bound(self) -> int:
        """An LSN at or past every position this source ever let the slot confirm (the
        slot guard's in-process check for a slot replaced under a lost stream)."""
        ...


def source_for(settings: Settings, new_decoder: DecoderFactory,
               stop: threading.Event) -> ChangeSource:
    """The source the settings choose (``capture_transport``: ``stream`` or ``sql``)."""
    if settings.capture_transport == "sql":
        return SqlPeekSource(settings, new_decoder, stop)
    return StreamSource(settings, new_decoder)


# Empty peeks may take at most this share of the wall clock: each re-decodes the WAL since the
# slot's restart_lsn, which behind a long CRM transaction is seconds of CRM CPU per call.
EMPTY_PEEK_SHARE = 0.1
# Rows of a peek fetched per round trip (its result waits on the server meanwhile).
PEEK_FETCH_ROWS = 1000
PEEK_SQL = ("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
            "'proto_version', '1', 'publication_names', %s, 'messages', 'true')")


class SqlPeekSource:
    """The SQL decoding interface: peek whole transactions, advance after the broker acked.

    A peek is a ``WITH HOLD`` cursor: PostgreSQL runs it once and keeps its result (a
    tuplestore, on disk past ``work_mem``) while the producer fetches it
    :data:`PEEK_FETCH_ROWS` rows at a time, so a transaction of a million rows is handed out
    in pieces, as on the stream, instead of arriving in one result. The peek's cost is what
    the ``DECLARE`` took (``peek_s``); after a peek that found nothing the next one waits
    ``peek_s * 9`` (at most ``sql_peek_backoff_max_s``; at least ``producer_poll_ms``), so
    empty peeks take at most :data:`EMPTY_PEEK_SHARE` of the time however much WAL the slot
    retains (``backoff_s``).
    """

    def __init__(self, settings: Settings, new_decoder: DecoderFactory,
                 stop: threading.Event) -> None:
        self._settings = settings
        self._new_decoder = new_decoder
        self._stop = stop
        self._drained = False
        self._cursor: psycopg.ServerCursor[Any] | None = None
        self._rows: Iterator[Any] | None = None
        self._decoder: TxnDecoder | None = None
        self._handed = 0  # batches returned, not confirmed yet
        self._idle_until = 0.0
        self.peek_s: float | None = None  # what the last peek cost the CRM (seconds)
        self.backoff_s = 0.0  # the wait after the last empty peek
        self._advanced = 0

    def confirm_bound(self) -> int:
        return self._advanced

    def abandon(self) -> None:
        pass  # nothing is held between peeks

    @property
    def unconfirmed(self) -> int:
        return self._handed

    def next_transactions(self, conn: PgConn, max_wait_s: float,
                          gather_while: Callable[[], bool] | None = None) -> list[CommittedTxn]:
        if self._rows is None:
            if self._handed:
                # the peek is read to its end: a new one would decode the unconfirmed
                # transactions again (it starts at the slot's confirmed position)
                return []
            if time.monotonic() < self._idle_until:
                self._stop.wait(min(max_wait_s, self._idle_until - time.monotonic()))
                return []
            self._peek(conn)
        batch = self._read()
        if not batch:
            if self._drained:  # nothing at all: the next peek waits, longer when expensive
                self.backoff_s = min(self._settings.sql_peek_backoff_max_s,
                                     (self.peek_s or 0.0) * (1 / EMPTY_PEEK_SHARE - 1))
                self._idle_until = time.monotonic() + max(max_wait_s, self.backoff_s)
            self._stop.wait(max_wait_s)
        else:
            self._handed += 1
        return batch

    def _peek(self, conn: PgConn) -> None:
        started = time.perf_counter()
        cur = conn.cursor(name="crm_erp_sync_peek", withhold=True)
        try:
            cur.itersize = PEEK_FETCH_ROWS
            cur.execute(PEEK_SQL, (self._settings.slot_name, self._settings.producer_max_changes,
                                   self._settings.publication_name))
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                cur.close()
            raise
        self.peek_s = time.perf_counter() - started
        self._cursor, self._rows = cur, iter(cur)
        self._decoder = self._new_decoder()  # relations are re-sent at the start of every peek
        self._drained = True  # until a row comes

    def _read(self) -> list[CommittedTxn]:
        """Whole transactions, or a piece of one, from the open peek; the peek is closed
        when its rows are all read (the next call peeks again, after the confirm)."""
        rows, decoder = self._rows, self._decoder
        assert rows is not None and decoder is not None
        batch = Batcher(decoder, self._settings.producer_max_changes)
        for (data,) in rows:
            self._drained = False
            if batch.feed(bytes(data)):
                return batch.ready
        self._close_cursor()
        return batch.ready

    def _close_cursor(self) -> None:
        cur, self._cursor, self._rows = self._cursor, None, None
        if cur is not None:
            with contextlib.suppress(psycopg.Error):
                cur.close()

    def confirm(self, conn: PgConn, end_lsn: int) -> None:
        self._handed = max(0, self._handed - 1)
        if end_lsn:
            conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                         (self._settings.slot_name, pgoutput.lsn_to_str(end_lsn)))
            self._advanced = max(self._advanced, end_lsn)

    def keep_alive(self) -> None:
        pass  # a peek holds no connection open to the walsender

    def caught_up(self, conn: PgConn) -> bool:
        # an empty peek read the slot to the end of the WAL
        return self._drained and self._rows is None and not self._handed

    def close(self) -> None:
        self._close_cursor()
        self._handed = 0


class StreamSource:
    """The streaming replication protocol over psycopg2's ``LogicalReplicationConnection``.

    Why psycopg2 here (psycopg 3 everywhere else): psycopg 3 has no replication protocol
    (its issue #71); psycopg2 is the maintained Python driver that has it, and this class is
    its only user.

    The read loop is ``read_message()`` with ``select()`` timeouts rather than
    ``consume_stream()``, so the producer keeps control between batches (heartbeats, snapshot
    chunks, health, stop). psycopg2 answers the walsender's keepalives that ask for a reply
    inside ``read_message()`` and reports the position given to ``send_feedback`` every
    :data:`FEEDBACK_INTERVAL_S`.

    One psycopg2 behaviour needs care: on a keepalive it moves its reported flush position to
    the server's WAL end by itself when the data start of the last message read is at or below
    the last position we confirmed. That is right when everything read has been confirmed (an
    idle slot then follows the WAL without heartbeats), but a Relation message (data start 0)
    or the Begin of a transaction that started before the last confirmed commit can satisfy it
    while whole transactions read after that commit are still unconfirmed. So reading stops
    at such a message while unconfirmed transactions are held (in the batch being read, or in
    batches returned and still in flight); what is whole is returned, and the stream is not
    read again (``next_transactions`` returns ``[]``) until every batch returned is
    confirmed. Otherwise each message read starts past the last confirmed position, so
    reading on while earlier batches are in flight is safe. The same rule
    cannot hold inside a big transaction handed out in pieces (its changes may start below the
    last confirmed commit, and it must be read on): there the walsender's keepalives are kept
    away instead. It sends one mid-stream only after ``wal_sender_timeout / 2`` without a word
    from us; psycopg2's ``read_message`` reports every second, and :meth:`keep_alive` does
    while a piece is being published.
    """

    def __init__(self, settings: Settings, new_decoder: DecoderFactory) -> None:
        self._settings = settings
        self._new_decoder = new_decoder
        self._conn: psycopg2.extensions.connection | None = None
        self._cur: psycopg2.extras.ReplicationCursor | None = None
        self._decoder: TxnDecoder | None = None
        self._handed = 0  # batches returned, not confirmed yet
        # the last message read starts at or below the confirmed position while unconfirmed
        # transactions are held: no read_message (a keepalive) until all are confirmed
        self._held_back = False
        self._confirmed = 0  # the highest end LSN given to send_feedback
        self._idle_target: int | None = None  # WAL flush position caught_up waits for
        self.peek_s: float | None = None  # the walsender decodes each record once: no peeks
        self.backoff_s = 0.0
        # psycopg2 confirms up to the server's WAL end it was told of (see above): the
        # highest one seen bounds what this source may have confirmed
        self._bound = 0

    # ---- the seam ---------------------------------------------------------------------
    @property
    def unconfirmed(self) -> int:
        return self._handed

    @property
    def _in_txn(self) -> bool:
        return self._decoder is not None and self._decoder.in_transaction

    def next_transactions(self, conn: PgConn, max_wait_s: float,
                          gather_while: Callable[[], bool] | None = None) -> list[CommittedTxn]:
        if self._held_back and self._handed:
            return []  # see the class docstring: confirm what was returned before reading on
        try:
            if self._cur is None:
                self._open()
            batch = self._read(max_wait_s, gather_while)
        except psycopg2.errors.ObjectNotInPrerequisiteState:
            self._reset()
            raise  # the slot's WAL is gone: the producer's lost-slot handling decides
        except psycopg2.errors.UndefinedObject:
            self._reset()
            raise  # no such slot or publication: the producer's slot guard names it
        except psycopg2.errors.ObjectInUse as exc:
            self._reset()
            raise Retryable("the replication slot is still held by another walsender "
                            "(a stopped producer's, exiting)") from exc
        except (psycopg2.DatabaseError, psycopg2.InterfaceError) as exc:
            # A server restarted in immediate mode ends the COPY stream with a bare
            # DatabaseError (no SQLSTATE), not an OperationalError: the stream is gone either
            # way, and the walsender re-sends from the confirmed position on the next open.
            self._reset()
            raise ConnectionLost(f"replication stream lost ({type(exc).__name__})") from exc
        if batch:
            self._handed += 1
        return batch

    def confirm(self, conn: PgConn, end_lsn: int) -> None:
        self._handed = max(0, self._handed - 1)
        if not self._handed:
            self._held_back = False
        if end_lsn <= self._confirmed:
            return
        self._confirmed = end_lsn
        if self._cur is not None:
            # Not forced: psycopg2 reports it from read_message within FEEDBACK_INTERVAL_S,
            # which spares the walsender one wake-up per batch.
            _send_feedback(self._cur, write_lsn=end_lsn, flush_lsn=end_lsn)

    def keep_alive(self) -> None:
        if self._cur is not None:
            with contextlib.suppress(psycopg2.OperationalError, psycopg2.InterfaceError):
                _send_feedback(self._cur, force=True)

    def caught_up(self, conn: PgConn) -> bool:
        if self._cur is None or self._handed or self._in_txn:
            self._idle_target = None
            return False
        if self._idle_target is None:
            # Fix the target first, then ask for a keepalive: its WAL end is the walsender's
            # position when it answers, so on a busy cluster it does eventually pass the target.
            row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
            assert row is not None
            self._idle_target = pgoutput.str_to_lsn(row[0])
        if self._cur.wal_end >= self._idle_target:
            self._idle_target = None
            return True
        try:
            _send_feedback(self._cur, reply=True)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            self._reset()
        return False

    def close(self) -> None:
        if self._cur is not None and self._confirmed:
            # If the walsender is gone it keeps what it had; a restart re-sends the rest.
            with contextlib.suppress(psycopg2.OperationalError, psycopg2.InterfaceError):
                _send_feedback(self._cur, write_lsn=self._confirmed, flush_lsn=self._confirmed,
                                        force=True)
        self._reset()

    def abandon(self) -> None:
        self._reset()

    def confirm_bound(self) -> int:
        wal_end = int(self._cur.wal_end) if self._cur is not None else 0
        self._bound = max(self._bound, self._confirmed, wal_end)
        return self._bound

    # ---- the stream -------------------------------------------------------------------
    def _open(self) -> None:
        conn = psycopg2.connect(self._settings.crm_dsn, connect_timeout=10,
                                connection_factory=psycopg2.extras.LogicalReplicationConnection)
        try:
            cur = conn.cursor()
            # pgoutput sends text; timestamps in UTC as the producer's own session does.
            cur.execute("SET TimeZone = 'UTC'")
            cur.start_replication(
                slot_name=self._settings.slot_name, decode=False,
                status_interval=FEEDBACK_INTERVAL_S,
                options={"proto_version": "1",
                         "publication_names": self._settings.publication_name,
                         "messages": "true"})
        except BaseException:
            conn.close()
            raise
        self._conn, self._cur = conn, cur
        self._decoder = self._new_decoder()  # a new walsender sends every Relation again
        self._confirmed = 0
        log.info("replication_stream_started", slot=self._settings.slot_name)

    def _reset(self) -> None:
        """Forget the stream: the walsender re-sends from the slot's confirmed position."""
        self.confirm_bound()
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = self._cur = None
        self._decoder = None
        self._handed = 0
        self._held_back = False
        self._idle_target = None

    def _read(self, max_wait_s: float,
              gather_while: Callable[[], bool] | None) -> list[CommittedTxn]:
        cur, decoder = self._cur, self._decoder
        assert cur is not None and decoder is not None
        now = time.monotonic()
        deadline = now + max_wait_s
        # with batches in flight the producer asks without waiting (max_wait_s 0): a
        # transaction already buffered is still read whole
        breathe = now + max(max_wait_s, self._settings.producer_poll_ms / 1000)
        batch = Batcher(decoder, self._settings.producer_max_changes)
        ready = batch.ready
        while True:
            msg: Any = cur.read_message()
            if msg is not None:
                if batch.feed(msg.payload):
                    return ready
                if (ready or self._handed) and msg.data_start <= self._confirmed:
                    self._held_back = True  # see the class docstring
                    return ready
                if not ready and time.monotonic() > breathe:
                    return ready  # a long transaction under way: let the producer breathe
                continue
            if ready:
                # nothing more buffered: publish what is whole, unless the previous batch
                # is still unacknowledged (then this one could not go out before it anyway)
                if (gather_while is None or time.monotonic() > breathe
                        or not gather_while()):
                    return ready
                select.select([cur], [], [], GATHER_TICK_S)
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return ready
            select.select([cur], [], [], timeout)
