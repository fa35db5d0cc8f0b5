"""`crm-erp-sync status`: is the sync healthy, and if not, what needs attention.

Needs attention (exit 1) when any of:
- a dead letter is unresolved (open or failed again);
- events were deleted from a topic before the group applied them (retention, delete-records:
  ``sync.offset_gaps``, recorded by the consumer that found its position below the log start):
  topic, partition and offsets are named with the fix, until a reconcile over every entity
  finds the ERP matching (``service.consumer.gaps``);
- capture stopped because the slot or the publication was dropped, replaced or lost
  (``service.cdc.slot_guard``: until `crm-erp-sync resync` ran, and until its delete pass ran);
- the producer's replication slot is missing, or no producer holds the capture lock (the
  producer reads its slot in short SQL calls, so "slot active" is not a liveness signal; the
  advisory lock every active producer holds is);
- the producer holding the capture lock is hung: the lock's session has not run a query for
  ``producer_silent_after_s`` (an active producer runs one there every second; a frozen or
  blocked one keeps the lock through its idle session, so no standby takes over);
- an event has been held longer than ``orphan_hold_s`` (awaiting its customer), or events are
  held behind a key that has no unresolved dead letter (stuck);
- the dead-letter circuit breaker keeps a partition paused (``sync.breaker_trips``);
- the group's total lag exceeds ``--max-lag`` (default 10000 events);
- a consumer that reported itself recently (``sync.consumer_membership``) is not a member of
  the group as the broker lists it: said as what is known (``outside_group_line``): its last
  report's age, "stopped or stuck" once it missed a report, "no longer runs" when its pid is
  gone on this host (a running one rejoins by itself; if it stays out, look at it);
- a member the broker lists has not reported from its loop (``sync.consumer_membership``) for
  max(30 s, 3 x membership_check_s): blocked in a call (an ERP lock, a hung query) while
  kafka-python's heartbeat thread keeps it in the group, so nobody applies its partitions,
  even with healthy members beside it (``silent_member_line``);
- events are waiting (lag) but the group has no member, or the broker lists members but none
  has reported from its loop for ``STALE_AFTER_S`` (a consumer blocked in a call: an ERP lock,
  a hung query);
- capture is stopped because a captured table breaks the source contract (a mapped column
  renamed, dropped or retyped, replica identity not FULL): the producer records it in
  ``crm_erp_sync.contract_violations`` (table, column, problem, the SQL that fixes it);
- a CRM transaction holding an xid has been open longer than ``pinning_xact_max_s``
  (``CRM_ERP_SYNC_PINNING_XACT_MAX_S``, 600): the slot cannot confirm past it, so the CRM
  keeps its WAL (pid, age and state are shown, never the query text);
- the slot is still being created ``SLOT_CREATING_MAX_S`` (10 s) after its creation began (its
  confirmed_flush_lsn is NULL until every transaction open at that moment, in any database of
  the cluster, has ended): the producer captures nothing meanwhile; the oldest transaction is
  named;
- the slot retains more than ``retained_wal_max_bytes`` of WAL (1 GiB);
- the slot is about to lose WAL: its ``wal_status`` is 'unreserved' (the CRM removes the WAL
  it needs at the next checkpoint), or its ``safe_wal_size`` is under
  ``service.ops.SAFE_WAL_MIN_SHARE`` (20%) of max_slot_wal_keep_size (``slot_wal_danger``);
- on the SQL transport, the producer's last peek took longer than ``sql_peek_max_s`` (0.2 s):
  each one re-decodes the retained WAL (it backs off, but capture slows down with it);
- a captured table was dropped and created again (the producer saw a new OID under its name,
  ``crm_erp_sync.captured_tables``): it was re-snapshotted, but the rows dropped with the old
  table left no delete events and stay live in the ERP; named with `crm-erp-sync reconcile
  --repair --entity ENTITY` until a reconcile of that entity finished after the re-creation
  with no extra ERP row (``sync.reconcile_runs``); the same for a table the producer (or
  `setup`) put back into the publication or whose row filter it narrowed (deletes made
  while it was out were never decoded);
- capture is stopped before a TRUNCATE of a captured CRM table (CRM_ERP_SYNC_ON_TRUNCATE=stop):
  the table and the setting to change are named; propagated and skipped truncates are
  reported (count and the last one) without needing attention;
- a running consumer refused the mappings file on its disk (it keeps the older version), or
  the running consumers apply different mappings versions (``sync.consumers``);
- the ERP lacks a table or column of this version (``ErpTarget.not_set_up``: an ERP set up
  before ``erp.sales_orders.total_amount`` existed): consumers refuse to start (exit 2) until
  `crm-erp-sync setup` adds it; said as the reason when events wait and no consumer runs;
- a topic setting (sales, market demand, dead letters) names no topic on the broker (a typo,
  or a topic deleted): the variable, the topic and `crm-erp-sync setup` are named;
- this process's source profile or mappings file is invalid (read by the loaders `produce`,
  `consume` and `config` use; the file and key are named): a producer or consumer started
  with it would refuse to start.
- the broker does not answer within ``BROKER_CHECK_S``: lag and members are unknown (one
  line says so), everything from the databases is still collected; the CLI exits 3
  (UNAVAILABLE: a part could not be checked) rather than 1.
- the CRM database does not answer: the slot, the producer, pending snapshots, CRM
  transactions, truncates and the source contract are unknown (one line says so), the ERP's,
  the broker's and the group's parts are still collected; exit 3 likewise.
Lag alone below that is normal under load and is only reported. Outside the apply window
(CRM_ERP_SYNC_APPLY_WINDOW, read from this process's settings: give `status` the consumers'
configuration) the consumers pause by design: status says "outside apply window until ...",
and neither the lag nor events awaiting their customer count as stuck meanwhile.

Capture dead letters (stage capture: a CRM change the producer could not make an event) are
listed one by one (table, key, reason) apart from the letters of the apply path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from kafka.errors import KafkaError

from service.cdc import slot_guard
from service.cdc.capture import (
    CONTRACT_TABLE,
    OWN_SCHEMA,
    TRUNCATES_TABLE,
    UNPUBLISHED,
    recreated_tables,
)
from service.cdc.producer import LOCK_CHECK_S, lock_key
from service.cdc.profile import load_profile
from service.consumer import gaps
from service.consumer.mappings_watch import STALE_AFTER_S, live_members
from service.consumer.pipeline import STILL_BLOCKED
from service.erp.mappings import Mappings
from service.erp.target import make_target
from service.errors import BrokerUnreachable, ConfigError, StackUnavailable
from service.kafka_io import make_admin, missing_topics
from service.operator.breaker import BreakerTrip, open_trips
from service.operator.common import BROKER_CHECK_S as BROKER_CHECK_S  # documented here
from service.operator.common import broker_consumer, connect
from service.operator.reconcile import ENTITIES, entity_of_table
from service.operator.render import when
from service.ops import (
    PartitionLag,
    capture_costs,
    group_lag,
    oldest_transaction,
    slot_state,
    slot_wal_danger,
)
from service.settings import Settings

# A slot takes milliseconds to create unless a transaction is open somewhere in the CRM's
# cluster; still being created after this many seconds means the producer is blocked on one.
SLOT_CREATING_MAX_S = 10.0
# A peek report older than this is from a producer that stopped (or switched transport).
PEEK_REPORT_STALE_S = 60.0
CAPTURE_SHOWN = 20


@dataclass(frozen=True)
class Member:
    """A consumer of the group: as the broker lists it and/or as it reports itself."""

    client_id: str
    host: str
    partitions: list[str]
    member_id: str
    in_group: bool  # listed by the broker
    pid: int | None = None
    last_seen_s: float | None = None  # seconds since its last report (sync.consumer_membership)
    out_since: datetime | None = None
    mappings_version: str | None = None
    rejoins: int = 0
    # What its own last report said (None: no report): True while it believed itself a
    # member, so a broker that no longer lists it means it stopped reporting, not that it
    # "reported" being out (a SIGSTOPped consumer: the broker drops it after its session).
    reported_in_group: bool | None = None


@dataclass
class Status:
    lag: list[PartitionLag]
    slot: dict[str, Any] | None
    pending_snapshots: list[dict[str, Any]]
    dead_letters: dict[str, int]  # error class -> unresolved count
    held: dict[str, dict[str, Any]]  # reason -> {count, oldest_held_at, oldest_age_s}
    stuck_keys: int
    producer_running: bool
    # ErpTarget.last_applied, read through the configured target (the sql target's erp.*
    # rows, the tryton target's tryton_positions): applied_at, crm_commit_time,
    # seconds_since_last_apply, end_to_end_delay_s (None until the first change)
    last_applied: dict[str, Any]
    breaker: list[BreakerTrip] = field(default_factory=list)  # partitions paused
    members: list[Member] = field(default_factory=list)
    # (error class, CRM field or "", unresolved count): a MappingError names its field.
    dead_letters_by_field: list[tuple[str, str, int]] = field(default_factory=list)
    # The oldest CRM transaction holding an xid (it pins the slot): pid, state, age_s.
    oldest_transaction: dict[str, Any] | None = None
    # The SQL transport's last peek: peek_s, backoff_s, reported_s_ago (None: streaming).
    peek: dict[str, float] | None = None
    paused: list[dict[str, Any]] = field(default_factory=list)  # operator pauses
    # Running consumers and the mappings version each applies (mappings_watch.live_members).
    consumers: list[dict[str, Any]] = field(default_factory=list)
    # Why capture is stopped (source contract): table, column, problem, fix, since.
    contract_violations: list[dict[str, Any]] = field(default_factory=list)
    # Unresolved capture dead letters, oldest first (at most CAPTURE_SHOWN): dead_letter_id,
    # table, key (the CRM row's), error_class, reason, created_at; and how many in all.
    capture_letters: list[dict[str, Any]] = field(default_factory=list)
    capture_letters_total: int = 0
    # CRM_ERP_SYNC_APPLY_WINDOW: {"window", "open", "until"} (None: always applying).
    apply_window: dict[str, Any] | None = None
    # capture stopped for a dropped, replaced or lost slot or publication (until `resync`)
    capture_stopped: bool = False
    # CRM TRUNCATEs the producer met (crm_erp_sync.truncates): "stopped" (rows capture waits
    # before), "propagated" and "skipped" (counts), "last" (the newest handled one), and
    # "applied" (sync.truncations in the ERP: per entity, truncates applied, rows marked)
    truncates: dict[str, Any] = field(default_factory=dict)
    # Captured tables dropped and re-created whose entity no reconcile has checked since:
    # table, recreated_at, entity (the reconcile entity; None: the profile is unreadable).
    recreated_tables: list[dict[str, Any]] = field(default_factory=list)
    # Offsets deleted from Kafka before the group applied them (service/consumer/gaps.py),
    # unresolved: topic, partition, first_lost, next_kept, count, detected_at.
    offset_gaps: list[dict[str, Any]] = field(default_factory=list)
    # The session holding the capture lock (``lock_holder``: pid, application_name, client,
    # backend_start, state, wait_event_type, wait_event, silent_s) and whether it has been
    # silent past ``producer_silent_after_s`` (a frozen or blocked producer); None: no holder.
    producer: dict[str, Any] | None = None
    producer_hung: bool = False
    attention: list[str] = field(default_factory=list)
    # Why the broker could not be asked (None: it answered): lag and members are then unknown
    # (lag [] and members []), everything from the databases is still there.
    broker_unreachable: str | None = None
    # Why the CRM database could not be asked (None: it answered): the slot, the producer,
    # pending snapshots, CRM transactions, truncates and the source contract are then
    # unknown (None / empty); the ERP's, the broker's and the group's parts are still there.
    crm_unreachable: str | None = None
    # Why consumers refuse to start on this ERP (ErpTarget.not_set_up: a table or column
    # `setup` adds is missing), None when nothing is.
    erp_not_set_up: str | None = None

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.lag)


def broker_members(settings: Settings) -> list[dict[str, Any]]:
    """The group's members as the broker lists them: member_id, client_id, host,
    partitions ("topic[p]")."""
    admin = make_admin(settings)
    try:
        group = settings.consumer_group
        desc = admin.describe_groups([group]).get(group, {})
    finally:
        admin.close()
    out = []
    for m in desc.get("members", []):
        assignment = m.get("member_assignment") or {}
        parts = [f"{a['topic']}[{p}]" for a in assignment.get("assigned_partitions", [])
                 for p in a["partitions"]] if isinstance(assignment, dict) else []
        out.append({"member_id": m["member_id"], "client_id": m["client_id"],
                    "host": str(m["client_host"]).lstrip("/"), "partitions": sorted(parts)})
    return out


class _DropKafkaRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("kafka")


@contextlib.contextmanager
def quiet_kafka() -> Iterator[None]:
    """kafka-python's own log records kept off the root logger's handlers meanwhile. Its
    client logs every refused connection and bootstrap retry (about 25 lines in 30 s);
    `status` says in one line that the broker is unreachable, so those lines are noise on
    an operator's terminal. Other libraries' records still pass."""
    handlers = list(logging.getLogger().handlers)
    quiet = _DropKafkaRecords()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def broker_view(settings: Settings) -> tuple[list[PartitionLag], list[dict[str, Any]],
                                             str | None, list[str]]:
    """The group's lag and members as the broker lists them, and one line per topic setting
    (sales, market demand, dead letters) that names no topic on the broker
    (``kafka_io.missing_topics``: a typo or a deleted topic, which would otherwise show only
    as a missing row); or ([], [], why, []) when no broker answers within ``BROKER_CHECK_S``
    (a probe consumer bounds kafka-python's bootstrap wait; the calls after it are made only
    to a broker that answered)."""
    unknown = "lag and group members unknown"
    with quiet_kafka():
        try:
            probe = broker_consumer(settings, unknown, group_id=None,
                                    client_id="crm-erp-sync-status")
        except BrokerUnreachable as exc:
            return [], [], str(exc), []
        try:
            missing = [f"{variable}: {problem}; a consumer refuses to start with it (exit 2)"
                       for variable, problem in missing_topics(settings, probe.topics())]
        except KafkaError as exc:
            return [], [], (f"broker {settings.kafka_bootstrap} did not answer "
                            f"({type(exc).__name__}): {unknown}"), []
        finally:
            probe.close()
        try:
            return (group_lag(settings, log_start=True), broker_members(settings), None,
                    missing)
        except StackUnavailable as exc:  # it answered the probe, then failed a call
            return [], [], f"{exc}: {unknown}", missing
        except KafkaError as exc:
            return [], [], (f"broker {settings.kafka_bootstrap} did not answer "
                            f"({type(exc).__name__}): {unknown}"), missing


def merge_members(listed: list[dict[str, Any]], reported: list[dict[str, Any]],
                  alive_s: float) -> list[Member]:
    """The broker's members beside the consumers' own reports. A report younger than
    ``alive_s`` whose member id the broker does not list is a live consumer outside the
    group; an older one is a process that is gone (ignored)."""
    by_member = {r["member_id"]: r for r in reported if r["member_id"]}
    out: list[Member] = []
    for m in listed:
        r = by_member.get(m["member_id"]) or {}
        out.append(Member(m["client_id"], m["host"], m["partitions"], m["member_id"], True,
                          r.get("pid"), r.get("age_s"), None, r.get("mappings_version"),
                          r.get("rejoins", 0), r.get("in_group")))
    seen = {m["member_id"] for m in listed}
    for r in reported:
        if r["member_id"] in seen or r["age_s"] > alive_s:
            continue
        out.append(Member(r["client_id"], r["host"], list(r["assigned"]), r["member_id"],
                          False, r["pid"], r["age_s"], r["out_since"], r["mappings_version"],
                          r["rejoins"], r["in_group"]))
    return out


def pid_gone_here(host: str, pid: int | None) -> bool:
    """True when ``host`` is this host (the consumer reports ``socket.gethostname()``; in a
    container or pod the hostname is its own, so a pid is only looked at in the namespace
    it was reported from) and no process ``pid`` runs: the consumer is dead. False when
    unknown (another host, no pid) or alive."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def outside_group_line(m: Member, group: str, check_s: float, *, pid_gone: bool) -> str:
    """Status's line for a consumer whose own recent report (``m.last_seen_s`` seconds ago)
    names a member id the broker does not list. Only what is known is said: a consumer
    reports every ``check_s`` seconds, so one that missed a report is stopped (a SIGKILL
    leaves its last report behind for ``merge_members``' ``alive_s``) or stuck, not
    "running"; ``pid_gone`` (see pid_gone_here) makes it certain."""
    who = f"consumer {m.client_id} (host {m.host}, pid {m.pid})"
    since = f" since {when(m.out_since)}" if m.out_since else ""
    age = m.last_seen_s or 0.0
    if pid_gone:
        return (f"{who} is NOT in group {group} and no longer runs (pid {m.pid} is gone on "
                f"this host; last report {age:.0f}s ago): it stopped (killed or crashed); the "
                "broker hands its partitions to the other members once its session times "
                "out: restart it if it should run")
    if age > 2 * check_s:
        return (f"{who} is NOT in group {group}{since} and not seen for {age:.0f}s (it "
                f"reports every {check_s:g}s): stopped or stuck; look at its log and "
                "restart it")
    if m.reported_in_group:
        return (f"{who} is NOT in group {group} as the broker lists it, but its last report "
                f"({age:.0f}s ago; it reports every {check_s:g}s) said it was: it has "
                "stopped reporting (stopped, frozen or blocked in a call) or the broker just "
                "dropped it; if this stays, look at its /readyz and log and restart it")
    return (f"{who} reported {age:.0f}s ago that it is NOT in group {group}{since} "
            f"({m.rejoins} rejoin(s) so far; a running consumer rejoins by itself: if it "
            "stays out, look at its log and restart it)")


def silent_member_line(m: Member, group: str, alive_s: float, check_s: float,
                       lag: dict[str, int]) -> str:
    """Status's line for a member the broker lists whose own loop has not reported for
    ``m.last_seen_s`` > ``alive_s`` seconds (it reports every ``check_s`` from its loop,
    between batches; kafka-python's heartbeat thread keeps a blocked one in the group, so
    its partitions stay assigned to it and are applied by nobody). ``lag`` maps
    "topic[p]" to the events waiting there (from the broker's offsets: a blocked consumer
    cannot publish its own lag gauge)."""
    parts = ", ".join(f"{p} (lag {lag[p]})" if p in lag else p for p in m.partitions) or \
        "no partitions"
    return (f"consumer {m.client_id} (host {m.host}, pid {m.pid if m.pid is not None else '-'})"
            f" is in group {group} but has not reported from its loop for "
            f"{_age(m.last_seen_s or 0.0)} (over {alive_s:g}s; it reports every {check_s:g}s)"
            f": nobody applies its partitions meanwhile: {parts}. It is blocked in a call "
            "(an ERP lock: look for a wait in the ERP's pg_stat_activity; a hung query), "
            "retrying a failing one (its log says which), or the process is frozen: look at "
            "its /readyz (stalled, reconnecting) and its log")


def unreached_gap_line(p: PartitionLag, group: str) -> str:
    """Status's line for a partition whose log start is past the group's position, before a
    consumer reached it and recorded the gap (newcomer10: a stopped or paused group's lag
    counted events that no longer exist, and nothing said so)."""
    first = p.committed or 0
    had = (f"its committed offset {first}" if p.committed is not None
           else "no position (a new group, or one that never applied an event there)")
    return (f"events deleted from Kafka before group {group} applied them: "
            f"{p.topic}[{p.partition}] offsets {first}..{p.start - 1} "
            f"({p.deleted_unapplied} offset(s); the log starts at {p.start}, the group has "
            f"{had}); no consumer has reached the partition since (stopped or paused): the "
            f"one that does records the gap and goes on; then run `{gaps.FIX}`")


def producer_silent_after_s(settings: Settings) -> float:
    """Seconds the capture lock's session may go without a query before `status` calls the
    producer holding it hung. The active producer runs ``SELECT 1`` on that session every
    ``LOCK_CHECK_S`` (1 s) in each turn of its loop (every ``BLOCKED_POLL_S`` while capture
    is stopped, at least every 15 s while the source contract is broken); its longest turn
    that is not a hang waits for the broker's acknowledgements, bounded by 6 x
    ``heartbeat_interval_s`` (``CdcProducer._flush``). A reconnect opens a new session
    (fresh). At least 30 s, the consumers' own bound."""
    return max(30.0, 6 * settings.heartbeat_interval_s + LOCK_CHECK_S)


def hung_producer_line(holder: dict[str, Any], slot_name: str, slot_active: bool | None,
                       bound_s: float) -> str:
    """Status's line for a capture lock held by a session silent for ``holder["silent_s"]``
    > ``bound_s`` seconds (``producer_silent_after_s``): the process holding it is frozen or
    blocked, captures nothing, and its session keeps a standby from taking over."""
    client = holder.get("client") or "local socket"
    app = f", application {holder['application_name']!r}" if holder.get("application_name") \
        else ""
    wait = (f", waiting on {holder['wait_event_type']}/{holder['wait_event']}"
            if holder.get("wait_event") and holder.get("state") != "idle" else "")
    reader = ("" if slot_active is None else
              f"; slot {slot_name} has {'an' if slot_active else 'no'} active reader")
    return (f"the producer holding the capture lock of slot {slot_name} (CRM backend pid "
            f"{holder['pid']}, client {client}{app}, connected {when(holder['backend_start'])})"
            f" has not used its session for {_age(holder['silent_s'])} ({holder['state']}"
            f"{wait}; an active producer does every second; over {bound_s:g}s): it is frozen "
            f"or blocked and captures nothing{reader}; CRM changes wait in the slot and a "
            "standby cannot take over while that session holds the lock. Look at that "
            "process (its /readyz, its log); if it does not recover, kill it (or SELECT "
            f"pg_terminate_backend({holder['pid']}) in the CRM) so a standby takes over")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _crm_unreachable(exc: Exception) -> str:
    """Status's line for a CRM database that did not answer: the typed error's text (it
    names the host and port, never the password), then what is therefore unknown."""
    why = (str(exc) if isinstance(exc, StackUnavailable)
           else f"CRM database unreachable ({type(exc).__name__})")
    return f"{why}: replication slot, producer, pending snapshots and capture state unknown"


def contract_violations(settings: Settings) -> list[dict[str, Any]]:
    """What stops capture now, as the producer recorded it: table, column ("*": the table),
    problem, fix, since. [] when capture is not stopped (or no producer recorded anything)."""
    try:
        with connect(settings, "crm") as crm:
            rows = crm.execute(
                f"SELECT table_name, column_name, problem, fix, since FROM {CONTRACT_TABLE} "
                "WHERE slot_name = %s AND resolved_at IS NULL ORDER BY since, table_name, "
                "column_name", (settings.slot_name,)).fetchall()
    except psycopg.errors.UndefinedTable:  # a producer older than the table
        return []
    except psycopg.OperationalError as exc:
        raise StackUnavailable(f"CRM database unreachable: {type(exc).__name__}") from exc
    return [dict(zip(("table", "column", "problem", "fix", "since"), r, strict=True))
            for r in rows]


def _crm_truncates(settings: Settings) -> dict[str, Any]:
    """What became of the CRM truncates the producer met (crm_erp_sync.truncates)."""
    out: dict[str, Any] = {"stopped": [], "propagated": 0, "skipped": 0, "last": None}
    names = ("table", "commit_lsn", "xid", "commit_time", "outcome", "setting", "seen_at")
    try:
        with connect(settings, "crm") as crm:
            rows = [dict(zip(names, r, strict=True)) for r in crm.execute(
                f"SELECT table_name, commit_lsn::text, xid, commit_time, outcome, setting, "
                f"seen_at FROM {TRUNCATES_TABLE} ORDER BY commit_lsn, table_name").fetchall()]
    except psycopg.errors.UndefinedTable:  # no producer has run this version yet
        return out
    except psycopg.OperationalError as exc:
        raise StackUnavailable(f"CRM database unreachable: {type(exc).__name__}") from exc
    for row in rows:
        if row["outcome"] == "stopped":
            out["stopped"].append(row)
        else:
            out[row["outcome"]] += 1
            out["last"] = row
    return out


def _recreated(settings: Settings) -> list[dict[str, Any]]:
    """The captured tables the producer saw dropped and re-created (see CAPTURED_TABLES),
    each with its reconcile entity (None: the profile unreadable or no such entity)."""
    try:
        with connect(settings, "crm") as crm:
            rows = recreated_tables(crm, settings.slot_name)
    except psycopg.errors.UndefinedTable:  # no producer of this version has run yet
        return []
    except psycopg.OperationalError as exc:
        raise StackUnavailable(f"CRM database unreachable: {type(exc).__name__}") from exc
    if not rows:
        return []
    try:
        profile = load_profile(settings.source_profile)
    except ConfigError:  # named under NEEDS ATTENTION by config_file_problems
        profile = None
    for row in rows:
        row["entity"] = None if profile is None else entity_of_table(profile, row["table"])
    # A table that feeds no entity (products: references only) leaves no ERP rows of its own.
    return [r for r in rows if profile is None or r["entity"] is not None]


def unchecked_recreations(recreated: list[dict[str, Any]],
                          runs: list[tuple[datetime, list[str], dict[str, Any]]]
                          ) -> list[dict[str, Any]]:
    """The re-created tables (``_recreated``) no reconcile has cleared: a run (``runs``:
    ``sync.reconcile_runs``' finished_at, entities, counts) that finished after the
    re-creation, checked the table's entity and left no extra ERP row of it (after a repair:
    what remained). A table whose entity is unknown (the profile unreadable) is kept."""
    def cleared(row: dict[str, Any]) -> bool:
        entity = row["entity"]
        return entity is not None and any(
            finished > row["recreated_at"] and entity in entities
            and (counts.get(entity) or {}).get("extra", 1) == 0
            for finished, entities, counts in runs)
    return [r for r in recreated if not cleared(r)]


def recreated_line(row: dict[str, Any]) -> str:
    """The NEEDS ATTENTION line of one re-created table (``unchecked_recreations``; entity
    None: the profile unreadable, so the whole reconcile is named)."""
    entity = row["entity"]
    how = (f"`crm-erp-sync reconcile --repair --entity {entity}` (this line stays until a "
           f"reconcile of {entity} finds no extra ERP row)" if entity is not None else
           "`crm-erp-sync reconcile --repair`")
    if row.get("cause") == UNPUBLISHED:
        return (f"{row['table']} was out of the publication (or its row filter narrowed) until "
                f"the producer repaired it {when(row['recreated_at'])}: it was re-snapshotted, "
                "but rows deleted meanwhile (or now outside the filter) may still be live in "
                f"the ERP: run {how}")
    return (f"{row['table']} was dropped and created again (seen {when(row['recreated_at'])}): "
            "it was re-snapshotted, but rows dropped with the old table are still live in "
            f"the ERP: run {how}")


def lock_holder(crm: Any, slot_name: str) -> dict[str, Any] | None:
    """The CRM session holding the capture lock of ``slot_name`` (``producer.lock_key``; the
    key of ``pg_try_advisory_lock(hashtext(..))`` is split over classid/objid): pid,
    application_name, client ("addr:port", None for a local socket), backend_start, state,
    wait_event_type, wait_event, and silent_s: seconds since its state last changed (every
    query changes it twice), None when this role may not read another role's session
    (grant pg_read_all_stats). None when nobody holds the lock."""
    row = crm.execute(
        "SELECT l.pid, a.application_name, host(a.client_addr) || ':' || a.client_port, "
        "a.backend_start, a.state, a.wait_event_type, a.wait_event, "
        "extract(epoch FROM clock_timestamp() - a.state_change)::float8 "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(%s)::bigint LIMIT 1",
        (lock_key(slot_name),)).fetchone()
    if row is None:
        return None
    names = ("pid", "application_name", "client", "backend_start", "state",
             "wait_event_type", "wait_event", "silent_s")
    return dict(zip(names, row, strict=True))


def config_file_problems(settings: Settings) -> list[str]:
    """The source profile and the mappings file read and validated by the very loaders the
    producer and the consumer start with (``load_profile``, ``Mappings.load``): one line per
    problem, every one the loader found, each naming the setting, the file and the key (the
    loader's ConfigError), never a value's traceback. Empty when both are valid."""
    problems = []
    try:
        load_profile(settings.source_profile)
    except ConfigError as exc:
        problems += [f"source profile invalid ({settings.env_var('source_profile')}): "
                     f"{where}: {problem}; a producer would not start"
                     for where, problem in exc.problems]
    try:
        Mappings.load(settings.mappings_file)
    except ConfigError as exc:
        problems += [f"mappings file invalid ({settings.env_var('mappings_file')}): "
                     f"{where}: {problem}; a consumer would not start (a running one keeps "
                     "its version)" for where, problem in exc.problems]
    return problems


def collect(settings: Settings, *, max_lag: int = 10_000) -> Status:
    config_problems = config_file_problems(settings)
    lag, listed, broker_down, topics_missing = broker_view(settings)
    crm_down: str | None = None
    try:
        slot = slot_state(settings)
        with connect(settings, "crm") as crm:
            pending = [dict(zip(("snapshot_id", "table", "reason", "chunks_done", "rows_emitted",
                                 "requested_at"), r, strict=True)) for r in crm.execute(
                f"SELECT snapshot_id, table_name, reason, chunks_done, rows_emitted, "
                f"requested_at FROM {OWN_SCHEMA}.snapshots WHERE state = 'pending' "
                "ORDER BY snapshot_id").fetchall()]
            holder = lock_holder(crm, settings.slot_name)
            locked = (holder is not None,)
            capture_broken = slot_guard.problems(crm, settings)
            xact = oldest_transaction(crm)
            peek = capture_costs(crm, settings.slot_name)
    except psycopg.errors.UndefinedTable:
        pending, locked, xact, peek, capture_broken = [], None, None, None, []
        holder = None
    except (StackUnavailable, psycopg.OperationalError) as exc:
        # Shown, not raised: an operator runs status during a CRM outage to see the rest.
        crm_down = _crm_unreachable(exc)
    if crm_down is None:
        try:
            violations = contract_violations(settings)
            truncates = _crm_truncates(settings)
            recreated = _recreated(settings)
        except StackUnavailable as exc:  # the CRM went away meanwhile
            crm_down = _crm_unreachable(exc)
    if crm_down is not None:
        slot, pending, locked, xact, peek, capture_broken = None, [], None, None, None, []
        holder = None
        violations, recreated = [], []
        truncates = {"stopped": [], "propagated": 0, "skipped": 0, "last": None}
    with connect(settings, "erp") as erp:
        try:
            truncates["applied"] = [dict(zip(
                ("entity", "crm_table", "truncates", "rows_marked", "applied_at"), r,
                strict=True)) for r in erp.execute(
                "SELECT entity, crm_table, truncates, rows_marked, applied_at FROM "
                "sync.truncations WHERE truncates > 0 ORDER BY entity").fetchall()]
        except psycopg.errors.UndefinedTable:  # an ERP set up before the table existed
            truncates["applied"] = []
        if recreated:
            try:
                runs = [(f, list(e), dict(c)) for f, e, c in erp.execute(
                    "SELECT finished_at, entities, counts FROM sync.reconcile_runs "
                    "WHERE finished_at > %s", (min(r["recreated_at"] for r in recreated),))]
            except psycopg.errors.UndefinedTable:  # an ERP set up before the table existed
                runs = []
            recreated = unchecked_recreations(recreated, runs)
        breaker = open_trips(erp, settings.consumer_group)
        try:
            lost = gaps.unresolved(erp, settings.consumer_group)
        except psycopg.errors.UndefinedTable:  # an ERP set up before the table existed
            lost = []
        by_field = [(c, f or "", int(n)) for c, f, n in erp.execute(
            "SELECT error_class, CASE WHEN error_class = 'MappingError' "
            "THEN split_part(error_message, ': ', 1) END, count(*) FROM sync.dead_letters "
            "WHERE state IN ('open', 'failed_again') AND stage <> 'capture' "
            "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()]
        letters: dict[str, int] = {}
        for cls, _f, n in by_field:
            letters[cls] = letters.get(cls, 0) + n
        capture = [dict(zip(("dead_letter_id", "table", "key", "error_class", "reason",
                             "created_at", "total"), r, strict=True)) for r in erp.execute(
            "SELECT dead_letter_id, coalesce(source_table, topic), "
            "coalesce(source_key, convert_from(msg_key, 'UTF8')), error_class, error_message, "
            "created_at, count(*) OVER () FROM sync.dead_letters "
            "WHERE state IN ('open', 'failed_again') AND stage = 'capture' "
            "ORDER BY dead_letter_id LIMIT %s", (CAPTURE_SHOWN,)).fetchall()]
        try:
            reported = [dict(zip(("client_id", "host", "pid", "member_id", "in_group",
                                  "out_since", "assigned", "mappings_version", "rejoins",
                                  "age_s", "window_closed_until"), r, strict=True))
                        for r in erp.execute(
                "SELECT client_id, host, pid, member_id, in_group, out_since, assigned, "
                "mappings_version, rejoins, "
                "extract(epoch FROM clock_timestamp() - last_seen)::float8, "
                "apply_window_closed_until "
                "FROM sync.consumer_membership WHERE consumer_group = %s ORDER BY client_id",
                (settings.consumer_group,)).fetchall()]
            paused = [dict(zip(("topic", "partition", "paused_at", "paused_by", "reason"), r,
                               strict=True)) for r in erp.execute(
                "SELECT topic, partition, paused_at, paused_by, reason FROM "
                "sync.operator_pauses WHERE consumer_group = %s AND state = 'paused' "
                "ORDER BY topic, partition", (settings.consumer_group,)).fetchall()]
        except psycopg.errors.UndefinedTable:  # an ERP set up before these tables
            reported, paused = [], []
        reports_kept = True
        try:
            consumers = live_members(erp, settings.consumer_group)
        except psycopg.errors.UndefinedTable:  # an ERP set up before the table existed
            consumers, reports_kept = [], False
        held = {r[0]: {"count": r[1], "oldest_held_at": r[2], "oldest_age_s": float(r[3])}
                for r in erp.execute(
                    "SELECT reason, count(*), min(held_at), "
                    "extract(epoch FROM clock_timestamp() - min(held_at)) "
                    "FROM sync.held_events GROUP BY 1 ORDER BY 1").fetchall()}
        stuck_row = erp.execute(
            "SELECT count(DISTINCT (h.topic, h.msg_key)) FROM sync.held_events h "
            f"WHERE h.reason = 'key_blocked' AND NOT {STILL_BLOCKED}").fetchone()
        target = make_target(settings, None)
        # an entity the ERP target does not keep (tryton: demand) has no rows left live there
        recreated = [r for r in recreated
                     if r["entity"] is None or ENTITIES[r["entity"]].source in target.kinds]
        try:
            last = target.last_applied(erp)
            not_set_up = target.not_set_up(erp)
        finally:
            target.close()
    status = Status(
        lag=lag, slot=slot, pending_snapshots=pending, dead_letters=letters, held=held,
        stuck_keys=int(stuck_row[0]) if stuck_row else 0,
        producer_running=bool(locked and locked[0]), breaker=breaker, consumers=consumers,
        producer=holder,
        # Without the broker's list, every consumer would look outside the group.
        members=[] if broker_down else merge_members(
            listed, reported, alive_s=max(30.0, 3 * settings.membership_check_s)),
        broker_unreachable=broker_down, crm_unreachable=crm_down,
        erp_not_set_up=None if not_set_up is None else not_set_up.problem,
        dead_letters_by_field=by_field, paused=paused, truncates=truncates,
        contract_violations=violations, recreated_tables=recreated,
        capture_letters=[{k: v for k, v in c.items() if k != "total"} for c in capture],
        capture_letters_total=int(capture[0]["total"]) if capture else 0,
        offset_gaps=lost,
        oldest_transaction=xact,
        peek=peek if peek is not None and peek["reported_s_ago"] < PEEK_REPORT_STALE_S
        else None,
        last_applied={"applied_at": last.applied_at, "crm_commit_time": last.crm_commit_time,
                      "seconds_since_last_apply": last.seconds_since,
                      "end_to_end_delay_s": last.end_to_end_delay_s})
    window = settings.apply_window_parsed()
    closed = False
    if window is not None:
        state = window.state(datetime.now(UTC))
        status.apply_window = {"window": window.text, "open": state.open,
                               "until": state.until, "as_seen_by": "status"}
        # What the running consumers report wins over this process's clock and settings.
        alive = [r for r in reported if r["age_s"] <= max(30.0, 3 * settings.membership_check_s)]
        if alive:
            shut = [r["window_closed_until"] for r in alive if r["window_closed_until"]]
            status.apply_window.update(
                {"open": not shut, "as_seen_by": "consumers",
                 # when it closes is known here only if this clock agrees it is open
                 "until": min(shut).astimezone(window.zone) if shut
                 else state.until if state.open else None})
        closed = not status.apply_window["open"]
    else:
        # The window is the consumers' setting: status may run without it and still sees
        # what the running consumers report.
        alive = [r for r in reported if r["age_s"] <= max(30.0, 3 * settings.membership_check_s)]
        shut = [r["window_closed_until"] for r in alive if r["window_closed_until"]]
        if shut:
            status.apply_window = {"window": "set on the consumers", "open": False,
                                   "until": min(shut).astimezone(UTC),
                                   "as_seen_by": "consumers"}
            closed = True
    if broker_down:
        status.attention.append(broker_down)
    if crm_down:
        status.attention.append(crm_down)
    status.attention.extend(config_problems)
    status.attention.extend(topics_missing)
    if status.erp_not_set_up is not None:
        status.attention.append(f"consumers refuse to start (exit 2): {status.erp_not_set_up}")
    for t in truncates["stopped"]:
        status.attention.append(
            f"capture STOPPED before TRUNCATE of {t['table']} (commit LSN {t['commit_lsn']}, "
            f"{when(t['commit_time'])}) because CRM_ERP_SYNC_ON_TRUNCATE="
            f"{t['setting']}: set CRM_ERP_SYNC_ON_TRUNCATE=propagate (its ERP rows are marked "
            "deleted) or skip (they stay as they are), then restart the producer")
    status.attention.extend(recreated_line(r) for r in recreated)
    status.attention.extend(gaps.attention_line(g) for g in status.offset_gaps)
    # (a recorded gap whose offsets the group has not committed past yet is named above)
    recorded = {(g["topic"], g["partition"]) for g in status.offset_gaps}
    status.attention.extend(unreached_gap_line(p, settings.consumer_group)
                            for p in status.lag if p.deleted_unapplied
                            and (p.topic, p.partition) not in recorded)
    for v in violations:
        where = v["table"] if v["column"] == "*" else f"{v['table']}.{v['column']}"
        status.attention.append(
            f"capture STOPPED since {when(v['since'])}: source contract broken: "
            f"{where}: {v['problem']}; fix: {v['fix']} (the producer resumes by itself once "
            "the table is fixed)")
    for trip in breaker:
        status.attention.append(
            f"circuit breaker open on {trip.name} since {when(trip.tripped_at)}:"
            f" {trip.message}; look (`crm-erp-sync dlq list --topic {trip.topic}`), then "
            f"`crm-erp-sync resume --partition {trip.topic}:{trip.partition} --reason ...`")
    alive_s = max(30.0, 3 * settings.membership_check_s)
    lag_at = {f"{p.topic}[{p.partition}]": p.lag for p in status.lag}
    silent = 0
    for m in status.members:
        if not m.in_group:
            status.attention.append(outside_group_line(
                m, settings.consumer_group, settings.membership_check_s,
                pid_gone=pid_gone_here(m.host, m.pid)))
        elif m.last_seen_s is not None and m.last_seen_s > alive_s:
            # One blocked member among healthy ones: its partitions are applied by nobody.
            silent += 1
            status.attention.append(silent_member_line(
                m, settings.consumer_group, alive_s, settings.membership_check_s, lag_at))
    if broker_down:
        pass  # lag and members unknown: said once above
    elif not any(m.in_group for m in status.members) and status.total_lag > 0:
        status.attention.append(
            f"{status.total_lag} event(s) wait but group {settings.consumer_group} has no "
            "member: " + ("start a consumer" if status.erp_not_set_up is None else
                          "consumers cannot start until `crm-erp-sync setup` has run (above)"))
    elif (status.total_lag > 0 and listed and reports_kept and not consumers and not closed
          and not silent):  # (each silent member is named above)
        # In the group (kafka-python's heartbeat thread keeps it there) but no consumer's loop
        # has reported: each reports every few seconds between batches.
        status.attention.append(
            f"{status.total_lag} event(s) wait and no consumer of group "
            f"{settings.consumer_group} has reported in {STALE_AFTER_S:g}s although the broker "
            "lists members: a consumer is blocked in a call (an ERP lock or a hung query: "
            "look at its /readyz and the ERP's pg_stat_activity)")
    for p in paused:
        status.attention.append(f"{p['topic']}[{p['partition']}] paused by {p['paused_by']} "
                                f"since {when(p['paused_at'])} ({p['reason']}): "
                                "`crm-erp-sync resume` continues")
    ox = status.oldest_transaction
    if ox and ox["age_s"] > settings.pinning_xact_max_s:
        who = (f"CRM transaction pid {ox['pid']} ({ox['state']}, database {ox['database']})"
               if ox["pid"] is not None else
               f"a prepared CRM transaction (database {ox['database']})")
        end = ("end it, or SELECT pg_terminate_backend(pid)" if ox["pid"] is not None
               else "COMMIT PREPARED or ROLLBACK PREPARED it (pg_prepared_xacts)")
        status.attention.append(
            f"{who} has been open for {_age(ox['age_s'])} (over "
            f"{_age(settings.pinning_xact_max_s)}): the slot cannot confirm past it and the "
            f"CRM keeps its WAL ({end})")
    if slot is not None and (slot.get("retained_wal_bytes") or 0) > \
            settings.retained_wal_max_bytes:
        status.attention.append(
            f"replication slot {settings.slot_name} retains {slot['retained_wal_bytes']:,} "
            f"bytes of WAL (over {settings.retained_wal_max_bytes:,}): a long CRM transaction "
            "(above), a stopped producer, or capture behind")
    danger = None if slot is None else slot_wal_danger(
        settings.slot_name, slot.get("wal_status"), slot.get("safe_wal_bytes"),
        slot.get("keep_size_bytes"))
    if danger is not None:
        status.attention.append(danger)
    if status.peek is not None and status.peek["peek_s"] > settings.sql_peek_max_s:
        status.attention.append(
            f"each SQL peek of the slot takes {status.peek['peek_s']:.2f}s of the CRM's time "
            f"(over {settings.sql_peek_max_s:g}s): it re-decodes the retained WAL; empty peeks "
            f"back off {status.peek['backoff_s']:.1f}s. End the transaction pinning the slot, "
            "or capture over the stream (CRM_ERP_SYNC_CAPTURE_TRANSPORT=stream)")
    for c in consumers:
        if c["refused_version"] is not None or c["refused_error"]:
            status.attention.append(
                f"consumer {c['member_id']} refused the mappings file "
                f"(version {c['refused_version'] or 'unreadable'}): {c['refused_error']}; it "
                f"keeps applying version {c['mappings_version']}: fix the file (it is "
                "re-checked every few seconds, or send SIGHUP)")
    versions = sorted({c["mappings_version"] for c in consumers})
    if len(versions) > 1:
        status.attention.append(
            f"running consumers apply different mappings versions ({', '.join(versions)}): "
            "give every consumer the same mappings file")
    if status.capture_letters_total:
        status.attention.append(
            f"{status.capture_letters_total} capture dead letter(s) unresolved (CRM rows the "
            "producer could not make events; their keys are held): fix the rows in the CRM, "
            "then `crm-erp-sync dlq redrive --error-type capture` (a row deleted since: discard "
            "its letters and run `crm-erp-sync reconcile --repair`)")
    if letters:
        status.attention.append(f"{sum(letters.values())} dead letter(s) unresolved: "
                                "see `crm-erp-sync dlq list`")
    status.capture_stopped = bool(capture_broken)
    status.attention.extend(capture_broken)  # a broken slot or publication, and its recovery
    if capture_broken or crm_down:
        pass  # already named above (the recovery command; the CRM database unreachable)
    elif slot is None:
        status.attention.append(f"replication slot {settings.slot_name} is missing: "
                                "the producer has never run or the slot was dropped")
    elif slot.get("wal_status") == "lost":
        status.attention.append(f"replication slot {settings.slot_name} is LOST (its WAL was "
                                "removed): run `crm-erp-sync resync` (new slot, full "
                                "re-snapshot, rows deleted meanwhile marked deleted)")
    elif not status.producer_running:
        status.attention.append(f"no producer is running (nobody holds the capture lock of "
                                f"slot {settings.slot_name}); WAL is retained meanwhile")
    creating = slot is not None and slot.get("unconfirmed_bytes") is None
    bound = producer_silent_after_s(settings)
    if (holder is not None and holder["silent_s"] is not None and holder["silent_s"] > bound
            and not creating):  # a slot being created is named below (the session waits)
        status.producer_hung = True
        status.attention.append(hung_producer_line(
            holder, settings.slot_name, None if slot is None else slot.get("active"), bound))
    if creating and not crm_down and (slot or {}).get("wal_status") != "lost":
        since = (slot or {}).get("creating_s")
        if since is None or since > SLOT_CREATING_MAX_S:
            ox = status.oldest_transaction
            who = "" if ox is None else (
                f"pid {ox['pid']}" if ox["pid"] is not None else "a prepared transaction")
            blocker = ("" if ox is None else
                       f" (the oldest: {who}, database {ox['database']}, open for "
                       f"{_age(ox['age_s'])})")
            status.attention.append(
                f"replication slot {settings.slot_name} is still being created"
                + (f" after {_age(since)}" if since is not None else "")
                + ": PostgreSQL waits for every transaction that was open when its creation "
                f"began, in any database of the CRM's cluster, to end{blocker}; the producer "
                "captures nothing until then: end that transaction")
    awaiting = held.get("awaiting_customer")
    if awaiting and awaiting["oldest_age_s"] > settings.orphan_hold_s and not closed:
        status.attention.append(f"events held awaiting their customer for more than "
                                f"{settings.orphan_hold_s:g}s: is a consumer running?")
    if status.stuck_keys:
        status.attention.append(f"{status.stuck_keys} key(s) have held events with no "
                                "unresolved dead letter before them: run "
                                "`crm-erp-sync dlq redrive --all` to release them")
    if status.total_lag > max_lag and not closed:
        status.attention.append(f"consumer lag {status.total_lag} exceeds {max_lag}")
    return status
