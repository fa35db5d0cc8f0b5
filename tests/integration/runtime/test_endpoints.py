"""/healthz, /readyz and /metrics of real producers and consumers, run in threads against the
real broker and databases, scraped over HTTP, with counters checked against what was sent."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.demo.load import load_demo
from service.erp.mappings import Mappings
from service.kafka_io import make_producer
from service.ops import group_lag
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import actual_erp, expected_erp, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening (yet, or any more)


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = get(port, "/metrics")
    if status == 0:
        return {}  # not listening yet
    assert status == 200, f"/metrics answered {status}"
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


@contextmanager
def running(target: Any, **kwargs: Any) -> Iterator[None]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target.run(**kwargs)
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        target.stop()
        thread.join(60)
        assert not thread.is_alive(), "did not stop within 60s"
    if errors:
        raise errors[0]


def with_port(settings: Settings) -> Settings:
    return dataclasses.replace(settings, http_port=free_port(), http_host="127.0.0.1")


def test_producer_and_consumer_endpoints_report_real_counters(sync_env: SyncEnv) -> None:
    load_demo(sync_env.settings.crm_dsn, customers=40, orders=80, rate=None, seed=5,
              changes=30)
    active_settings = with_port(sync_env.settings)
    standby_settings = with_port(sync_env.settings)
    registry = SchemaRegistry.load(sync_env.settings.schemas_dir)
    active = CdcProducer(active_settings, registry)
    standby = CdcProducer(standby_settings, registry)
    ap, sp = active_settings.http_port, standby_settings.http_port

    with running(active):
        wait_until(lambda: get(ap, "/readyz")[0] == 200, timeout=30, message="active ready")
        with running(standby):
            wait_until(lambda: get(sp, "/readyz")[0] == 200, timeout=30,
                       message="standby ready")
            ready = json.loads(get(sp, "/readyz")[1])
            assert ready["role"] == "standby" and ready["ok"] is True
            assert value(samples(sp), "crm_erp_sync_producer_active") == 0
        assert json.loads(get(ap, "/readyz")[1])["role"] == "active"
        assert get(ap, "/healthz")[0] == 200
        # Everything loaded is published: the slot is drained.
        wait_until(lambda: value(samples(ap), "crm_erp_sync_events_published_total") >= 120,
                   timeout=60, message="events published")
        wait_until(lambda: sum(p.end for p in group_lag(sync_env.settings))
                   == value(samples(ap), "crm_erp_sync_events_published_total"),
                   timeout=60, message="published counter == messages in the topics")
        m = samples(ap)
        assert value(m, "crm_erp_sync_producer_active") == 1
        assert value(m, "crm_erp_sync_events_published_total", kind="customer",
                     topic=sync_env.settings.sales_topic) >= 30
        assert value(m, "crm_erp_sync_events_published_total", kind="market_demand",
                     topic=sync_env.settings.market_topic) > 0
        assert value(m, "crm_erp_sync_transactions_published_total") > 0
        assert ("crm_erp_sync_slot_retained_wal_bytes", frozenset()) in m
        assert value(m, "crm_erp_sync_up", role="produce") == 1
        assert get(ap, "/nothing")[0] == 404
    published = sum(p.end for p in group_lag(sync_env.settings))

    # One message that cannot be decoded: a dead letter, counted and open.
    kafka = make_producer(sync_env.settings)
    kafka.send(sync_env.settings.sales_topic, key=b"999999", value=b"not avro").get(30)
    kafka.close()

    consumer_settings = with_port(dataclasses.replace(sync_env.settings, batch_max_events=50))
    cp = consumer_settings.http_port
    consumer = ErpConsumer(consumer_settings)
    with running(consumer):
        wait_until(lambda: value(samples(cp), "crm_erp_sync_events_consumed_total")
                   == published + 1, timeout=90, message="every message consumed")
        wait_until(lambda: value(samples(cp), "crm_erp_sync_dead_letters_open") == 1,
                   timeout=30, message="the open dead letter counted")
        wait_until(lambda: get(cp, "/readyz")[0] == 200, timeout=30, message="consumer ready")
        wait_until(lambda: value(samples(cp), "crm_erp_sync_consumer_lag") == 0
                   and value(samples(cp), "crm_erp_sync_consumer_assigned_partitions") == 6,
                   timeout=30, message="no lag on the 6 assigned partitions")
        m = samples(cp)
        ready = json.loads(get(cp, "/readyz")[1])
        assert ready["assigned_partitions"] == 6 and ready["state"] == "consuming"
        assert get(cp, "/healthz")[0] == 200
    sales = sync_env.settings.sales_topic
    applied = value(m, "crm_erp_sync_events_applied_total")
    assert applied == consumer.applier.applied
    assert value(m, "crm_erp_sync_events_applied_total", topic=sales, kind="customer") >= 30
    assert value(m, "crm_erp_sync_events_applied_total", kind="order") >= 60
    assert value(m, "crm_erp_sync_events_applied_total", kind="market_demand") > 0
    assert value(m, "crm_erp_sync_events_dead_lettered_total", topic=sales, kind="unknown",
                 stage="decode") == 1
    assert value(m, "crm_erp_sync_events_consumed_total", kind="unknown") == 1
    # Every applied event has its CRM-commit -> ERP-commit delay observed.
    assert value(m, "crm_erp_sync_end_to_end_delay_seconds_count") == applied
    assert value(m, "crm_erp_sync_end_to_end_delay_seconds_sum") > 0
    assert value(m, "crm_erp_sync_apply_batch_duration_seconds_count") == \
        consumer.stats.batches
    # The consumer's registry is its own: no producer metrics in it, and vice versa.
    assert value(m, "crm_erp_sync_events_published_total") == 0
    with sync_env.crm() as crm, sync_env.erp() as erp:
        assert actual_erp(erp) == expected_erp(crm, Mappings.load(sync_env.settings.mappings_file))
    # Stopped: the endpoints are gone with the process's loop.
    assert get(cp, "/healthz")[0] == 0, "endpoint still served after stop"
