"""Protecting the ERP (issue #14 item 8): the apply window and the apply rate limit, against
the real broker and databases. The window is driven by the consumer's wall clock (moved by
the test instead of waiting for 22:00); Kafka, the group and the ERP are real."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up, wait_until
from tests.integration.conftest import Cli, Running


def partners(sync_env: SyncEnv) -> int:
    with sync_env.erp() as erp:
        return int(erp.execute("SELECT count(*) FROM erp.business_partners").fetchone()[0])


def add_customers(sync_env: SyncEnv, n: int, first: int = 0) -> None:
    with sync_env.crm() as crm:
        for i in range(first, first + n):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('赵', %s, '13912345678')", (f"六{i}",))
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def all_paused(consumer: ErpConsumer) -> bool:
    c: Any = consumer.consumer
    if c is None or consumer.window_closed_until is None:
        return False
    assigned = set(c.assignment() or ())
    return bool(assigned) and assigned <= set(c.paused())


def test_outside_the_window_the_consumer_waits_in_its_group_and_status_says_until_when(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.with_(apply_window="22:00-06:00", apply_window_tz="Asia/Shanghai",
                              membership_check_s=0.5, breaker_poll_s=0.2)
    add_customers(sync_env, 6)
    consumer = ErpConsumer(settings)
    # 12:00 in Shanghai: closed until 22:00 there.
    clock = consumer.clock = Clock(datetime(2026, 11, 29, 4, 0, tzinfo=UTC))
    thread = threading.Thread(target=consumer.run, daemon=True)
    running.workers.append((consumer, thread))
    thread.start()

    wait_until(lambda: all_paused(consumer), message="every owned partition paused")
    # In its group, waiting by design: ready, not a failed pod. (Waited for: a fresh group on
    # a loaded machine may still be rebalancing, which membership heals on its own.)
    _, body = wait_until(lambda: (r := consumer.health.readiness())[0] and r,
                         message="ready while outside the window")
    assert body["state"] == "outside_apply_window"
    assert body["apply_window_opens_at"] == "2026-11-29T22:00:00+08:00"
    assert consumer.metrics.apply_window_open._value.get() == 0
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute(
            "SELECT in_group FROM sync.consumer_membership WHERE client_id = %s",
            (consumer.membership.client_id,)).fetchone() == (True,),
            message="the consumer reporting itself in the group while the window is closed")
    assert partners(sync_env) == 0

    st = cli(settings, "status", "--max-lag", "1")
    assert "outside apply window until 2026-11-29 22:00:00+0800" in st.out, st.out
    st_json = cli(settings, "status", "--max-lag", "1", "--json").json
    assert st_json["total_lag"] == 6
    assert st_json["apply_window"]["open"] is False
    assert st_json["apply_window"]["as_seen_by"] == "consumers"
    assert not any("lag" in a for a in st_json["attention"]), st_json["attention"]
    # an operator's shell without the consumers' window setting sees the same
    bare = cli(sync_env.settings, "status", "--max-lag", "1", "--json").json
    assert bare["apply_window"]["open"] is False
    assert bare["apply_window"]["as_seen_by"] == "consumers"
    assert not any("lag" in a for a in bare["attention"]), bare["attention"]

    # 22:00:05 in Shanghai: the window opens and everything waiting is applied.
    clock.at = datetime(2026, 11, 29, 14, 0, 5, tzinfo=UTC)
    wait_until(lambda: partners(sync_env) == 6, message="the backlog applied once open")
    assert consumer.health.readiness()[1]["state"] != "outside_apply_window"
    # status tells what the consumers report (their clock here), not its own clock
    # ("until" comes from status's own wall clock, which this test does not control)
    wait_until(lambda: {k: v for k, v in cli(settings, "status", "--json").json[
                   "apply_window"].items() if k != "until"}
               == {"window": "22:00-06:00 Asia/Shanghai", "open": True,
                   "as_seen_by": "consumers"},
               message="status: the consumers report the window open")

    # 06:00:05: closed again; new changes wait for the next night.
    clock.at = datetime(2026, 11, 29, 22, 0, 5, tzinfo=UTC)
    wait_until(lambda: all_paused(consumer), message="paused again at 06:00")
    add_customers(sync_env, 3, first=6)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute(
            "SELECT in_group FROM sync.consumer_membership WHERE client_id = %s",
            (consumer.membership.client_id,)).fetchone() == (True,), message="still a member")
    assert partners(sync_env) == 6
    # A scheduled run started outside the window stops at once, saying until when.
    late = ErpConsumer(dataclasses.replace(settings,
                                           consumer_group=settings.consumer_group + "-cron"))
    late.clock = Clock(datetime(2026, 11, 29, 22, 0, 5, tzinfo=UTC))
    stats = consume_until_caught_up(late)
    assert not stats.caught_up
    assert stats.outside_window_until == datetime.fromisoformat("2026-11-30T22:00:00+08:00")
    clock.at = datetime(2026, 11, 30, 14, 30, tzinfo=UTC)
    wait_until(lambda: partners(sync_env) == 9, message="applied in the next window")


def test_the_rate_limit_spreads_a_burst_over_time(sync_env: SyncEnv) -> None:
    rate = 20.0
    settings = sync_env.with_(apply_max_rate=rate)
    add_customers(sync_env, 80)
    consumer = ErpConsumer(settings)
    started = time.monotonic()
    stats = consume_until_caught_up(consumer)
    elapsed = time.monotonic() - started
    assert stats.caught_up and partners(sync_env) == 80
    # 80 events at 20/s with a burst of one second's worth (20): the polls alone span at
    # least (80 - 20) / 20 = 3 s, and no poll takes more than 20 events.
    assert elapsed >= (80 - rate) / rate
    assert stats.batches >= 80 / rate and stats.messages == 80
    with sync_env.erp() as erp:
        per_second = [n for (n,) in erp.execute(
            "SELECT count(*) FROM erp.business_partners "
            "GROUP BY date_trunc('second', applied_at)").fetchall()]
    # Batches run one after another: the ones committed within one second were polled
    # within it, after at most one earlier batch (<= 20 + 20 + 20); unlimited, all 80 go
    # in one batch of up to CRM_ERP_SYNC_BATCH_MAX_EVENTS.
    assert max(per_second) <= 3 * rate
    assert consumer.metrics.apply_throttled._value.get() > 0
