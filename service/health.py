"""Health of a long-running process and its HTTP endpoints; the shutdown watchdog.

Every long-running command (``produce``, ``consume``) serves, on CRM_ERP_SYNC_HTTP_PORT
(0: none), from a daemon thread:

- ``/healthz`` alive: the main loop iterated within CRM_ERP_SYNC_LIVENESS_TIMEOUT_S. A stuck
  process (a hung query, a dead lock) fails it and is restarted by its supervisor.
- ``/readyz`` doing its job:
  - consume: connected to the group with partitions assigned, and not stalled (a transient
    failure, ERP or broker, has not kept it retrying for CRM_ERP_SYNC_READINESS_STALL_S, nor
    has one step of its loop been blocked that long: an ERP lock, a hung query),
    and not degraded (the dead-letter circuit breaker keeps a partition paused: 503 with
    state "degraded" and the breaker's messages, until `crm-erp-sync resume`; a partition an
    operator paused is still ready, state "paused_by_operator": planned), and a member
    of its group as the broker sees it (503 "outside_group" while it is not; it rejoins by
    itself, service/consumer/membership.py);
    Outside its apply window (CRM_ERP_SYNC_APPLY_WINDOW) a consumer is ready, with state
    "outside_apply_window" and the time it opens: it is in its group and waits by design;
  - both: not while a connection to the broker or a database is lost and being
    re-established (``state: reconnecting`` with the reason);
  - produce: the active producer holds the capture lock and is not stalled (as above); a
    standby that is connected to the CRM and waiting for the lock is ready too (it is doing
    what a standby must; were it "not ready", every rollout and node drain would wait on it
    forever). ``crm_erp_sync_producer_active`` tells the two apart.
- ``/metrics`` Prometheus text format, from the process's own registry.

The probes read state that the main loop writes (plain attribute stores); they never call
into the Kafka or database clients, which are not thread-safe.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.errors import ConfigError
from service.metrics import CONTENT_TYPE, ProcessMetrics
from service.settings import Settings


class Health:
    def __init__(self, settings: Settings, metrics: ProcessMetrics) -> None:
        self.metrics = metrics
        self.liveness_timeout_s = settings.liveness_timeout_s
        self.stall_s = settings.readiness_stall_s
        self._last_beat = time.monotonic()
        self._ready = False
        self._why = "starting"
        self._detail: dict[str, Any] = {}
        self._failing_since: float | None = None
        self._disconnected: str | None = None
        self._degraded: list[str] = []
        self._operator_paused: list[str] = []
        self._outside_group: str | None = None
        self._window_closed_until: Any = None
        self._window = ""

    def beat(self) -> None:
        """The main loop is alive (call once per iteration, and while waiting)."""
        self._last_beat = time.monotonic()
        self.metrics.last_loop.set(time.time())

    def set_ready(self, ready: bool, why: str, **detail: Any) -> None:
        self._ready, self._why, self._detail = ready, why, detail

    def set_degraded(self, reasons: list[str]) -> None:
        """Partitions paused by the circuit breaker (one message each); [] when none."""
        self._degraded = list(reasons)

    def set_operator_paused(self, reasons: list[str]) -> None:
        """Partitions an operator paused (`crm-erp-sync pause`; one message each). Still
        ready, like a closed apply window: a planned pause must not stall every rollout; the
        body lists them, and `status` names each until `resume`."""
        self._operator_paused = list(reasons)

    def set_membership(self, outside: str | None) -> None:
        """Why this consumer is outside its group (service/consumer/membership.py); None
        while it is a member. Outside: /readyz is 503 with state "outside_group"."""
        self._outside_group = outside

    def set_apply_window(self, closed_until: Any, window: str) -> None:
        """Outside the apply window (CRM_ERP_SYNC_APPLY_WINDOW) until ``closed_until`` (an
        aware datetime), or None while it is open. Closed is still ready: the consumer is in
        its group and waits by design (a 503 for hours would stall every rollout); the body
        says so, with the time it opens."""
        self._window_closed_until, self._window = closed_until, window

    def failing(self) -> None:
        """A transient failure: retrying. Stalled once it lasts readiness_stall_s."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def disconnected(self, reason: str) -> None:
        """A connection (broker, database) is lost and being re-established: not ready, at
        once, with ``reason`` (no values: the peer and the exception class)."""
        self.failing()
        self._disconnected = reason

    def recovered(self) -> None:
        self._failing_since = None
        self._disconnected = None

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._last_beat
        return age <= self.liveness_timeout_s, {"last_loop_s_ago": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        alive, body = self.liveness()
        body = {**body, **self._detail, "state": self._why}
        if self._disconnected is not None:
            body["state"] = "reconnecting"
            body["reason"] = self._disconnected
            if self._failing_since is not None:
                body["failing_for_s"] = round(time.monotonic() - self._failing_since, 3)
            return False, body
        if self._failing_since is not None:
            failing_s = time.monotonic() - self._failing_since
            body["failing_for_s"] = round(failing_s, 3)
            if failing_s > self.stall_s:
                body["state"] = "stalled"
                return False, body
        if body["last_loop_s_ago"] > self.stall_s:
            # one step has not returned for that long: a query waiting on an ERP lock, a hung
            # call (liveness fails later, at liveness_timeout_s, and restarts the process)
            body["state"] = "stalled"
            body["reason"] = "the main loop has not iterated (blocked in a call)"
            return False, body
        if self._outside_group is not None:
            body["state"] = "outside_group"
            body["outside_group"] = self._outside_group
            return False, body
        if self._degraded:
            body["state"] = "degraded"
            body["breaker_open"] = self._degraded
            return False, body
        if self._operator_paused:
            body["state"] = "paused_by_operator"
            body["operator_paused"] = self._operator_paused
        if self._window_closed_until is not None:
            body["state"] = "outside_apply_window"
            body["apply_window"] = self._window
            body["apply_window_opens_at"] = self._window_closed_until.isoformat()
        return alive and self._ready, body


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        health = self.server.health
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, health.metrics.exposition(), CONTENT_TYPE)
            return
        if path in ("/healthz", "/livez"):
            ok, body = health.liveness()
        elif path == "/readyz":
            ok, body = health.readiness()
        else:
            self._send(404, b'{"error": "not found"}\n', "application/json")
            return
        body["ok"] = ok
        self._send(200 if ok else 503, (json.dumps(body) + "\n").encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes every few seconds are not news; logs stay JSON


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: Health

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One JSON log line instead of socketserver's multi-line traceback on stderr
        (newcomer9 F3: a probe that gave up, its timeout shorter than our answer, left 20
        lines of ``BrokenPipeError`` in the JSON log). A client gone before the answer is
        routine (``http_client_gone``, info); anything else is named by its class alone
        (``http_request_failed``): never a traceback, a request line or a value."""
        import structlog

        error = sys.exc_info()[1]
        log = structlog.get_logger("http")
        if isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            log.info("http_client_gone", error=type(error).__name__)
        else:
            log.error("http_request_failed", error=type(error).__name__)


class HealthServer:
    """The endpoints, served from a daemon thread until close()."""

    def __init__(self, health: Health, host: str, port: int) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.health = health
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="crm-erp-sync-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(settings: Settings, health: Health) -> HealthServer | None:
    """Start the endpoints when CRM_ERP_SYNC_HTTP_PORT is set; None when it is 0.

    Raises ConfigError (exit 2) naming CRM_ERP_SYNC_HTTP_PORT when the port cannot be bound
    (in use, or below 1024 without the privilege), or CRM_ERP_SYNC_HTTP_HOST when the
    address is not this machine's (newcomer9 F7: it was an anonymous ``OSError``)."""
    if not settings.http_port:
        return None
    import errno

    import structlog

    host, port = settings.http_host, settings.http_port
    try:
        server = HealthServer(health, host, port).start()
    except OSError as exc:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(Settings.env_var("http_port"),
                              f"{where} is in use (another crm-erp-sync process, or another "
                              "program): choose a free port, or 0 for no HTTP "
                              "endpoints") from exc
        if exc.errno == errno.EACCES:
            raise ConfigError(Settings.env_var("http_port"),
                              f"{where}: permission denied (a port below 1024 needs "
                              "privileges): choose a port from 1024") from exc
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(
                exc, socket.gaierror):
            raise ConfigError(Settings.env_var("http_host"),
                              f"{host!r} is not an address of this machine "
                              f"({exc.strerror or type(exc).__name__})") from exc
        raise ConfigError(Settings.env_var("http_port"),
                          f"{where} cannot be served: {exc.strerror or type(exc).__name__}"
                          ) from exc
    structlog.get_logger("http").info("http_endpoints", host=settings.http_host,
                                      port=server.port)
    return server


SHUTDOWN_TIMEOUT_EXIT = 1


def start_shutdown_watchdog(timeout_s: float,
                            exit_code: int = SHUTDOWN_TIMEOUT_EXIT) -> threading.Timer:
    """After a stop request: exit the process, non-zero, if it has not exited by itself
    within timeout_s (CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S). Nothing is lost: uncommitted offsets
    are re-consumed and ERP positions make that harmless; the slot only moves past what the
    broker acknowledged."""

    def expire() -> None:
        line = {"event": "shutdown_timeout", "level": "error", "timeout_s": timeout_s,
                "exit_code": exit_code}
        print(json.dumps(line), file=sys.stderr, flush=True)
        os._exit(exit_code)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer
