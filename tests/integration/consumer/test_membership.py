"""Issue #14 item 1: a consumer removed from its group rejoins by itself, and says so while out.

The removal is reproduced the way it happens (service/consumer/membership.py): a rebalance
whose JoinGroup/SyncGroup completes on kafka-python's IO thread while the consumer's main loop
is busy (here: blocked on a row lock in the ERP) for longer than the session timeout. The
broker then removes the member ("has failed, removing it from the group").
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from service.kafka_io import make_admin, make_consumer
from tests.helpers import wait_until


def _members(settings: Any) -> dict[str, list[int]]:
    admin = make_admin(settings)
    try:
        desc = admin.describe_groups([settings.consumer_group])[settings.consumer_group]
    finally:
        admin.close()
    return {m["member_id"]: [p for a in (m["member_assignment"] or {}).get(
        "assigned_partitions", []) for p in a["partitions"]] for m in desc["members"]}


def _row(erp: psycopg.Connection[Any], client_id: str) -> Any:
    return erp.execute("SELECT in_group, out_since, rejoins, member_id "
                       "FROM sync.consumer_membership WHERE client_id = %s",
                       (client_id,)).fetchone()


def _rebalancing(consumer: Any) -> bool:
    return "rebalancing" in str(consumer.group_metadata().state).lower()


def _member_b(settings: Any) -> Any:
    """A plain group member. Its topics' metadata is fetched before it first joins: a leader
    that assigns before it knows the partitions assigns nothing until its next metadata
    refresh (minutes)."""
    other = make_consumer(settings, settings.sales_topic, settings.market_topic,
                          client_id="member-b")
    for topic in (settings.sales_topic, settings.market_topic):
        other.partitions_for_topic(topic)
    return other


def _waiting_locks(erp: psycopg.Connection[Any]) -> int:
    row = erp.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                      "AND datname = current_database()").fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(240)
def test_busy_loop_during_a_rebalance_gets_the_consumer_removed_and_it_rejoins(
        sync_env: Any, running: Any) -> None:
    settings = sync_env.with_(membership_check_s=0.05, breaker_poll_s=0.5)
    erp = sync_env.erp()
    locker = psycopg.connect(settings.erp_dsn)
    # B: a plain member that owns the partitions first and rejoins only when told to (it
    # polls only when this test says), so that A's JoinGroup stays in flight meanwhile.
    other = _member_b(settings)
    try:
        wait_until(lambda: other.poll(timeout_ms=500) is not None and other.assignment(),
                   interval=0, message="member B in the group")
        a = running.start_consumer(settings)
        wait_until(lambda: a.consumer is not None and _rebalancing(a.consumer),
                   message="A's JoinGroup in flight")
        first_id = a.consumer.group_metadata().member_id
        wait_until(lambda: _row(erp, a.membership.client_id), message="A's report row")
        # A's next report blocks on its row: its main loop stops, its join still in flight.
        locker.execute("SELECT 1 FROM sync.consumer_membership WHERE client_id = %s FOR UPDATE",
                       (a.membership.client_id,))
        wait_until(lambda: _waiting_locks(erp), message="A blocked on its report row")
        # B rejoins: the rebalance completes on A's IO thread while A's loop is blocked, and
        # with no heartbeat from A the broker removes it after the session timeout.
        deadline = time.monotonic() + 60
        while first_id in _members(settings):
            other.poll(timeout_ms=200)
            assert time.monotonic() < deadline, "A was not removed from the group"
        # Removed by the broker while its process is alive.
        assert first_id not in _members(settings)
        locker.rollback()  # A's loop goes on

        # ... and rejoins by itself: a new member id, listed by the broker, with partitions.
        def rejoined() -> bool:
            other.poll(timeout_ms=100)
            members = _members(settings)
            me = a.consumer.group_metadata().member_id
            return bool(me in members and members[me] and a.membership.in_group)

        wait_until(rejoined, timeout=90, interval=0.1, message="A back in its group")
        assert a.consumer.group_metadata().member_id != first_id
        wait_until(lambda: (_row(erp, a.membership.client_id) or (False,))[0], timeout=30,
                   message="A's row saying it is in the group")
        _ready, body = a.health.readiness()
        assert body["state"] != "outside_group"
    finally:
        locker.close()
        other.close()
        erp.close()


@pytest.mark.timeout(240)
def test_consumer_outside_its_group_unnoticed_by_its_client_reports_it_and_rejoins(
        sync_env: Any, running: Any) -> None:
    """The silent case: the client believes it is a stable member, but sends no heartbeat
    (simulated by disabling kafka-python's heartbeat, as its own join path does), so the
    broker removes it and nothing in the client notices. The membership check does: while
    out, /readyz is 503, crm_erp_sync_group_member is 0 and sync.consumer_membership says so (for
    `status`); then it rejoins."""
    settings = sync_env.with_(membership_check_s=0.2, breaker_poll_s=0.5)
    erp = sync_env.erp()
    other = _member_b(settings)
    try:
        wait_until(lambda: other.poll(timeout_ms=500) is not None and other.assignment(),
                   interval=0, message="member B in the group")
        a = running.start_consumer(settings)

        def both_in() -> bool:
            other.poll(timeout_ms=100)
            members = _members(settings)
            return bool(a.consumer is not None and a.membership.in_group and len(members) == 2
                        and all(members.values()))

        wait_until(both_in, timeout=90, interval=0.05, message="A and B in the group")
        first_id = a.consumer.group_metadata().member_id
        a.consumer._coordinator._disable_heartbeat()  # the client goes silent

        seen_out: list[Any] = []

        def out_seen() -> bool:
            other.poll(timeout_ms=50)
            row = _row(erp, a.membership.client_id)
            if row and not row[0] and not seen_out:
                seen_out.append((row, a.health.readiness(),
                                 a.metrics.group_member._value.get()))
            return bool(seen_out)

        wait_until(out_seen, timeout=60, interval=0.01,
                   message="A reporting itself outside the group")
        (row, (ready_out, body_out), metric_out) = seen_out[0]
        assert row[1] is not None  # out_since
        assert not ready_out and body_out["state"] == "outside_group"
        assert metric_out == 0

        def rejoined() -> bool:
            other.poll(timeout_ms=100)
            members = _members(settings)
            me = a.consumer.group_metadata().member_id
            return bool(me in members and members[me] and a.membership.in_group)

        wait_until(rejoined, timeout=90, interval=0.05, message="A back in its group")
        assert a.consumer.group_metadata().member_id != first_id
        assert a.membership.rejoins >= 1
        assert a.metrics.group_rejoins._value.get() >= 1
        wait_until(lambda: (_row(erp, a.membership.client_id) or (False,))[0], timeout=30,
                   message="A's row saying it is in the group again")
        assert a.health.readiness()[1]["state"] != "outside_group"
    finally:
        other.close()
        erp.close()
