"""Events deleted from a topic before the group applied them (finding F12), on the real
broker and databases: `KafkaAdminClient.delete_records` moves the log start past the group's
committed offset (what a `retention.ms` someone set does). The consumer records the lost
offsets in sync.offset_gaps, logs `records_lost` and counts them, goes on with the events
after them; `status` exits 1 naming topic, partition, offsets and the fix, until
`reconcile --repair` makes the ERP match and marks the gap resolved. Also while a consumer
runs (its partitions paused by an operator while the records are deleted)."""

from __future__ import annotations

import structlog
from kafka import TopicPartition

from service.consumer.pipeline import ErpConsumer
from service.kafka_io import make_admin, make_consumer
from service.operator.breaker import resume_pauses
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import read_topic, wait_until
from tests.integration.conftest import Cli, Running

CONTENT = "5G手机市场增长迅速"


def _insert_demands(sync_env: SyncEnv, n: int) -> list[str]:
    """n market-demand rows in one CRM transaction; their ids (the Kafka keys)."""
    with sync_env.crm() as crm, crm.transaction():
        return [str(crm.execute(
            "INSERT INTO crm.market_demand (kind, product_category, content, observed_at) "
            "VALUES ('市场趋势', '手机', %s, now()) RETURNING demand_id", (CONTENT,)
        ).fetchone()[0]) for _ in range(n)]


def _in_erp(sync_env: SyncEnv) -> set[str]:
    with sync_env.erp() as erp:
        return {r[0] for r in erp.execute("SELECT crm_demand_id FROM erp.demand_signals "
                                          "WHERE NOT deleted").fetchall()}


def _published(settings: Settings, ids: list[str]) -> bool:
    keys = {r.key.decode() for r in read_topic(settings, settings.market_topic)
            if r.key is not None}
    return set(ids) <= keys


def _offsets(settings: Settings) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """(the group's committed offsets, the read-committed end offsets) of the market topic."""
    probe = make_consumer(settings)  # the group's id, never subscribed: it does not join
    try:
        tps = [TopicPartition(settings.market_topic, p)
               for p in sorted(probe.partitions_for_topic(settings.market_topic))]
        ends: dict[TopicPartition, int] = probe.end_offsets(tps)
        committed = {tp: c for tp in tps if (c := probe.committed(tp)) is not None}
        return committed, ends
    finally:
        probe.close()


def _delete_up_to(settings: Settings, ends: dict[TopicPartition, int]) -> None:
    admin = make_admin(settings)
    try:
        admin.delete_records({tp: end for tp, end in ends.items() if end > 0})
    finally:
        admin.close()


def _gaps(sync_env: SyncEnv) -> list[tuple[str, int, int, int, bool]]:
    with sync_env.erp() as erp:
        return [(t, p, f, n, r) for t, p, f, n, r in erp.execute(
            "SELECT topic, partition, first_lost, next_kept, resolved_at IS NOT NULL "
            "FROM sync.offset_gaps WHERE consumer_group = %s ORDER BY 1, 2, 3",
            (sync_env.settings.consumer_group,)).fetchall()]


def _expected(committed: dict[TopicPartition, int], ends: dict[TopicPartition, int]
              ) -> list[tuple[str, int, int, int, bool]]:
    """A gap wherever the group's next offset (0: it never committed one there) is below
    the new log start."""
    return sorted((tp.topic, tp.partition, committed.get(tp, 0), end, False)
                  for tp, end in ends.items() if committed.get(tp, 0) < end)


def _lost_metric(consumer: ErpConsumer) -> float:
    return sum(s.value for metric in consumer.metrics.events_lost.collect()
               for s in metric.samples if s.name.endswith("_total"))


def _status_lines(cli: Cli, settings: Settings) -> tuple[int, list[str]]:
    out = cli(settings, "status")
    return out.code, [x for x in out.out.splitlines() if "deleted from Kafka" in x]


def test_events_deleted_before_the_group_applied_them_are_a_recorded_gap(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    running.start_producer(settings)
    consumer = running.start_consumer(settings)
    first = _insert_demands(sync_env, 3)
    wait_until(lambda: set(first) <= _in_erp(sync_env), timeout=120, message="first applied")
    running.stop(consumer)  # its last commit is flushed on stop

    lost = _insert_demands(sync_env, 12)
    wait_until(lambda: _published(settings, lost), timeout=60, message="lost ones published")
    committed, ends = _offsets(settings)
    expected = _expected(committed, ends)
    assert expected, (committed, ends)
    _delete_up_to(settings, ends)

    # No consumer has reached the partitions yet: `status` already names each range from the
    # broker's offsets (newcomer10: it counted the deleted events as lag and said no more).
    code, before = _status_lines(cli, settings)
    assert code == 1 and len(before) == len(expected), before
    for topic, partition, first_lost, next_kept, _r in expected:
        assert any(f"{topic}[{partition}] offsets {first_lost}..{next_kept - 1} " in x
                   and "no consumer has reached the partition since" in x for x in before)

    with structlog.testing.capture_logs() as logs:
        consumer = running.start_consumer(settings)
        wait_until(lambda: _gaps(sync_env) == expected, timeout=60,
                   message=f"gaps {expected} recorded")
        later = _insert_demands(sync_env, 4)
        wait_until(lambda: set(later) <= _in_erp(sync_env), timeout=120,
                   message="later events applied")
    assert not set(lost) & _in_erp(sync_env)  # really lost: what the gap is about
    # The group's offsets moved past each gap (no phantom lag), with or without later events.
    wait_until(lambda: all(_offsets(settings)[0].get(TopicPartition(t, p), -1) >= n
                           for t, p, _f, n, _r in expected), timeout=30,
               message="committed offsets past the gaps")

    errors = [e for e in logs if e["event"] == "records_lost"]
    assert sorted((e["topic"], e["partition"], e["first_lost"], e["next_kept"], False)
                  for e in errors) == expected
    assert all(e["log_level"] == "error" and e["count"] == e["next_kept"] - e["first_lost"]
               and "reconcile --repair" in e["fix"] for e in errors)
    assert CONTENT not in repr(logs)
    assert _lost_metric(consumer) == sum(n - f for _t, _p, f, n, _r in expected)

    code, lines = _status_lines(cli, settings)
    assert code == 1
    assert len(lines) == len(expected), lines
    for topic, partition, first_lost, next_kept, _r in expected:
        line, = (x for x in lines
                 if f"{topic}[{partition}] offsets {first_lost}..{next_kept - 1} " in x)
        assert "crm-erp-sync reconcile --repair" in line
    report = cli(settings, "status", "--json")
    assert report.code == 1
    assert sorted((g["topic"], g["partition"], g["first_lost"], g["next_kept"])
                  for g in report.json["offset_gaps"]) == [e[:4] for e in expected]

    # A reconcile of one entity proves nothing about the others: the gap stays.
    only = cli(settings, "reconcile", "--entity", "demand")
    assert only.code == 1 and "missing" in only.out
    assert not any(r for *_x, r in _gaps(sync_env))
    repaired = cli(settings, "reconcile", "--repair", "--wait", "90")
    assert repaired.code == 0, repaired.out
    assert f"marked {len(expected)} Kafka offset gap(s) resolved" in repaired.out
    assert set(lost) <= _in_erp(sync_env)
    assert all(r for *_x, r in _gaps(sync_env))
    code, lines = _status_lines(cli, settings)
    assert lines == []


def test_a_running_consumer_that_falls_behind_the_log_start_records_the_gap(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    running.start_producer(settings)
    consumer = running.start_consumer(settings)
    first = _insert_demands(sync_env, 6)
    wait_until(lambda: set(first) <= _in_erp(sync_env), timeout=120, message="first applied")
    paused = cli(settings, "pause", "--all", "--reason", "test: fall behind retention")
    assert paused.code == 0, paused.out
    wait_until(lambda: consumer.consumer is not None and len(consumer.consumer.paused())
               == 2 * settings.topic_partitions, timeout=60, message="partitions paused")

    lost = _insert_demands(sync_env, 9)
    wait_until(lambda: _published(settings, lost), timeout=60, message="lost ones published")
    lost_at: dict[TopicPartition, list[int]] = {}
    for r in read_topic(settings, settings.market_topic):
        if r.key is not None and r.key.decode() in lost:
            lost_at.setdefault(TopicPartition(r.topic, r.partition), []).append(r.offset)
    committed, ends = _offsets(settings)
    _delete_up_to(settings, ends)
    with structlog.testing.capture_logs() as logs:
        # the operator's `resume --all` (not through the CLI: it configures the logging)
        assert resume_pauses(settings, None, actor="test", reason="test")
        wait_until(lambda: len(_gaps(sync_env)) > 0 and _lost_metric(consumer) > 0,
                   timeout=60, message="gap recorded mid-run")
        later = _insert_demands(sync_env, 3)
        wait_until(lambda: set(later) <= _in_erp(sync_env), timeout=120,
                   message="later events applied")
    # Each partition that held lost events has one gap, from the consumer's position (the
    # committed offset, or past a transaction marker it had read) to the new log start.
    found = wait_until(lambda: (g := _gaps(sync_env)) and len(g) == len(lost_at) and g,
                       timeout=30, message=f"a gap on each of {sorted(lost_at)}")
    for topic, partition, first_lost, next_kept, resolved in found:
        tp = TopicPartition(topic, partition)
        assert not resolved and next_kept == ends[tp], (found, ends)
        assert committed.get(tp, 0) <= first_lost <= min(lost_at[tp]), (found, lost_at)
    assert _lost_metric(consumer) == sum(n - f for _t, _p, f, n, _r in found)
    assert [e for e in logs if e["event"] == "records_lost"]
    assert not set(lost) & _in_erp(sync_env)
    code, lines = _status_lines(cli, settings)
    assert code == 1 and len(lines) == len(found), lines


def test_an_erp_without_the_gaps_table_still_hears_of_the_loss_and_the_stream_goes_on(
        sync_env: SyncEnv, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.erp() as erp:  # an ERP set up by an older version
        erp.execute("DROP TABLE sync.offset_gaps")
    running.start_producer(settings)
    lost = _insert_demands(sync_env, 5)
    wait_until(lambda: _published(settings, lost), timeout=60, message="lost ones published")
    _committed, ends = _offsets(settings)
    _delete_up_to(settings, ends)
    with structlog.testing.capture_logs() as logs:
        consumer = running.start_consumer(settings)
        later = _insert_demands(sync_env, 2)
        wait_until(lambda: set(later) <= _in_erp(sync_env), timeout=120,
                   message="later events applied")
    errors = [e for e in logs if e["event"] == "records_lost"]
    assert sorted((e["partition"], e["first_lost"], e["next_kept"]) for e in errors) == sorted(
        (tp.partition, 0, end) for tp, end in ends.items() if end > 0)
    assert all(e["recorded"] is False and "crm-erp-sync setup" in e["setup_needed"]
               for e in errors)
    assert _lost_metric(consumer) == sum(ends.values())
