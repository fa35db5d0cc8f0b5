"""Offsets of applied batches (service/consumer/pipeline.py ``CommitOffsets``): when they are
committed, and for which partitions. A stand-in for the consumer records the commits; the
broker-facing behaviour (committed only after apply, nothing lost on kill -9) is
tests/integration/consumer/test_applier.py's."""

from __future__ import annotations

from typing import Any

from kafka import OffsetAndMetadata, TopicPartition

from service.consumer.pipeline import (
    Batch,
    CommitOffsets,
    Envelope,
    Message,
    _blocked_from,
)

A0, A1 = TopicPartition("a", 0), TopicPartition("a", 1)


class Recorder:
    def __init__(self, owned: set[TopicPartition]) -> None:
        self.owned = owned
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata],
               timeout_ms: int | None = None) -> None:
        self.commits.append({tp: o.offset for tp, o in offsets.items()})


def batch(*at: tuple[int, int], held: bool = False) -> Batch:
    return Batch([Envelope(Message("a", p, o, 0, b"k", b"v", held_id=7 if held else None))
                  for p, o in at])


def test_the_first_batch_is_committed_at_once_and_the_next_ones_within_the_interval_wait(
) -> None:
    consumer = Recorder({A0, A1})
    commits = CommitOffsets(consumer, every_s=3600)
    commits.submit(batch((0, 4), (0, 5)))
    assert consumer.commits == [{A0: 6}]
    commits.submit(batch((0, 6), (1, 2)))
    commits.submit(batch((1, 3)))
    assert consumer.commits == [{A0: 6}]  # pending, not lost
    commits.flush()
    assert consumer.commits == [{A0: 6}, {A0: 7, A1: 4}]
    commits.flush()  # nothing pending: no commit
    assert len(consumer.commits) == 2


def test_with_no_interval_every_batch_is_committed() -> None:
    consumer = Recorder({A0})
    commits = CommitOffsets(consumer, every_s=0)
    commits.submit(batch((0, 1)))
    commits.submit(batch((0, 2)))
    assert consumer.commits == [{A0: 2}, {A0: 3}]


def test_held_events_released_in_a_batch_move_no_offset() -> None:
    consumer = Recorder({A0})
    commits = CommitOffsets(consumer, every_s=0)
    commits.submit(batch((0, 40), held=True))
    assert consumer.commits == []


def test_offsets_of_a_partition_no_longer_assigned_are_left_to_its_new_owner() -> None:
    consumer = Recorder({A0, A1})
    commits = CommitOffsets(consumer, every_s=3600)
    commits.submit(batch((0, 1)))
    commits.submit(batch((0, 2), (1, 9)))
    consumer.owned = {A0}  # a rebalance took a[1] away
    commits.flush()
    assert consumer.commits == [{A0: 2}, {A0: 3}]
    assert commits.pending == {}


def test_a_key_is_blocked_from_its_first_letter_or_held_event_and_a_keyless_one_never(
) -> None:
    letters: dict[Any, tuple[int, int]] = {("a", b"1"): (0, 9), ("a", None): (0, 1),
                                           ("a", b"2"): (0, 3)}
    held: dict[Any, tuple[int, int]] = {("a", b"1"): (0, 12), ("a", b"2"): (0, 2),
                                        ("b", b"3"): (1, 5)}
    assert _blocked_from(letters, held) == {("a", b"1"): (0, 9), ("a", b"2"): (0, 2),
                                            ("b", b"3"): (1, 5)}


def test_a_partition_moved_past_a_gap_commits_the_log_start_never_backwards() -> None:
    consumer = Recorder({A0, A1})
    commits = CommitOffsets(consumer, every_s=3600)
    commits.skip_to(A0, 64)
    commits.submit(batch((0, 60)))  # an older applied record does not pull it back
    commits.skip_to(A1, 3)
    commits.submit(batch((1, 9)))  # a later applied one wins
    commits.flush()
    assert consumer.commits == [{A0: 64}, {A1: 10}]  # the first batch at once
