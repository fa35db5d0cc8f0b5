"""A big CRM transaction is handed out in pieces (bounded memory) and confirmed only after its
last piece; its events are the same, with the same ids, as if it had come whole. Empty SQL
peeks back off by what they cost."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.events import CREATE, CommittedTxn, RowChange
from service.cdc.producer import CdcProducer, ChangeDecoder
from service.cdc.source import SqlPeekSource
from service.settings import Settings
from tests.unit.cdc.test_capture_edge_values import CUSTOMER_COLUMNS
from tests.unit.cdc.test_pgoutput import begin, commit, insert
from tests.unit.cdc.test_source import REL, TS, Msg, Scripted, ScriptedCursor

CONN: Any = None  # the streaming source reads no SQL session in next_transactions/confirm


def big_txn(xid: int, first: int, end: int, n: int) -> list[Msg]:
    return ([Msg(begin(end - 10, TS, xid), first), Msg(REL, 0)]
            + [Msg(insert(16384, str(i), f"客户{i}"), first + 8 * (i + 1)) for i in range(n)]
            + [Msg(commit(end - 10, end, TS), end)])


def test_a_big_transaction_comes_in_pieces_and_is_confirmed_after_its_last() -> None:
    cursor = ScriptedCursor(big_txn(1, 100, 10_000, 7) + big_txn(2, 20_000, 30_000, 1))
    source = Scripted(cursor, producer_max_changes=3)
    pieces = []
    while len(pieces) < 3:
        batch = source.next_transactions(CONN, 0.01)
        assert len(batch) == 1  # never more than one piece (of 3 changes) held
        pieces += batch
        piece = batch[0]
        source.confirm(CONN, piece.end_lsn if piece.complete else 0)
        if not piece.complete:
            assert all("flush_lsn" not in f for f in cursor.feedback)  # nothing confirmed
    assert [(p.first_change, len(p.changes), p.complete) for p in pieces] == [
        (0, 3, False), (3, 3, False), (6, 1, True)]
    assert {(p.xid, p.commit_lsn, p.commit_time) for p in pieces} == {(1, 9_990, TS)}
    assert pieces[-1].end_lsn == 10_000
    assert cursor.feedback[-1] == {"write_lsn": 10_000, "flush_lsn": 10_000}
    assert [c.after["customer_id"] for p in pieces for c in p.changes] == list(range(7))
    # the next transaction, small, comes whole
    [small] = source.next_transactions(CONN, 0.01)
    assert (small.xid, small.first_change, small.complete) == (2, 0, True)


def test_a_piece_published_keeps_the_walsender_informed_without_confirming() -> None:
    cursor = ScriptedCursor(big_txn(1, 100, 10_000, 5))
    source = Scripted(cursor, producer_max_changes=3)
    source.next_transactions(CONN, 0.01)
    source.keep_alive()
    assert cursor.feedback == [{"force": True}]


def customer(i: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CUSTOMER_COLUMNS)
    return row | {"customer_id": i, "family_name": "张", "given_name": f"三{i}",
                  "gender": "男", "name_order": "eastern",
                  "updated_at": datetime(2026, 11, 28, 12, tzinfo=UTC)}


def test_pieces_give_the_events_of_the_whole_transaction_with_the_same_ids() -> None:
    registry = SchemaRegistry.load(Settings().schemas_dir)
    changes = [RowChange("crm.customers", CREATE, None, customer(i)) for i in range(1, 8)]
    changes.insert(2, RowChange("crm.unrelated", CREATE, None, {"x": 1}))  # not captured
    whole = CommittedTxn(9, 0x5000, 0x5010, TS, list(changes))
    expected = CdcProducer(Settings(), registry, kafka_producer=object())._events_for(whole)
    assert len(expected) == 7

    producer = CdcProducer(Settings(), registry, kafka_producer=object())
    decoder = ChangeDecoder()
    decoder._txn = CommittedTxn(9, 0x5000, 0, TS)
    got = []
    for i, change in enumerate(changes):
        assert decoder._txn is not None
        decoder._txn.changes.append(change)
        if decoder.open_changes == 3:
            piece = decoder.cut()
            assert piece is not None and not piece.complete
            got += producer._events_for(piece)
        if i == len(changes) - 1:
            last = decoder._txn
            last.end_lsn = 0x5010
            got += producer._events_for(last)
    assert [e.event_id for e in got] == [e.event_id for e in expected]
    assert [e.record for e in got] == [e.record for e in expected]


class PeekCursor:
    """A server-side cursor whose DECLARE takes ``cost_s`` and returns ``rows``."""

    def __init__(self, rows: list[bytes], cost_s: float) -> None:
        self.rows, self.cost_s, self.itersize, self.closed = rows, cost_s, 0, False

    def execute(self, query: str, params: Any) -> None:
        time.sleep(self.cost_s)

    def __iter__(self) -> Any:
        return iter([(r,) for r in self.rows])

    def close(self) -> None:
        self.closed = True


class PeekConn:
    def __init__(self, *peeks: PeekCursor) -> None:
        self.peeks = list(peeks)
        self.declared = 0
        self.executed: list[tuple[str, Any]] = []

    def cursor(self, name: str, withhold: bool) -> PeekCursor:
        assert withhold  # survives the autocommit of its DECLARE
        self.declared += 1
        return self.peeks.pop(0)

    def execute(self, query: str, params: Any = None) -> None:
        self.executed.append((query, params))


def test_sql_peek_hands_a_big_transaction_out_in_pieces_and_advances_after_the_last() -> None:
    rows = [m.payload for m in big_txn(1, 100, 0x2710, 7)]
    conn = PeekConn(PeekCursor(rows, 0.0), PeekCursor([], 0.0))
    settings = dataclasses.replace(Settings(), producer_max_changes=3)
    source = SqlPeekSource(settings, ChangeDecoder, threading.Event())
    pieces = []
    while not pieces or not pieces[-1].complete:
        [piece] = source.next_transactions(conn, 0.01)  # type: ignore[arg-type]
        pieces.append(piece)
        source.confirm(conn, piece.end_lsn if piece.complete else 0)  # type: ignore[arg-type]
    assert [(p.first_change, len(p.changes)) for p in pieces] == [(0, 3), (3, 3), (6, 1)]
    assert conn.declared == 1  # one peek, read in pieces
    assert [q for q, _ in conn.executed] == ["SELECT pg_replication_slot_advance(%s, %s::pg_lsn)"]
    assert conn.executed[0][1][1] == "0/2710"


def test_empty_sql_peeks_back_off_by_what_they_cost() -> None:
    conn = PeekConn(PeekCursor([], 0.05), PeekCursor([], 0.0))
    source = SqlPeekSource(Settings(), ChangeDecoder, threading.Event())
    assert source.next_transactions(conn, 0.01) == []  # type: ignore[arg-type]
    assert source.peek_s is not None and source.peek_s >= 0.05
    assert 0.45 <= source.backoff_s <= Settings().sql_peek_backoff_max_s
    started = time.monotonic()
    while time.monotonic() - started < 0.3:
        assert source.next_transactions(conn, 0.01) == []  # type: ignore[arg-type]
    assert conn.declared == 1  # no second peek within 9 x the first one's cost
    assert source.caught_up(conn)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while conn.declared < 2:
        assert time.monotonic() < deadline, "the next peek never came"
        source.next_transactions(conn, 0.01)  # type: ignore[arg-type]
    assert source.backoff_s < 0.05  # a cheap empty peek: back to the poll interval


def test_the_backoff_is_capped() -> None:
    settings = dataclasses.replace(Settings(), sql_peek_backoff_max_s=0.1)
    source = SqlPeekSource(settings, ChangeDecoder, threading.Event())
    source.next_transactions(PeekConn(PeekCursor([], 0.05)), 0.01)  # type: ignore[arg-type]
    assert source.backoff_s == 0.1


def test_sql_peek_reads_on_with_pieces_unconfirmed_but_peeks_again_only_once_all_are() -> None:
    rows = [m.payload for m in big_txn(1, 100, 0x2710, 7)]
    conn = PeekConn(PeekCursor(rows, 0.0), PeekCursor([], 0.0))
    settings = dataclasses.replace(Settings(), producer_max_changes=3)
    source = SqlPeekSource(settings, ChangeDecoder, threading.Event())
    batches = [source.next_transactions(conn, 0.0) for _ in range(4)]  # type: ignore[arg-type]
    # three pieces from the open peek, unconfirmed; then nothing: a new peek would decode
    # them again
    assert [[(p.first_change, p.complete) for p in b] for b in batches] == [
        [(0, False)], [(3, False)], [(6, True)], []]
    assert conn.declared == 1 and source.unconfirmed == 3
    for piece in (b[0] for b in batches[:3]):
        source.confirm(conn, piece.end_lsn if piece.complete else 0)  # type: ignore[arg-type]
    assert [q for q, _ in conn.executed] == ["SELECT pg_replication_slot_advance(%s, %s::pg_lsn)"]
    assert source.next_transactions(conn, 0.0) == []  # type: ignore[arg-type]
    assert conn.declared == 2  # all confirmed: the next peek
