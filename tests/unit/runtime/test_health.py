"""service.health and service.metrics without a broker: liveness, readiness, stalls, the HTTP
server, and registries that do not clash when several processes' metrics share one process."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, cast

import pytest
import structlog

from service.errors import ConfigError
from service.health import Health, HealthServer, serve
from service.metrics import ConsumerMetrics, ProducerMetrics
from service.settings import Settings


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_liveness_goes_stale_and_readiness_stalls() -> None:
    settings = dataclasses.replace(Settings(), liveness_timeout_s=0.2, readiness_stall_s=0.2)
    health = Health(settings, ConsumerMetrics())
    assert health.readiness()[0] is False  # starting
    health.set_ready(True, "consuming", assigned_partitions=3)
    health.beat()
    assert health.liveness()[0] and health.readiness()[0]
    health.failing()
    assert health.readiness()[0]  # a short retry is not a stall
    time.sleep(0.3)
    health.beat()
    ready, body = health.readiness()
    assert not ready and body["state"] == "stalled"
    health.recovered()
    assert health.readiness()[0]
    time.sleep(0.3)  # no beat: the loop is stuck
    assert not health.liveness()[0] and not health.readiness()[0]


def test_a_loop_blocked_in_a_call_is_not_ready_long_before_it_is_not_alive() -> None:
    # a batch waiting on an ERP lock: no failure to retry, the loop just does not come back
    health = consuming(dataclasses.replace(Settings(), liveness_timeout_s=30,
                                           readiness_stall_s=0.2))
    assert health.readiness()[0]
    deadline = time.monotonic() + 10
    while health.readiness()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    ready, body = health.readiness()
    assert not ready and body["state"] == "stalled" and "blocked" in body["reason"]
    assert health.liveness()[0]  # not restarted for it yet
    health.beat()
    assert health.readiness()[0]


def test_a_lost_connection_is_not_ready_at_once_with_its_reason() -> None:
    health = Health(Settings(), ProducerMetrics())  # stall window 60 s: not what decides
    health.set_ready(True, "active", role="active")
    health.beat()
    health.disconnected("broker unreachable (KafkaConnectionError)")
    ready, body = health.readiness()
    assert not ready
    assert body["state"] == "reconnecting"
    assert body["reason"] == "broker unreachable (KafkaConnectionError)"
    assert health.liveness()[0]  # alive: retrying is the job, no restart wanted
    health.recovered()
    ready, body = health.readiness()
    assert ready and body["state"] == "active" and "reason" not in body


def consuming(settings: Settings | None = None) -> Health:
    """A consumer's health once it is in its group with partitions, its loop just beaten."""
    health = Health(settings or Settings(), ConsumerMetrics())
    health.set_ready(True, "consuming", assigned_partitions=3)
    health.beat()
    return health


def test_a_tripped_breaker_makes_readiness_degraded() -> None:
    health = consuming()
    message = "tripped: 62% of the last 200 messages on crm.sales[1] were dead letters"
    health.set_degraded([message])
    ready, body = health.readiness()
    assert not ready and body["state"] == "degraded" and body["breaker_open"] == [message]
    assert health.liveness()[0]  # alive: the process must not be restarted for it
    health.set_degraded([])
    assert health.readiness()[0]


def test_an_operator_pause_is_planned_and_stays_ready() -> None:
    health = consuming()
    paused = "crm.sales[2] paused by ops (nightly load)"
    health.set_operator_paused([paused])
    ready, body = health.readiness()
    assert ready and body["state"] == "paused_by_operator"
    assert body["operator_paused"] == [paused] and "breaker_open" not in body
    health.set_degraded(["tripped: 62% ..."])  # a tripped breaker still is not ready
    assert health.readiness()[1]["state"] == "degraded" and not health.readiness()[0]


def test_endpoints_over_http() -> None:
    metrics = ConsumerMetrics()
    health = Health(Settings(), metrics)
    server = HealthServer(health, "127.0.0.1", 0).start()
    try:
        status, body = fetch(server.port, "/readyz")
        assert status == 503 and json.loads(body)["state"] == "starting"
        health.set_ready(True, "consuming")
        assert fetch(server.port, "/readyz")[0] == 200
        assert fetch(server.port, "/healthz")[0] == 200
        assert fetch(server.port, "/other")[0] == 404
        metrics.count(metrics.applied, [("crm.sales", "order")] * 3)
        metrics.set_lag({("crm.sales", 0): 7, ("crm.sales", 1): 0})
        metrics.set_lag({("crm.sales", 1): 2})  # partition 0 revoked: its series goes
        status, text = fetch(server.port, "/metrics")
        assert status == 200
        assert 'crm_erp_sync_events_applied_total{kind="order",topic="crm.sales"} 3.0' in text
        assert 'crm_erp_sync_consumer_lag{partition="1",topic="crm.sales"} 2.0' in text
        assert 'partition="0"' not in text
    finally:
        server.close()


def test_registries_are_per_process_object() -> None:
    first, second, producer = ConsumerMetrics(), ConsumerMetrics(), ProducerMetrics()
    first.applied.labels("t", "customer").inc()
    assert b"events_applied_total" in first.exposition()
    assert b'kind="customer"' not in second.exposition()
    assert b"events_published_total" not in first.exposition()
    assert b"slot_retained_wal_bytes" in producer.exposition()


def test_a_port_in_use_is_a_config_error_naming_the_setting_and_the_port() -> None:
    # newcomer9 F7: `unexpected_error OSError`, frames only: no port, no setting
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = dataclasses.replace(Settings(), http_host="127.0.0.1", http_port=port)
        with pytest.raises(ConfigError) as info:
            serve(settings, Health(settings, ConsumerMetrics()))
    assert info.value.variable == "CRM_ERP_SYNC_HTTP_PORT"
    assert info.value.problem.startswith(f"127.0.0.1:{port} is in use")


def test_an_address_not_of_this_machine_names_the_host_setting() -> None:
    settings = dataclasses.replace(Settings(), http_host="192.0.2.1", http_port=18080)
    with pytest.raises(ConfigError) as info:
        serve(settings, Health(settings, ConsumerMetrics()))
    assert info.value.variable == "CRM_ERP_SYNC_HTTP_HOST"


class _FailingHealth:
    """Answers /readyz as a probe that already gave up sees it (the write fails), and
    /healthz with a bug; /metrics works."""

    metrics = ConsumerMetrics()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        raise BrokenPipeError(32, "Broken pipe")

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("a row value 张三 138xxxx5678")


def test_a_request_that_fails_is_one_log_line_without_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    # newcomer9 F3: a probe that gave up left socketserver's 20-line traceback in the log
    server = HealthServer(cast(Health, _FailingHealth()), "127.0.0.1", 0).start()
    try:
        with structlog.testing.capture_logs() as logged:
            for path in ("/readyz", "/healthz"):
                # the server closes the connection once handle_error is done
                with pytest.raises((http.client.RemoteDisconnected, ConnectionError,
                                    urllib.error.URLError)):
                    fetch(server.port, path)
            assert fetch(server.port, "/metrics")[0] == 200  # still serving
    finally:
        server.close()
    assert [(r["event"], r["error"], r["log_level"]) for r in logged] == [
        ("http_client_gone", "BrokenPipeError", "info"),
        ("http_request_failed", "RuntimeError", "error")]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err and "张三" not in err
