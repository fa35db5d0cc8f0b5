"""StreamSource's read loop against a scripted replication cursor (no server).

What is checked here is the part no server test can force: reading stops at a message whose
data start is at or below the last confirmed position while a whole, unconfirmed transaction
is held, in the batch being read or in batches returned and still unconfirmed (psycopg2 would
otherwise move its flush position past it on the next keepalive); the next batch is read while
earlier ones are unconfirmed and confirms go in order; and batches end at a transaction
boundary once ``producer_max_changes`` is reached.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from service.cdc.producer import ChangeDecoder
from service.cdc.source import StreamSource
from service.settings import Settings
from tests.unit.cdc.test_pgoutput import begin, commit, insert, relation

TS = datetime(2024, 5, 17, 8, 30, 15, tzinfo=UTC)
REL = relation(16384, "crm", "customers", "f", [(1, "customer_id", 20, -1),
                                               (0, "given_name", 25, -1)])


@dataclasses.dataclass
class Msg:
    payload: bytes
    data_start: int
    wal_end: int = 0


class ScriptedCursor:
    """Hands out the scripted messages in order; records send_feedback calls."""

    def __init__(self, messages: list[Msg]) -> None:
        self.messages = list(messages)
        self.read = 0
        self.feedback: list[dict[str, Any]] = []
        self.wal_end = 0
        self._sock_a, self._sock_b = socket.socketpair()  # never readable: select times out

    def read_message(self) -> Msg | None:
        if self.read >= len(self.messages):
            return None
        self.read += 1
        return self.messages[self.read - 1]

    def send_feedback(self, **kwargs: Any) -> None:
        self.feedback.append(kwargs)

    def fileno(self) -> int:
        return self._sock_a.fileno()

    def close(self) -> None:
        self._sock_a.close()
        self._sock_b.close()


def txn(xid: int, first: int, commit_start: int, end: int, *names: str,
        with_relation: bool = False) -> list[Msg]:
    msgs = [Msg(begin(end, TS, xid), first)]
    if with_relation:
        msgs.append(Msg(REL, 0))  # what PostgreSQL 15 sends as a Relation's data start
    msgs += [Msg(insert(16384, str(xid * 10 + i), name), first + 8 * (i + 1))
             for i, name in enumerate(names)]
    msgs.append(Msg(commit(commit_start, end, TS), end))
    return msgs


class Scripted(StreamSource):
    def __init__(self, cursor: ScriptedCursor, **settings: Any) -> None:
        super().__init__(dataclasses.replace(Settings(), **settings), ChangeDecoder)
        self.cursor = cursor

    def _open(self) -> None:
        self._cur = self.cursor  # type: ignore[assignment]
        self._decoder = self._new_decoder()


@pytest.fixture
def conn() -> Iterator[Any]:
    yield None  # the streaming source reads no SQL session in next_transactions/confirm


def test_stops_at_a_relation_message_while_an_unconfirmed_transaction_is_held(
        conn: Any) -> None:
    t1 = txn(1, 100, 180, 200, "三", with_relation=True)
    t2 = [Msg(begin(400, TS, 2), 300), Msg(REL, 0), Msg(insert(16384, "20", "四"), 310),
          Msg(commit(390, 400, TS), 400)]
    cursor = ScriptedCursor(t1 + t2)
    source = Scripted(cursor)
    first = source.next_transactions(conn, 0.01)
    assert [t.xid for t in first] == [1]
    # T2's Begin and its Relation (data start 0 <= the confirmed 0) were read; nothing after.
    assert cursor.read == len(t1) + 2
    source.confirm(conn, first[-1].end_lsn)
    assert cursor.feedback[-1] == {"write_lsn": 200, "flush_lsn": 200}
    second = source.next_transactions(conn, 0.01)
    assert [t.xid for t in second] == [2]
    assert [c.after for c in second[0].changes] == [{"customer_id": 20, "given_name": "四"}]


def test_stops_at_the_begin_of_a_transaction_older_than_the_confirmed_position(
        conn: Any) -> None:
    t1 = txn(1, 100, 180, 200, "三", with_relation=True)
    t2 = txn(2, 300, 380, 400, "四")
    t3 = txn(3, 150, 480, 500, "五")  # began before T1 committed, commits after T2
    cursor = ScriptedCursor(t1)
    source = Scripted(cursor)
    source.confirm(conn, source.next_transactions(conn, 0.01)[-1].end_lsn)
    cursor.messages += t2 + t3
    batch = source.next_transactions(conn, 0.01)
    assert [t.xid for t in batch] == [2]
    assert cursor.read == len(t1) + len(t2) + 1  # T3's Begin (150 <= 200), then stop
    source.confirm(conn, batch[-1].end_lsn)
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [3]


def test_reads_on_past_transactions_when_nothing_is_at_or_below_the_confirmed_position(
        conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True)
                            + txn(2, 300, 380, 400, "四") + txn(3, 500, 580, 600, "五"))
    source = Scripted(cursor)
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [1, 2, 3]


def test_the_next_batch_is_read_while_earlier_ones_are_unconfirmed_and_confirmed_in_order(
        conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True))
    source = Scripted(cursor)
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [1]
    cursor.messages += txn(2, 300, 380, 400, "四")
    assert [t.xid for t in source.next_transactions(conn, 0.0)] == [2]  # 1 in flight
    cursor.messages += txn(3, 500, 580, 600, "五")
    assert source.unconfirmed == 2
    assert all("flush_lsn" not in f for f in cursor.feedback)  # nothing confirmed yet
    source.confirm(conn, 200)
    assert cursor.feedback[-1] == {"write_lsn": 200, "flush_lsn": 200}
    assert source.unconfirmed == 1 and not source.caught_up(conn)
    source.confirm(conn, 400)
    assert cursor.feedback[-1] == {"write_lsn": 400, "flush_lsn": 400}
    assert [t.xid for t in source.next_transactions(conn, 0.0)] == [3]


def test_with_a_batch_in_flight_an_old_data_start_holds_reading_until_all_are_confirmed(
        conn: Any) -> None:
    t1 = txn(1, 100, 180, 200, "三", with_relation=True)
    t2 = txn(2, 300, 380, 400, "四")
    t3 = txn(3, 150, 480, 500, "五")  # began before T1 committed
    cursor = ScriptedCursor(t1)
    source = Scripted(cursor)
    source.confirm(conn, source.next_transactions(conn, 0.01)[-1].end_lsn)  # confirmed 200
    cursor.messages += t2
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [2]  # in flight
    cursor.messages += t3
    # T3's Begin starts at 150 <= 200 while T2 is unconfirmed: a keepalive read now could
    # let psycopg2 confirm past T2, so nothing more is read until T2 is confirmed
    assert source.next_transactions(conn, 0.0) == []
    read = cursor.read
    assert cursor.read == len(t1) + len(t2) + 1
    assert source.next_transactions(conn, 0.0) == [] and cursor.read == read
    source.confirm(conn, 400)
    assert [t.xid for t in source.next_transactions(conn, 0.0)] == [3]


def test_a_batch_ends_at_a_transaction_boundary_after_max_changes(conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "a", "b", "c", with_relation=True)
                            + txn(2, 300, 380, 400, "d", "e") + txn(3, 500, 580, 600, "f"))
    source = Scripted(cursor, producer_max_changes=4)
    batch = source.next_transactions(conn, 0.01)
    assert [t.xid for t in batch] == [1, 2]  # 3 changes, then 5: whole transactions only
    source.confirm(conn, batch[-1].end_lsn)
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [3]


def test_nothing_committed_within_the_wait_gives_an_empty_batch(conn: Any) -> None:
    cursor = ScriptedCursor([Msg(begin(200, TS, 1), 100), Msg(REL, 0)])  # no Commit yet
    source = Scripted(cursor)
    assert source.next_transactions(conn, 0.01) == []


def test_the_confirm_bound_covers_explicit_confirms_and_the_wal_end_psycopg2_was_told_of(
        conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True))
    source = Scripted(cursor)
    source.confirm(conn, source.next_transactions(conn, 0.01)[-1].end_lsn)
    assert source.confirm_bound() == 200
    cursor.wal_end = 5000  # a keepalive: psycopg2 may now confirm up to it by itself
    assert source.confirm_bound() == 5000
    source.close()  # the bound outlives the stream (the producer asks after a loss)
    assert source.confirm_bound() == 5000


def test_a_batch_gathers_while_the_one_before_is_unacknowledged(conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True))
    source = Scripted(cursor)
    assert [t.xid for t in source.next_transactions(conn, 0.01)] == [1]  # now in flight
    cursor.messages += txn(2, 300, 380, 400, "四")
    later = txn(3, 500, 580, 600, "五") + txn(4, 700, 780, 800, "六")
    checks = 0

    def unacknowledged() -> bool:
        # T3 and T4 arrive while T1 awaits its acknowledgement, which comes at the 3rd look
        nonlocal checks
        checks += 1
        if checks == 1:
            cursor.messages += later
        return checks < 3

    batch = source.next_transactions(conn, 0.0, gather_while=unacknowledged)
    assert [t.xid for t in batch] == [2, 3, 4]
    assert checks == 3


def test_a_ready_transaction_goes_out_once_the_one_before_is_acknowledged(conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True))
    source = Scripted(cursor)
    looked = []
    batch = source.next_transactions(conn, 0.01, gather_while=lambda: looked.append(1) or False)
    assert [t.xid for t in batch] == [1] and looked == [1]


def test_gathering_stops_after_producer_poll_ms_however_long_the_acknowledgement_takes(
        conn: Any) -> None:
    cursor = ScriptedCursor(txn(1, 100, 180, 200, "三", with_relation=True))
    source = Scripted(cursor, producer_poll_ms=20)
    started = time.monotonic()
    batch = source.next_transactions(conn, 0.0, gather_while=lambda: True)
    assert [t.xid for t in batch] == [1]
    assert time.monotonic() - started < 5  # bounded (20 ms), whatever the machine's load
