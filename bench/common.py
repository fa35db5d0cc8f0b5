"""Shared by the benchmarks: a private set of databases and topics on the local stack,
latency percentiles, and a paced CRM load. CPU and memory from /proc: bench.proc."""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from service.settings import Settings
from service.setup import run_setup


@contextmanager
def bench_settings(**overrides: Any) -> Iterator[Settings]:
    base = Settings.from_env()
    tag = f"bench_{uuid.uuid4().hex[:8]}"
    admin = base.crm_dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "crm_{tag}"')
        conn.execute(f'CREATE DATABASE "erp_{tag}"')
    prefix = base.crm_dsn.rsplit("/", 1)[0]
    settings = dataclasses.replace(
        base, crm_dsn=f"{prefix}/crm_{tag}", erp_dsn=f"{prefix}/erp_{tag}",
        sales_topic=f"{tag}.sales", market_topic=f"{tag}.market", dlq_topic=f"{tag}.dlq",
        consumer_group=f"{tag}.erp", slot_name=f"slot_{tag}", publication_name=f"pub_{tag}",
        **overrides)
    run_setup(settings)
    try:
        yield settings
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND NOT active", (settings.slot_name,))
            conn.execute(f'DROP DATABASE IF EXISTS "crm_{tag}" WITH (FORCE)')
            conn.execute(f'DROP DATABASE IF EXISTS "erp_{tag}" WITH (FORCE)')
        from service.kafka_io import make_admin

        kafka_admin = make_admin(settings)
        try:
            kafka_admin.delete_topics([settings.sales_topic, settings.market_topic,
                                       settings.dlq_topic])
        finally:
            kafka_admin.close()


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct`-th percentile (an integer 1..99) of `values`, interpolated between the two
    nearest ranks (``statistics.quantiles``, inclusive: the sample is the population); NaN
    for no values. Raises ValueError for a pct outside 1..99."""
    if not 1 <= pct <= 99 or pct != int(pct):
        raise ValueError(f"percentile must be an integer from 1 to 99, not {pct}")
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


class PacedLoad:
    """`rate` CRM transactions a second for `seconds` (0: none), from one session per
    `per_session`/s (one session's round trips cap what it commits), each session on its own
    deadline schedule (transaction i is due at start + i / rate: sleeping never accumulates
    drift). A session that falls behind catches up (the machine's jitter must not lower the
    rate), but by at most `catch_up_s` worth: beyond that it carries on at the rate from
    where it is rather than sending a burst.

    `work(conn, n)` commits one transaction on an autocommit connection; n counts from 0 over
    all sessions. Used as: ``start()``, read ``committed`` and ``pids`` while it runs,
    ``join()``. The connections use asynchronous commit when `synchronous_commit` is False,
    as the demo loader's session does."""

    def __init__(self, dsn: str, rate: float, seconds: float,
                 work: Callable[[psycopg.Connection[Any], int], None], *,
                 synchronous_commit: bool = True, per_session: float = 250,
                 catch_up_s: float = 1.0) -> None:
        self.rate = rate
        self.seconds = seconds
        self.catch_up_s = catch_up_s
        self._work = work
        n = math.ceil(rate / per_session)  # none at rate 0: an idle phase
        self._conns = [psycopg.connect(dsn, autocommit=True) for _ in range(n)]
        if not synchronous_commit:
            for conn in self._conns:
                conn.execute("SET synchronous_commit TO off")
        self.pids = {c.info.backend_pid for c in self._conns}
        self._counts = [0] * n
        self._lock = threading.Lock()
        self._next = 0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.started = 0.0  # time.perf_counter() at start()

    @property
    def committed(self) -> int:
        return sum(self._counts)

    def start(self) -> None:
        self.started = time.perf_counter()
        self._threads = [threading.Thread(target=self._write, args=(w,), daemon=True)
                         for w in range(len(self._conns))]
        for t in self._threads:
            t.start()

    def _write(self, w: int) -> None:
        n = len(self._conns)
        interval = n / self.rate
        due = self.started + w * interval / n
        stop_at = self.started + self.seconds
        try:
            while due < stop_at:
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                elif due < now - self.catch_up_s:
                    due = now
                with self._lock:
                    i, self._next = self._next, self._next + 1
                self._work(self._conns[w], i)
                self._counts[w] += 1
                due += interval
        except BaseException as exc:  # re-raised by join(), in the caller's thread
            self._errors.append(exc)

    def join(self) -> None:
        """Wait for the sessions to finish, close them; re-raise a session's error."""
        for t in self._threads:
            t.join()
        for conn in self._conns:
            conn.close()
        if self._errors:
            raise self._errors[0]


# N synthetic customers in one statement (ids lo..hi): the benchmarks' unit of CRM change.
CUSTOMER_INSERT = (
    "INSERT INTO crm.customers (family_name, given_name, gender, phone, email, address, "
    "purchase_amount) SELECT '张', '三' || g, '男', '138' || lpad(g::text, 8, '0'), "
    "'u' || g || '@example.com', '北京市朝阳区建国路' || g || '号', 1000.00 "
    "FROM generate_series(%s::int, %s::int) g")


def load_arguments(description: str | None) -> argparse.Namespace:
    """--changes for the burst, --rate and --seconds for the fixed-rate latency run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    return parser.parse_args()
