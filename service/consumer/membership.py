"""Group membership that heals: notice when this consumer is outside its group, rejoin, and
say so (``/readyz``, ``crm_erp_sync_group_member``, ``sync.consumer_membership`` for ``status``).

Why this exists (issue #14 item 1). kafka-python 3.0 runs JoinGroup -> SyncGroup as a task on
its IO thread, but marks the member stable and re-enables its heartbeats only inside the next
``consumer.poll()``. When the application is busy between two polls just as a rebalance
completes (a long batch, an ERP query blocked on a lock), no heartbeat is sent for the new
generation and the broker removes the member after ``session_timeout_ms`` ("has failed,
removing it from the group"). Reproduced against the local broker
(tests/integration/consumer/test_membership.py: the loop blocked on an ERP row lock while a
rebalance completes). The Java client re-enables heartbeats when the SyncGroup response
arrives, so it does not have this window. In that reproduction kafka-python rejoined by
itself once the loop went on; but a client that believes it is a stable member while no
heartbeat reaches the broker (its heartbeat disabled or wedged) is removed and never notices:
it keeps fetching the partitions it thinks it owns, its commits fail
(``commit_failed_after_rebalance``), another member takes every partition and nothing tells
the operator: the symptom of issue #14. So this module does not trust the client's own
view: every ``membership_check_s`` it asks the broker (DescribeGroups, an admin client)
whether this member is in the group, and when it is not on two checks in a row, it leaves and
re-subscribes (``unsubscribe()`` + ``subscribe()``), which resets the client's group state and
makes the next poll join afresh.

The decision is the pure :func:`judge`, unit-tested; the effects are :class:`Membership`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from kafka.errors import KafkaError

from service.errors import Retryable
from service.health import Health
from service.metrics import ConsumerMetrics
from service.pg import PgConn
from service.settings import Settings

log = structlog.get_logger("consumer")

_instances = itertools.count()


def client_id() -> str:
    """A client id naming this process (host, pid, and a counter for a second consumer in
    one process), so that the broker's member list says which process is which."""
    n = next(_instances)
    return (f"crm-erp-sync-consumer-{socket.gethostname()}-{os.getpid()}"
            + (f"-{n}" if n else ""))


def mappings_version(path: Path) -> str:
    """The first 12 hex digits of the mappings file's SHA-256: which mappings a consumer
    applies with (two consumers with different mappings would write different ERP data)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "unreadable"


@dataclass(frozen=True)
class View:
    """One observation. ``broker_members``: the member ids the broker lists for the group
    (None: the broker could not be asked this time)."""

    member_id: str
    stable: bool  # the client believes it is a stable member
    broker_members: frozenset[str] | None
    now: float  # monotonic seconds


@dataclass
class Judgement:
    in_group: bool
    rejoin: bool  # leave and re-subscribe now
    why: str = ""


@dataclass
class MembershipState:
    out_since: float | None = None  # monotonic; None while in the group
    out_checks: int = 0  # consecutive observations outside the group
    last_rejoin: float = float("-inf")
    unstable_since: float | None = None


def judge(state: MembershipState, view: View, *, patience_s: float,
          min_checks: int = 2) -> Judgement:
    """Is this consumer in its group, and must it rejoin now? Updates ``state``.

    Out of the group when the broker does not list our member id (authoritative), or when
    the client has not been a stable member for ``patience_s`` (a join that never
    completes). A rejoin is asked after ``min_checks`` consecutive broker observations
    outside the group (one could race a join that just completed), or once the client has
    been unstable for ``patience_s``; and then at most once per ``patience_s`` (a rejoin
    takes a rebalance)."""
    if view.stable:
        state.unstable_since = None
    elif state.unstable_since is None:
        state.unstable_since = view.now
    unstable_for = 0.0 if state.unstable_since is None else view.now - state.unstable_since
    if not view.member_id:  # not joined yet (starting, or after a rejoin): not "removed"
        rejoin = unstable_for >= patience_s and view.now - state.last_rejoin >= patience_s
        if rejoin:
            state.last_rejoin = view.now
        if state.out_since is None:
            state.out_since = view.now
        return Judgement(False, rejoin, f"not joined for {unstable_for:.0f}s" if rejoin
                         else "joining")
    listed = (None if view.broker_members is None
              else view.member_id in view.broker_members)
    if listed is None and state.out_since is None and unstable_for < patience_s:
        return Judgement(True, False)  # nothing new to go on
    if listed and view.stable:
        state.out_since, state.out_checks = None, 0
        return Judgement(True, False)
    if listed is False:
        state.out_checks += 1
        why = "the broker does not list this member in the group"
    elif unstable_for >= patience_s:
        why = f"not a stable group member for {unstable_for:.0f}s"
    elif listed and not view.stable:
        # Listed by the broker but rebalancing locally: a join in progress.
        return Judgement(state.out_since is None, False, "rebalancing")
    else:
        why = "outside the group"
    if state.out_since is None:
        state.out_since = view.now
    due = (state.out_checks >= min_checks or unstable_for >= patience_s)
    rejoin = due and view.now - state.last_rejoin >= patience_s
    if rejoin:
        state.last_rejoin = view.now
        state.out_checks = 0
    return Judgement(False, rejoin, why)


@dataclass
class Membership:
    """Checks and heals this consumer's group membership; reports it in
    ``sync.consumer_membership``.

    ``check(consumer)`` is called once per loop iteration; it asks the broker at most every
    ``settings.membership_check_s``. Raises Retryable when the ERP report cannot be written.
    """

    settings: Settings
    metrics: ConsumerMetrics
    health: Health
    connect: Any  # () -> PgConn, the applier's connection
    client_id: str = field(default_factory=client_id)
    state: MembershipState = field(default_factory=MembershipState)
    rejoins: int = 0
    in_group: bool = False
    # Set by the consumer: until when its apply window is closed (None: applying); reported
    # so that `status` tells what the consumers do, not what its own clock thinks.
    apply_window_closed_until: datetime | None = None
    _admin: Any = None
    _last_check: float = float("-inf")
    _out_since_wall: float | None = None
    _started: float = field(default_factory=time.time)

    @property
    def topics(self) -> list[str]:
        return [self.settings.sales_topic, self.settings.market_topic]

    def check(self, consumer: Any, *, force: bool = False) -> Judgement | None:
        now = time.monotonic()
        if not force and now - self._last_check < self.settings.membership_check_s:
            return None
        self._last_check = now
        meta = consumer.group_metadata()
        stable = "stable" in str(getattr(meta, "state", "")).lower()
        view = View(meta.member_id or "", stable, self._broker_members(), now)
        verdict = judge(self.state, view, patience_s=self._patience_s())
        self._publish(verdict)
        if verdict.rejoin:
            self.rejoins += 1
            self.metrics.group_rejoins.inc()
            log.warning("rejoining_consumer_group", group=self.settings.consumer_group,
                        member_id=meta.member_id or None, why=verdict.why,
                        client_id=self.client_id)
            try:
                consumer.unsubscribe()  # leaves the group if the client thinks it is in it
            except KafkaError as exc:
                log.warning("leave_group_failed", error=type(exc).__name__)
            consumer.subscribe(self.topics)
        self._report(consumer, meta.member_id or "")
        return verdict

    def _patience_s(self) -> float:
        # A healthy rebalance of this group completes well within two session timeouts.
        return max(2 * self.settings.membership_check_s, 20.0)

    def _broker_members(self) -> frozenset[str] | None:
        from service.kafka_io import make_admin

        try:
            if self._admin is None:
                self._admin = make_admin(self.settings)
            group = self.settings.consumer_group
            desc = self._admin.describe_groups([group]).get(group, {})
            return frozenset(m["member_id"] for m in desc.get("members", []))
        except Exception as exc:
            log.info("group_describe_failed", error=type(exc).__name__)
            return None

    def _publish(self, verdict: Judgement) -> None:
        was = self.in_group
        self.in_group = verdict.in_group
        self.metrics.group_member.set(1 if verdict.in_group else 0)
        if verdict.in_group:
            self._out_since_wall = None
            self.health.set_membership(None)
            if not was and self.rejoins:
                log.warning("consumer_group_rejoined", group=self.settings.consumer_group,
                            rejoins=self.rejoins)
        else:
            if self._out_since_wall is None:
                self._out_since_wall = time.time()
                if was:  # joining at start-up is not news
                    log.error("outside_consumer_group", group=self.settings.consumer_group,
                              why=verdict.why, client_id=self.client_id)
            self.health.set_membership(f"not a member of consumer group "
                                       f"{self.settings.consumer_group}: {verdict.why}")

    def _report(self, consumer: Any, member_id: str) -> None:
        assigned = sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment() or ())
        try:
            conn = self.connect()
            with conn.transaction():
                upsert(conn, self.settings.consumer_group, self.client_id, member_id,
                       self.in_group, self._out_since_wall, assigned,
                       mappings_version(self.settings.mappings_file), self._started,
                       self.rejoins)
                try:
                    with conn.transaction():
                        conn.execute("UPDATE sync.consumer_membership SET "
                                     "apply_window_closed_until = %s WHERE consumer_group = %s "
                                     "AND client_id = %s",
                                     (self.apply_window_closed_until,
                                      self.settings.consumer_group, self.client_id))
                except psycopg.errors.UndefinedColumn:
                    log.warning("no_apply_window_column",
                                hint="run `crm-erp-sync setup` (idempotent)")
        except psycopg.errors.UndefinedTable:
            log.warning("no_consumers_table", hint="run `crm-erp-sync setup` (idempotent)")
        except psycopg.OperationalError as exc:
            raise Retryable(f"ERP: reporting group membership: {type(exc).__name__}") from exc

    def close(self) -> None:
        """On a clean stop: the report row goes (status no longer expects this consumer)."""
        try:
            conn = self.connect()
            with conn.transaction():
                mark_stopped(conn, self.settings.consumer_group, self.client_id)
        except (Retryable, psycopg.Error):
            pass  # the row ages out: status only counts consumers seen recently
        if self._admin is not None:
            with contextlib.suppress(KafkaError):
                self._admin.close()
            self._admin = None


def upsert(conn: PgConn, group: str, client: str, member_id: str, in_group: bool,
           out_since: float | None, assigned: list[str], mappings: str, started: float,
           rejoins: int) -> None:
    conn.execute(
        "INSERT INTO sync.consumer_membership (consumer_group, client_id, host, pid, member_id, "
        "in_group, out_since, assigned, mappings_version, started_at, last_seen, rejoins) "
        "VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, to_timestamp(%s), "
        "clock_timestamp(), %s) ON CONFLICT (consumer_group, client_id) DO UPDATE SET "
        "member_id = EXCLUDED.member_id, in_group = EXCLUDED.in_group, "
        "out_since = EXCLUDED.out_since, assigned = EXCLUDED.assigned, "
        "mappings_version = EXCLUDED.mappings_version, last_seen = EXCLUDED.last_seen, "
        "rejoins = EXCLUDED.rejoins",
        (group, client, socket.gethostname(), os.getpid(), member_id, in_group, out_since,
         assigned, mappings, started, rejoins))


def mark_stopped(conn: PgConn, group: str, client: str) -> None:
    """A consumer that stops cleanly removes its row (status then does not expect it)."""
    conn.execute("DELETE FROM sync.consumer_membership WHERE consumer_group = %s "
                 "AND client_id = %s", (group, client))
