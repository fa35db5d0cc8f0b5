"""Helpers for every integration test: the integration marker, the CLI run in-process with a
test's settings, and a producer and consumers run in threads."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from service import log, ops
from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.cli import main
from service.consumer.pipeline import ErpConsumer
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


_configure = log.configure


def _configure_on_real_stderr(*args: Any, **kwargs: Any) -> None:
    with contextlib.redirect_stderr(sys.__stderr__):
        _configure(*args, **kwargs)


class Cli:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                 ) -> None:
        self.monkeypatch = monkeypatch
        self.capsys = capsys

    def __call__(self, settings: Settings, *argv: str) -> Result:
        for name, value in settings_env(settings).items():
            self.monkeypatch.setenv(name, value)
        # main() configures logging onto the current (captured) stderr; it would outlive
        # this test and break the logging of later tests in the same process.
        self.monkeypatch.setattr("service.log.configure", _configure_on_real_stderr)
        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(monkeypatch, capsys)


class Running:
    """A producer and/or consumer running in threads until stopped."""

    def __init__(self) -> None:
        self.workers: list[tuple[Any, threading.Thread]] = []

    def start_producer(self, settings: Settings) -> CdcProducer:
        producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
        self._start(producer, lambda: producer.run())
        return producer

    def start_consumer(self, settings: Settings) -> ErpConsumer:
        consumer = ErpConsumer(settings)
        self._start(consumer, lambda: consumer.run())
        return consumer

    def _start(self, worker: Any, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.workers.append((worker, thread))

    def stop(self, worker: Any) -> None:
        for w, thread in list(self.workers):
            if w is worker:
                w.stop()
                thread.join(60)
                self.workers.remove((w, thread))

    def stop_all(self) -> None:
        for w, _ in list(self.workers):
            self.stop(w)


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    try:
        yield r
    finally:
        r.stop_all()


def capture_ready(sync_env: SyncEnv) -> bool:
    """The slot exists and the (empty) initial snapshot is done: what follows is the log's."""
    with sync_env.crm() as crm:
        slot = crm.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                           (sync_env.settings.slot_name,)).fetchone()
        pending = crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                              "WHERE state = 'pending'").fetchone()
    return slot is not None and pending == (0,)


def caught_up(sync_env: SyncEnv) -> None:
    """Wait until the pipeline applied everything the CRM committed so far (120 s deadline)."""
    lsn = ops.current_lsn(sync_env.settings)
    wait_until(lambda: ops.caught_up(sync_env.settings, lsn), timeout=120,
               message="pipeline caught up")
