"""`crm-erp-sync resync`: the one recovery from a dropped, replaced or lost slot or a dropped
publication (``service.cdc.slot_guard``).

1. CRM side, at once: a snapshot of every captured entity is requested (before the slot, as
   on a first start: never a slot without its snapshot), the broken slot is dropped (refused
   while another process holds it), the publication is created if it is missing (one created
   again by hand is kept; its tables are checked), a new slot is created, and the recorded
   state is reset: the stopped producer sees that and captures again, from the new slot,
   snapshot first.
2. ERP side, the delete pass: a snapshot cannot see rows deleted in the CRM while capture was
   stopped, so once the consumer group has applied everything that was on the topics when the
   resync started (every event of the old slot), the ERP's live rows whose CRM row no longer
   exists are marked deleted: reconcile's ERP-driven pass, each row only if it still has the
   position it was compared at (a newer event, e.g. the row created again, wins).

If the consumers do not catch up within ``--wait``, the command exits 1 and ``status`` keeps
saying the delete pass is due; running ``resync`` again does only what is left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from service import ops
from service.cdc import pgoutput, slot_guard
from service.cdc.capture import ensure_capture_objects, request_snapshot
from service.cdc.profile import load_profile
from service.errors import SyncError
from service.operator.common import PgConn, connect
from service.operator.reconcile import ENTITIES, Reconciler
from service.settings import Settings

log = structlog.get_logger("resync")


class ResyncRefused(SyncError):
    """The broken slot is held by a running process (exit 1): stop it first."""


@dataclass
class ResyncReport:
    problem: str | None = None  # what was repaired (slot_dropped, ..., slot_lost), or None
    snapshots: dict[str, int] = field(default_factory=dict)  # entity -> snapshot id
    slot_created: bool = False
    caught_up: bool = False
    marked_deleted: dict[str, list[str]] = field(default_factory=dict)
    done: bool = False  # nothing left to do
    # When nothing was due: when the CRM's last delete pass finished (None: never). It reached
    # only the ERP that `resync` ran against; the CRM does not record which one that was.
    last_delete_pass: datetime | None = None


def _rebuild(crm: PgConn, settings: Settings, report: ResyncReport) -> None:
    profile = load_profile(settings.source_profile)
    slot = crm.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                       (settings.slot_name,)).fetchone()
    if slot is not None and slot[0] is not None:
        raise ResyncRefused(f"replication slot {settings.slot_name!r} is in use by process "
                            f"{slot[0]}: stop whatever reads it, then run resync again")
    # Snapshot requests first, then the slot (as on a first start).
    for ent in profile.snapshot_entities:
        if ent.kind is not None:
            report.snapshots[ent.entity] = request_snapshot(crm, profile, ent.entity,
                                                            reason="resync")
    if slot is not None:
        crm.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
    ensure_capture_objects(crm, settings, profile)
    (start,) = crm.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
    crm.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                (settings.slot_name,))
    report.slot_created = True
    slot_guard.record(crm, settings)
    crm.execute(f"UPDATE {slot_guard.STATE_TABLE} SET resync_started_lsn = %s::pg_lsn "
                "WHERE slot_name = %s", (start, settings.slot_name))
    log.warning("resync_slot_recreated", slot=settings.slot_name, problem=report.problem,
                snapshots=report.snapshots)


def _group_applied(settings: Settings, ends: dict[tuple[str, int], int]) -> bool:
    committed = {(p.topic, p.partition): p.committed or 0 for p in ops.group_lag(settings)}
    return all(committed.get(tp, 0) >= end for tp, end in ends.items())


def resync(settings: Settings, *, wait_s: float = 300.0, poll_s: float = 1.0,
           chunk_size: int = 5000) -> ResyncReport:
    """Recover capture after a broken slot or publication; see the module docstring.

    Raises ResyncRefused when the slot is held by a running process, StackUnavailable when
    the CRM, the ERP or the broker cannot be reached."""
    report = ResyncReport()
    with connect(settings, "crm") as crm:
        slot_guard.ensure_table(crm)
        state = slot_guard.load(crm, settings.slot_name)
        problem = slot_guard.inspect(crm, settings, state)
        lost = crm.execute("SELECT wal_status = 'lost' FROM pg_replication_slots "
                           "WHERE slot_name = %s", (settings.slot_name,)).fetchone()
        if problem is not None or (lost is not None and lost[0]):
            report.problem = problem.kind if problem is not None else "slot_lost"
            _rebuild(crm, settings, report)
            state = slot_guard.load(crm, settings.slot_name)
        if state is None or state.resync_started_lsn is None:
            row = crm.execute(f"SELECT resynced_at FROM {slot_guard.STATE_TABLE} "
                              "WHERE slot_name = %s", (settings.slot_name,)).fetchone()
            report.last_delete_pass = row[0] if row else None
            report.done = True
            return report
    # Every event of the old slot is on the topics now: wait until the group applied them.
    ends = {(p.topic, p.partition): p.end for p in ops.group_lag(settings)}
    deadline = time.monotonic() + wait_s
    while not _group_applied(settings, ends):
        if time.monotonic() > deadline:
            return report
        time.sleep(poll_s)
    report.caught_up = True
    rec = Reconciler(settings, chunk_size)
    try:
        kept = rec.kinds()
        for entity in ENTITIES.values():
            if entity.source in kept:
                gone = rec.mark_gone(entity)
                if gone:
                    report.marked_deleted[entity.name] = gone
    finally:
        rec.close()
    with connect(settings, "crm") as crm:
        crm.execute(f"UPDATE {slot_guard.STATE_TABLE} SET resync_started_lsn = NULL, "
                    "resynced_at = now() WHERE slot_name = %s", (settings.slot_name,))
    log.info("resync_done", slot=settings.slot_name,
             marked_deleted={k: len(v) for k, v in report.marked_deleted.items()},
             since_lsn=pgoutput.lsn_to_str(state.resync_started_lsn))
    report.done = True
    return report
