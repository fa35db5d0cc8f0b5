"""The operator subcommands of `crm-erp-sync`: argument parsers and output.

``service.cli`` calls ``register(subparsers)``; each handler parses nothing itself beyond
argparse, calls the operator module, renders a table (or ``--json``) and returns the exit
code from the one table in service/exit_codes.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from service import exit_codes
from service.errors import ConfigError
from service.operator import argtypes, render
from service.operator.common import actor, parse_time
from service.settings import Settings

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE = exit_codes.OK, exit_codes.ATTENTION, exit_codes.USAGE
EPILOG = exit_codes.EPILOG


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}min"
    return f"{value / 3600:.1f}h"


# ---- status --------------------------------------------------------------------------------
# A table's last column is not cut to a width: nothing to its right is pushed out of line,
# and its end can be what the operator must read (a failed redrive's next step).
UNCUT = 100_000


def _kafka_quiet(cmd: Any) -> Any:
    """`cmd` with kafka-python's own log records kept off the terminal, as `status` does
    (service.operator.status.quiet_kafka): with the broker down its client logs every
    refused connection and bootstrap retry (about 20 lines in 30 s) before the command
    says in one line that the broker is unreachable (exit 3)."""
    def run(settings: Settings, args: argparse.Namespace) -> int:
        from service.operator.status import quiet_kafka

        with quiet_kafka():
            code: int = cmd(settings, args)
            return code
    return run


def slot_text(slot: dict[str, Any] | None) -> str:
    """The slot's part of the ``Producer:`` line, from :func:`service.ops.slot_state`'s dict
    (bytes). ``safe_wal_bytes`` is PostgreSQL's safe_wal_size: WAL the CRM may still write
    before it removes WAL the slot needs (the slot is then lost). Named as that, not as
    "before it is in danger": `status` warns much earlier, once it falls under
    SAFE_WAL_MIN_SHARE of max_slot_wal_keep_size."""
    if slot is None:
        return "MISSING"
    if slot.get("wal_status") == "lost":
        return "LOST (its WAL was removed)"
    if slot.get("unconfirmed_bytes") is None:  # confirmed_flush_lsn NULL: not created yet
        since = slot.get("creating_s")
        return ("being created" + (f" for {_fmt_s(since)}" if since is not None else "")
                + ": waiting for the transactions open when its creation began to end (the "
                "oldest is below); nothing is captured until then; retains "
                f"{slot['retained_wal_bytes']} bytes of WAL")
    text = (f"{'reading' if slot['active'] else 'idle'}, retains "
            f"{slot['retained_wal_bytes']} bytes of WAL, {slot['unconfirmed_bytes']} bytes "
            f"not yet confirmed, WAL {slot.get('wal_status')}")
    safe = slot.get("safe_wal_bytes")
    if safe is not None:
        from service.ops import SAFE_WAL_MIN_SHARE

        text += (f", {safe} bytes more before the CRM removes WAL it needs (safe_wal_size; "
                 "status warns under "
                 f"{SAFE_WAL_MIN_SHARE:.0%} of max_slot_wal_keep_size)")
    return text


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from service.consumer.mappings_watch import STALE_AFTER_S
    from service.consumer.policy import percent
    from service.operator.status import collect

    st = collect(settings, max_lag=args.max_lag)
    if args.json:
        print(render.dumps({**render.jsonable(st), "total_lag": st.total_lag,
                            "lag": [{**render.jsonable(p), "lag": p.lag} for p in st.lag],
                            "breaker": [{**render.jsonable(t), "partition_name": t.name,
                                         "ratio": t.ratio} for t in st.breaker],
                            "ok": not st.attention}))
        return _status_code(st)
    print("Consumer group", settings.consumer_group)
    if st.broker_unreachable:
        print(st.broker_unreachable)
    else:
        print(render.table(["topic", "partition", "committed", "end", "lag"],
                           [(p.topic, p.partition, p.committed, p.end, p.lag)
                            for p in st.lag]))
        print(f"total lag: {st.total_lag}")
    aw = st.apply_window
    if aw is not None:
        # The one time not in UTC: the window is wall-clock time in its own zone, so its
        # edge is shown there (with the offset).
        until = aw["until"].strftime("%Y-%m-%d %H:%M:%S%z") if aw["until"] else None
        print(f"Apply window {aw['window']}: " + (
            ("open" + (f" until {until}" if until else ""))
            if aw["open"] else
            f"outside apply window until {until} (consumers keep their "
            "partitions paused by design; the lag grows meanwhile and is not counted as "
            "stuck)"))
    print()
    if st.broker_unreachable:
        print("Group members: unknown (broker unreachable)")
    elif st.members:
        print(render.table(
            ["group member", "host", "pid", "in group", "partitions", "last report",
             "rejoins"],
            [(m.client_id, m.host, m.pid if m.pid is not None else "-",
              "yes" if m.in_group else "NO" + (f" since {render.when(m.out_since)}"
                                                if m.out_since else ""),
              ", ".join(m.partitions) or "-",
              f"{_fmt_s(m.last_seen_s)} ago" if m.last_seen_s is not None else "-",
              m.rejoins) for m in st.members], max_width=60))
    else:
        print(f"Group members: none (no consumer in group {settings.consumer_group})")
    for p in st.paused:
        print(f"Paused by an operator: {p['topic']}[{p['partition']}] since "
              f"{render.cell(p['paused_at'])} by {p['paused_by']}: {p['reason']}")
    print()
    if st.crm_unreachable:
        print(f"Producer and slot {settings.slot_name}: unknown (the CRM database did not "
              "answer: see below)")
    else:
        _print_status_crm(settings, st)
    if st.breaker:
        print(render.table(
            ["circuit breaker OPEN", "since", "measured", "limit", "paused at offset",
             "last reasons"],
            [(t.name, render.cell(t.tripped_at), f"{percent(t.ratio)} of {t.messages}",
              percent(t.max_ratio), t.from_offset, "; ".join(t.last_reasons))
             for t in st.breaker], max_width=70))
        for t in st.breaker:
            print(f"  {t.name}: {t.message}")
    else:
        print("Circuit breaker: closed on every partition")
    if st.consumers:
        print(render.table(
            ["consumer", "mappings version", "loaded", "seen", "refused file"],
            [(c["member_id"], c["mappings_version"], render.cell(c["mappings_loaded_at"]),
              f"{_fmt_s(c['seen_s_ago'])} ago",
              "-" if c["refused_error"] is None else
              f"{c['refused_version'] or 'unreadable'}: {c['refused_error']}")
             for c in st.consumers], max_width=70))
    else:
        print(f"Consumers: none reported in the last {STALE_AFTER_S:g}s")
    tr = st.truncates
    if st.crm_unreachable:
        print("CRM truncates and pending snapshots: unknown (CRM database unreachable)")
    else:
        last = tr.get("last")
        print("CRM truncates: " + (
            "none" if not (tr.get("stopped") or last) else
            f"{tr['propagated']} propagated, {tr['skipped']} skipped" + (
                f"; last: {last['table']} {last['outcome']} (commit LSN {last['commit_lsn']}, "
                f"{render.cell(last['commit_time'])})" if last else "") + "".join(
                f"; capture STOPPED before the truncate of {t['table']} (commit LSN "
                f"{t['commit_lsn']})" for t in tr.get("stopped", []))))
    for a in tr.get("applied", []):
        print(f"  applied in the ERP: {a['entity']} ({a['crm_table']}): {a['truncates']} "
              f"truncate(s), {a['rows_marked']} row(s) marked deleted, last "
              f"{render.cell(a['applied_at'])}")
    if not st.crm_unreachable:
        print(f"Pending snapshots: {len(st.pending_snapshots)}" + "".join(
            f"\n  #{s['snapshot_id']} {s['table']} ({s['reason']}), {s['rows_emitted']} rows so far"
            for s in st.pending_snapshots))
    print()
    if st.dead_letters:
        print(render.table(["unresolved dead letters", "field", "count"],
                           [(c, f or "-", n) for c, f, n in st.dead_letters_by_field]))
    else:
        print("Unresolved dead letters: none")
    if st.capture_letters:
        print(render.table(["capture dead letter", "table", "key", "reason"],
                           [(f"#{c['dead_letter_id']} {c['error_class']}", c["table"],
                             c["key"], c["reason"]) for c in st.capture_letters],
                           max_width=70))
        if st.capture_letters_total > len(st.capture_letters):
            print(f"  … and {st.capture_letters_total - len(st.capture_letters)} more "
                  "(`crm-erp-sync dlq list --error-type capture`)")
    else:
        print("Capture dead letters: none")
    if st.held:
        print(render.table(["held events", "count", "oldest held for"],
                           [(k, v["count"], _fmt_s(v["oldest_age_s"]))
                            for k, v in st.held.items()]))
    else:
        print("Held events: none")
    la = st.last_applied
    print(f"\nLast applied: {render.cell(la['applied_at'])} "
          f"({_fmt_s(la['seconds_since_last_apply'])} ago); newest CRM commit applied: "
          f"{render.cell(la['crm_commit_time'])}; end-to-end delay of the last change: "
          f"{_fmt_s(la['end_to_end_delay_s'])}")
    if st.attention:
        print("\nNEEDS ATTENTION:")
        for item in st.attention:
            print(f"  - {item}")
        return _status_code(st)
    print("\nOK")
    return EXIT_OK


def _print_status_crm(settings: Settings, st: Any) -> None:
    """Status's producer, slot, oldest CRM transaction and SQL peek lines (the CRM's part)."""
    slot = st.slot
    state = "running" if st.producer_running else "NOT RUNNING"
    if st.producer_hung and st.producer is not None:
        state = (f"HUNG (holds the capture lock, session pid {st.producer['pid']} silent for "
                 f"{_fmt_s(st.producer['silent_s'])}: see below)")
    if st.contract_violations:
        state += ", CAPTURE STOPPED (source contract broken, see below)"
    elif st.capture_stopped:
        state += ", CAPTURE STOPPED (slot or publication, see below)"
    print(f"Producer: {state}; slot {settings.slot_name}: {slot_text(slot)}")
    ox = st.oldest_transaction
    print("Oldest CRM transaction holding the slot: " + (
        "none" if ox is None else
        f"pid {ox['pid'] if ox['pid'] is not None else '- (prepared)'} ({ox['state']}, "
        f"database {ox['database']}), open for {_fmt_s(ox['age_s'])}"))
    if st.peek is not None:
        print(f"SQL peek: {st.peek['peek_s']:.3f}s each; empty peeks wait "
              f"{st.peek['backoff_s']:.2f}s (reported {_fmt_s(st.peek['reported_s_ago'])} ago)")


def _status_code(st: Any) -> int:
    """3 when the broker or the CRM database could not be asked (a part is unchecked:
    README, "Exit codes"), else 1 when something needs attention, else 0."""
    if st.broker_unreachable or st.crm_unreachable:
        return exit_codes.UNAVAILABLE
    return EXIT_ATTENTION if st.attention else EXIT_OK


# ---- replay --------------------------------------------------------------------------------
def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.replay import GroupActive, parse_offsets, replay

    try:
        plan = replay(settings, args.topic, from_beginning=args.from_beginning,
                      from_time=parse_time(args.from_time, "--from-time")
                      if args.from_time else None,
                      from_offsets=parse_offsets(args.from_offset) if args.from_offset else None,
                      partitions=args.partition, dry_run=args.dry_run)
    except GroupActive as exc:
        print(f"crm-erp-sync: replay refused: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    if args.json:
        print(render.dumps({**render.jsonable(plan), "to_reprocess": plan.to_reprocess,
                            "partitions": [{**render.jsonable(p), "to_reprocess": p.to_reprocess}
                                           for p in plan.partitions]}))
        return EXIT_OK
    print(render.table(["topic", "partition", "committed", "", "new offset", "end",
                        "to reprocess"],
                       [(p.topic, p.partition, p.committed, "->", p.new_offset, p.end,
                         p.to_reprocess) for p in plan.partitions]))
    if plan.active_members:
        print(f"Note: group {plan.group} has {len(plan.active_members)} member(s) "
              f"({'; '.join(plan.active_members)}); stop them before the real replay.")
    verb = "would reprocess" if plan.dry_run else "will reprocess"
    print(f"{'DRY RUN: nothing changed. ' if plan.dry_run else ''}Group {plan.group} "
          f"{verb} {plan.to_reprocess} event(s) of {plan.topic} from {plan.target}"
          + ("" if plan.dry_run else " when its consumers start."))
    return EXIT_OK


# ---- dlq -----------------------------------------------------------------------------------
def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.dlq import STATES, list_letters

    states = None
    if args.state:
        states = list(STATES) if args.state == ["all"] else args.state
    letters = list_letters(settings, since=parse_time(args.since, "--since") if args.since
                           else None, error_type=args.error_type, topic=args.topic,
                           key=args.key, states=states, field=args.field)
    if args.json:
        print(render.dumps([{**render.jsonable(d), "key": d.key_text} for d in letters]))
        return EXIT_OK
    if not letters:
        print("No dead letters match.")
        return EXIT_OK
    print(render.table(
        ["id", "state", "created", "topic[partition]@offset", "key", "stage", "error",
         "reason"],
        [(d.dead_letter_id, d.state, render.when(d.created_at),
          f"{d.topic}[{d.partition}]@{d.offset}", d.key_text, d.stage, d.error_class,
          d.last_error or d.error_message) for d in letters], max_width=70))
    print(f"{len(letters)} dead letter(s). `crm-erp-sync dlq show ID` for the payload and "
          "trace.")
    return EXIT_OK


def cmd_dlq_show(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.dlq import show

    info = show(settings, args.id)
    if args.json:
        print(render.dumps(info))
        return EXIT_OK
    d = info["letter"]
    print(f"Dead letter {d.dead_letter_id}: {d.state}" + (
        f" (resolved {render.cell(d.resolved_at)})" if d.resolved_at else ""))
    print(render.table(["field", "value"], [
        ("original", f"{d.topic}[{d.partition}]@{d.offset}"), ("key", d.key_text),
        ("dead-letter topic", f"{settings.dlq_topic}[{d.dlq_partition}]@{d.dlq_offset}"),
        ("created", d.created_at), ("stage", d.stage), ("error", d.error_class),
        ("reason", d.error_message), ("redrive attempts", d.redrive_attempts),
        # Not cut: the value is the last column, and a redrive's last error ends with what
        # to do next (discard the letter when the CRM row was fixed since).
        ("last error", d.last_error)], max_width=UNCUT))
    headers = dict(info["headers"])
    trace = headers.pop("kafka_dlt-exception-stacktrace", "")
    print("\nHeaders:")
    print(render.table(["header", "value"], sorted(headers.items()), max_width=100))
    if info.get("kind") == "capture_dead_letter":
        # never an Avro event: the producer wrote this JSON in its place
        print("\nPayload (capture dead letter: the JSON the producer wrote instead of an "
              "event, the row's values as text):")
    else:
        print("\nPayload" + (f" ({info.get('kind')} event, decoded from Avro):"
                             if info["payload"] is not None else ":"))
    if info["payload"] is not None:
        print(render.dumps(info["payload"]))
    else:
        print(f"  (not decodable: {info['payload_error']})")
        if info.get("payload_raw") is not None:
            print("  raw:", render.jsonable(info["payload_raw"]))
    print("\nTrace:")
    print(trace.rstrip() or "  (none recorded)")
    if info["actions"]:
        print("\nActions:")
        print(render.table(["at", "action", "actor", "outcome", "mappings", "reason", "detail"],
                           [(a["at"], a["action"], a["actor"], a["outcome"], a["mappings"],
                             a["reason"], a["detail"]) for a in info["actions"]],
                           max_width=70))
    return EXIT_OK


def _print_report(report: Any, as_json: bool) -> int:
    if as_json:
        print(render.dumps({**render.jsonable(report), "ok": report.ok}))
    elif not report.outcomes:
        print(f"Nothing to {report.action}.")
    else:
        print(render.table(["id", "key", "outcome", "detail"],
                           [(o.dead_letter_id, o.key, o.outcome, o.detail)
                            for o in report.outcomes], max_width=UNCUT))
        counts: dict[str, int] = {}
        for o in report.outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        print(("DRY RUN, nothing changed: " if report.dry_run else "") +
              ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return EXIT_OK if report.ok else EXIT_ATTENTION


def cmd_dlq_redrive(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.dlq import redrive, select_letters

    if not (args.ids or args.error_type or args.field or args.key or args.all):
        raise ConfigError("dlq redrive", "name dead letters: ID ..., --error-type X, "
                                         "--field F, --key K or --all")
    letters, refused = select_letters(settings, args.ids, args.error_type, args.all,
                                      field=args.field, key=args.key)
    report = redrive(settings, letters, actor=actor(args.actor), reason=args.reason,
                     dry_run=args.dry_run, force=args.force)
    report.outcomes[:0] = refused
    for warning in report.warnings:
        print(f"crm-erp-sync: warning: {warning}", file=sys.stderr)
    if not args.json:
        running = (f"running consumers apply {', '.join(report.consumer_versions)}"
                   if report.consumer_versions else "no consumer is running to compare with")
        print(f"Mappings version {report.mappings_version} ({settings.mappings_file}; "
              f"{running})")
    return _print_report(report, args.json)


def cmd_dlq_discard(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.dlq import discard, select_letters

    if not (args.ids or args.error_type or args.field or args.key):
        raise ConfigError("dlq discard", "name dead letters: ID ..., --error-type X, "
                                         "--field F or --key K")
    if args.ids and (args.error_type or args.field or args.key):
        raise ConfigError("dlq discard", "give IDs or filters (--error-type/--field/--key), "
                                         "not both")
    letters, refused = select_letters(settings, args.ids, args.error_type, False,
                                      field=args.field, key=args.key)
    if (not args.ids and not args.dry_run and letters and not args.yes
            and not _confirm(f"Discard {len(letters)} dead letter(s) ({_filters(args)})? "
                             "Their changes will not reach the ERP.")):
        print(f"crm-erp-sync: not confirmed: nothing discarded ({len(letters)} letter(s) "
              "match; add --yes to confirm without a prompt, or --dry-run to list them)",
              file=sys.stderr)
        return EXIT_ATTENTION
    report = discard(settings, letters, actor=actor(args.actor), reason=args.reason,
                     dry_run=args.dry_run)
    report.outcomes[:0] = refused
    return _print_report(report, args.json)


def _filters(args: argparse.Namespace) -> str:
    return ", ".join(f"{name} {value}" for name, value in (
        ("error type", args.error_type), ("field", args.field),
        ("key", getattr(args, "key", None))) if value)


def _confirm(question: str) -> bool:
    """Asks on the terminal; without one (a script, a pipe) the answer is no."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


# ---- reconcile -----------------------------------------------------------------------------
def cmd_resync(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.resync import resync

    report = resync(settings, wait_s=args.wait, chunk_size=args.chunk_size)
    if args.json:
        print(render.dumps(render.jsonable(report)))
        return EXIT_OK if report.done else EXIT_ATTENTION
    if report.problem is not None:
        print(f"Repaired {report.problem}: new slot {settings.slot_name}, publication "
              f"{settings.publication_name} checked; snapshots requested: "
              + ", ".join(f"{k} #{v}" for k, v in report.snapshots.items()))
    if report.done and report.problem is None and not report.caught_up:
        print("Nothing to resync: the slot and the publication are the ones captured "
              "through, and no delete pass is due.")
        if report.last_delete_pass is not None:
            # newcomer6 F18: the CRM records that a pass ran, not for which ERP it ran
            print(f"The last delete pass ({report.last_delete_pass:%Y-%m-%d %H:%M:%S %Z}) "
                  "reached only the ERP that `resync` ran against. For any other ERP (another "
                  "consumer group, or one filled by `replay` since the gap), rows deleted in "
                  "the gap stay live there: run `crm-erp-sync reconcile` with its settings, "
                  "then `reconcile --repair` (sql target) or mark them in Tryton.")
        return EXIT_OK
    if not report.caught_up:
        print(f"The consumers did not apply the old slot's events within {args.wait:g}s: "
              "the delete pass is still due. Start the consumers, then run "
              "`crm-erp-sync resync` again.")
        return EXIT_ATTENTION
    marked = sum(len(v) for v in report.marked_deleted.values())
    print(f"Delete pass done: {marked} ERP row(s) whose CRM row is gone marked deleted"
          + "".join(f"; {k}: {', '.join(v[:20])}" for k, v in report.marked_deleted.items())
          + ". The producer re-snapshots from the new slot (`crm-erp-sync snapshot list`).")
    return EXIT_OK


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.reconcile import reconcile

    result = reconcile(settings, args.entity, repair=args.repair, chunk_size=args.chunk_size,
                       wait_s=args.wait)
    if args.json:  # complete: every key, whatever --limit says
        def entity_json(e: Any) -> dict[str, Any]:
            return {**render.jsonable(e), "drift": e.drift, "counts": e.counts()}
        out = {**render.jsonable(result), "drift": result.drift, "held": result.held,
               "entities": [entity_json(e) for e in result.entities]}
        if result.repair is not None:
            out["repair"]["remaining"] = [entity_json(e) for e in result.repair.remaining]
            out["repair"]["converged"] = result.repair.converged
        print(render.dumps(out))
        return EXIT_ATTENTION if result.drift else EXIT_OK
    print(render.table(["entity", "crm rows", "erp rows", "missing", "extra", "differing",
                        "unmappable", "held", "seconds"],
                       [(e.entity, e.crm_rows if e.captured else "-", e.erp_rows,
                         len(e.missing), len(e.extra), len(e.differing), len(e.unmappable),
                         len(e.held), e.seconds)
                        for e in result.entities]))
    for e in result.entities:
        if not e.captured:
            print(f"{e.entity}: not captured by the source profile "
                  f"(CRM_ERP_SYNC_SOURCE_PROFILE); {e.erp_rows} live row(s) in the ERP, "
                  "neither compared nor repaired")
    shown = args.limit or None  # 0: all
    for e in result.entities:
        for label, keys in (("missing in the ERP", e.missing), ("extra in the ERP", e.extra)):
            if keys:
                more = (f" … and {len(keys) - shown} more (--limit 0 shows all)"
                        if shown is not None and len(keys) > shown else "")
                print(f"{e.entity} {label}: {', '.join(map(str, keys[:shown]))}{more}")
        for key, fields in list(e.differing.items())[:shown]:
            print(f"{e.entity} {key} differs in: {', '.join(fields)}")
        _more_keys(e.entity, "differing", len(e.differing), shown)
        for key, why in list(e.unmappable.items())[:shown]:
            print(f"{e.entity} {key} cannot be mapped: {why}")
        _more_keys(e.entity, "unmappable", len(e.unmappable), shown)
        for key, why in list(e.held.items())[:shown]:
            print(f"{e.entity} {key} {why}")
        _more_keys(e.entity, "held", len(e.held), shown)
    if result.stock is not None:
        print()
        _print_stock(result.stock, shown)
    rep = result.repair
    if rep is not None:
        print("\nRepair:")
        for entity, sid in rep.snapshots.items():
            print(f"  requested snapshot #{sid} of the drifted {entity} keys")
        for entity, keys in rep.marked_deleted.items():
            print(f"  marked {len(keys)} extra {entity} row(s) deleted in the ERP"
                  + (f": {_keys_text(keys, shown)}" if keys else
                     " (each changed since it was compared: run reconcile again)"))
        for entity, (advice, keys) in rep.not_retired.items():
            print(f"  {entity} {advice}: {_keys_text(keys, shown)}")
        left = sum(r.drift for r in rep.remaining)
        waiting = sum(len(r.missing) + len(r.differing)
                      + (0 if r.entity in rep.not_retired else len(r.extra))
                      for r in rep.remaining)
        print(f"  {'converged' if rep.converged else 'NOT converged'} after {rep.waited_s}s; "
              f"{left} key(s) still drifting" + (
                  "" if rep.converged else
                  " (is the producer running? are consumers running? unmappable keys need a "
                  "mapping fix or a CRM correction)" if waiting else
                  " (none a repair changes: see above)"))
    if result.gaps_resolved:
        print(f"\nmarked {result.gaps_resolved} Kafka offset gap(s) resolved (events deleted "
              "from a topic before they were applied: the ERP matches the CRM again)")
    held = (f"{result.held} key(s) held behind dead letters or held events (listed above; "
            "not drift: `crm-erp-sync dlq list`, then `dlq redrive` or `dlq discard`)"
            if result.held else "")
    if result.drift:
        print(f"\nDRIFT: {result.drift} key(s)" + (f"; {held}" if held else ""))
        return EXIT_ATTENTION
    print("\nNo drift." + (f" {held}." if held else ""))
    return EXIT_OK


def _more_keys(entity: str, label: str, count: int, shown: int | None) -> None:
    """The line that says a per-key list was cut at --limit (one key per line above it), so
    that 20 named of 47 does not read as all of them."""
    if shown is not None and count > shown:
        print(f"{entity} … and {count - shown} more {label} key(s) not listed "
              "(--limit 0 shows all)")


def _keys_text(keys: list[str], shown: int | None) -> str:
    more = (f" … and {len(keys) - shown} more (--limit 0 shows all)"
            if shown is not None and len(keys) > shown else "")
    return ", ".join(map(str, keys[:shown])) + more


# ---- stock ---------------------------------------------------------------------------------
def _print_stock(rc: Any, shown: int | None = 20) -> None:
    verb = "converted" if rc.repaired else "to convert"
    print(f"order lines: {rc.lines}, {verb} to base units: {rc.lines_converted}; orders whose "
          f"stock effect was {'rewritten' if rc.repaired else 'stale'}: {rc.orders_fixed}")
    for u in rc.unconvertible[:shown]:
        print(f"  {u.lines} line(s) of {u.sku} in {u.unit} count nowhere: {u.reason}")
    if rc.drift:
        print(render.table(
            ["sku", "unit", "reserved", "recounted", "issued", "recounted"],
            [(d.sku, d.base_unit if d.stored_unit == d.base_unit
              else f"{d.stored_unit or '-'} -> {d.base_unit}", d.reserved,
              d.expected_reserved, d.issued, d.expected_issued) for d in rc.drift[:shown]]))
    print(f"stock: {len(rc.drift)} SKU(s) {'corrected' if rc.repaired else 'drifting'} "
          f"({rc.seconds}s)")


def cmd_stock_recount(settings: Settings, args: argparse.Namespace) -> int:
    from service.erp.mappings import Mappings
    from service.erp.target import make_target
    from service.operator.common import connect
    from service.operator.stock import recount

    target = make_target(settings, None)
    target.close()
    if target.stock_unavailable is not None:
        print(f"crm-erp-sync: stock recount is not available with the {target.name} target: "
              f"{target.stock_unavailable}", file=sys.stderr)
        return EXIT_USAGE
    mappings = Mappings.load(settings.mappings_file)
    with connect(settings, "erp") as erp:
        rc = recount(erp, mappings, repair=not args.check)
    if args.json:
        print(render.dumps({**render.jsonable(rc), "needs_attention": rc.needs_attention}))
    else:
        _print_stock(rc)
    return EXIT_ATTENTION if rc.needs_attention else EXIT_OK


# ---- trace ---------------------------------------------------------------------------------
def cmd_trace(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.trace import trace

    known = [settings.sales_topic, settings.market_topic]
    for topic in args.topic or ():
        if topic not in known:
            raise ConfigError("--topic", f"{topic!r} is not a topic of the sync: choose from "
                                         f"{', '.join(known)}")
    t = trace(settings, args.key, topics=args.topic)
    # A named object that does not exist is exit 2 (README, "Exit codes"): a key found in
    # neither the CRM, the topics read, the ERP, the held events nor the dead letters.
    found = bool(t.crm or t.events or t.erp or t.held or t.dead_letters)
    nowhere = (f"KEY: {t.key!r} found nowhere: no CRM row, no event on "
               f"{', '.join(args.topic or known)}, no ERP row, no held event and no dead "
               "letter has this key (a typo, or a key of no captured table?)")
    if args.json:
        print(render.dumps(render.jsonable(t)))
        return _trace_code(t, found, nowhere)
    print(f"Key {t.key}\n")
    if t.crm:
        for c in t.crm:
            print(f"CRM {c['entity']} ({c['table']}):")
            print(render.table(["column", "value"], list(c["row"].items()), max_width=80))
    else:
        print("CRM: no row with this key (deleted, or not a key of any captured table)")
    if t.follows:
        print(f"\nAn order line: followed to its order {', '.join(t.follows)} (a line's "
              "changes travel in its order's events); the order's events, ERP row, held "
              "events and dead letters are shown too.")
    if t.broker_unreachable:
        print(f"\nEvents on Kafka: unknown (broker {settings.kafka_bootstrap} unreachable; "
              "held events and dead letters below are found by message key only)")
    else:
        print(f"\nEvents on Kafka ({len(t.events)} of {t.scanned} read):")
    if t.events:
        print(render.table(["topic[partition]@offset", "kind", "op", "key", "lsn", "seq",
                            "committed in the CRM", "event id"],
                           [(f"{e['topic']}[{e['partition']}]@{e['offset']}", e["kind"],
                             e["op"], e.get("event_key") or "-", e.get("lsn") or "-",
                             e.get("seq") if e.get("seq") is not None else "-",
                             render.cell(e.get("commit_time")),
                             e.get("event_id") or e.get("error", "-"))
                            for e in t.events], max_width=60))
    elif not t.broker_unreachable:
        print("  none")
    print("\nERP:")
    for r in t.erp:
        row = r["row"]
        record = f" {row['record']}" if row.get("record") else ""
        print(f"  {r['table']} ({r['as']}){record}: position lsn {row.get('source_lsn')} seq "
              f"{row.get('source_seq')}, event {row.get('event_id') or '-'}, applied "
              f"{render.cell(row.get('applied_at'))}"
              + (", DELETED" if row.get("deleted") else ""))
    if not t.erp:
        print(f"  no record with this key (ERP target {settings.erp_target})")
    print("\nHeld events:" + ("" if t.held else " none"))
    for h in t.held:
        print(f"  #{h['held_id']} {h['topic']}[{h['partition']}]@{h['offset']} {h['reason']}"
              + (f" (waits for customer {h['waits_for']})" if h["waits_for"] else "")
              + f" since {render.cell(h['held_at'])}")
    print("\nDead letters:" + ("" if t.dead_letters else " none"))
    for d in t.dead_letters:
        print(f"  #{d['dead_letter_id']} {d['topic']}[{d['partition']}]@{d['offset']} "
              f"{d['state']}: {d['error_class']}: {d['reason']}")
        for a in d["actions"]:
            print(f"    {render.cell(a['at'])} {a['action']} by {a['actor']}: {a['outcome']}"
                  + (f" ({a['reason']})" if a["reason"] else ""))
    return _trace_code(t, found, nowhere)


def _trace_code(t: Any, found: bool, nowhere: str) -> int:
    """3 when the broker did not answer (the events are unknown: README, "Exit codes"), said
    in one line on stderr; else 2 for a key found nowhere (said so), else 0."""
    if t.broker_unreachable:
        print(f"crm-erp-sync: {t.broker_unreachable}", file=sys.stderr)
        return exit_codes.UNAVAILABLE
    if not found:
        print(f"crm-erp-sync: {nowhere}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---- pause / resume (an operator's pause, the circuit breaker) -----------------------------
def _named_partitions(args: argparse.Namespace, command: str) -> list[tuple[str, int]] | None:
    from service.operator.breaker import parse_partition

    if not (args.partition or args.all):
        raise ConfigError(command, "name the partitions: --partition TOPIC:N ... or --all")
    return None if args.all else [parse_partition(p) for p in args.partition]


def _partition_objects(partitions: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """``--json``'s shape of a partition the command left as it was: the keys every other
    list's items have too (``topic``, ``partition``, ``partition_name``)."""
    return [{"topic": t, "partition": p, "partition_name": f"{t}[{p}]"}
            for t, p in partitions]


@contextlib.contextmanager
def _json_usage_errors(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json``, a usage error (ConfigError, exit 2) is also a JSON document on stdout,
    ``{"error": "ARGUMENT: PROBLEM", "exit_code": 2}``, so that a script parsing stdout gets
    one instead of nothing; the error is re-raised, so stderr and the exit code stay as
    without ``--json``."""
    try:
        yield
    except ConfigError as exc:
        if args.json:
            print(render.dumps({"error": "; ".join(f"{v}: {p}" for v, p in exc.problems),
                                "exit_code": EXIT_USAGE}))
        raise


def cmd_pause(settings: Settings, args: argparse.Namespace) -> int:
    from service.operator.breaker import pause

    with _json_usage_errors(args):
        paused, already = pause(settings, _named_partitions(args, "pause"),
                                actor=actor(args.actor), reason=args.reason)
    if args.json:
        print(render.dumps({"paused": [{**render.jsonable(p), "partition_name": p.name}
                                       for p in paused],
                            "unchanged": _partition_objects(already),
                            # deprecated (README): `unchanged` as strings, for scripts
                            "already_paused": [f"{t}[{p}]" for t, p in already]}))
        return EXIT_OK
    for p in paused:
        print(f"paused {p.name}: running consumers stop applying it within "
              f"{settings.breaker_poll_s:g}s; it stays paused across restarts until "
              "`crm-erp-sync resume`")
    for t, n in already:
        print(f"{t}[{n}] was already paused")
    return EXIT_OK


def cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    from service.consumer.policy import percent
    from service.operator.breaker import check_partitions, resume, resume_pauses

    # As Kafka Connect's resume and kafka-consumer-groups: a partition that does not exist is
    # an error (exit 2), resuming one that is not paused is a no-op that succeeds (exit 0),
    # the same for --partition as for --all with nothing paused.
    with _json_usage_errors(args):
        partitions = _named_partitions(args, "resume")
        if partitions is not None:
            check_partitions(settings, partitions)
    who = actor(args.actor)
    unpaused = resume_pauses(settings, partitions, actor=who, reason=args.reason)
    resumed, not_tripped = resume(settings, partitions, actor=who, reason=args.reason)
    was_paused = {(p.topic, p.partition) for p in unpaused}
    not_tripped = [p for p in not_tripped if p not in was_paused]
    if args.json:
        print(render.dumps({"resumed": [{**render.jsonable(t), "partition_name": t.name}
                                        for t in resumed],
                            "unpaused": [{**render.jsonable(p), "partition_name": p.name}
                                         for p in unpaused],
                            "unchanged": _partition_objects(not_tripped),
                            # deprecated (README): `unchanged` as strings, and its older
                            # name, for scripts
                            "not_paused": [f"{t}[{p}]" for t, p in not_tripped],
                            "not_tripped": [f"{t}[{p}]" for t, p in not_tripped]}))
    else:
        for p in unpaused:
            print(f"resumed {p.name} (paused {render.cell(p.paused_at)} by {p.paused_by}: "
                  f"{p.reason}); running consumers continue within "
                  f"{settings.breaker_poll_s:g}s")
        for t in resumed:
            print(f"resumed {t.name} (tripped {render.cell(t.tripped_at)}: "
                  f"{percent(t.ratio)} of {t.messages} messages were dead letters, limit "
                  f"{percent(t.max_ratio)}); running consumers continue from offset "
                  f"{t.from_offset} within {settings.breaker_poll_s:g}s")
        for topic, partition in not_tripped:
            print(f"{topic}[{partition}] was not paused; nothing to resume")
        if not resumed and not not_tripped and not unpaused:
            print("Nothing to resume: nothing is paused and no circuit breaker is open.")
    return EXIT_OK


# ---- parsers -------------------------------------------------------------------------------
def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    def parser(name: str, parent: Any, help_: str, doc: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=doc,
                                                       epilog=EPILOG, formatter_class=fmt)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = parser("status", sub, "lag, producer slot, dead letters, held events, last apply",
               "Is the sync healthy? Shows per topic/partition the consumer group's committed\n"
               "offset, end offset and lag; the producer's replication slot; pending\n"
               "snapshots; unresolved dead letters by error class; held events by reason; the\n"
               "last applied change and its end-to-end delay; partitions paused by the\n"
               "dead-letter circuit breaker (since when, measured ratio, limit, reasons).\n\n"
               "Exit 1 (needs attention) when capture stopped on a dropped, replaced or lost\n"
               "slot or publication (until `crm-erp-sync resync` ran), a dead letter is\n"
               "unresolved, the slot is missing\n"
               "or inactive (no producer), an event is held longer than ORPHAN_HOLD_S, events\n"
               "are held behind a key with no dead letter, a circuit breaker is open, or the\n"
               "total lag exceeds --max-lag.")
    p.add_argument("--max-lag", type=argtypes.count, default=10_000, metavar="EVENTS",
                   help="total lag above which status needs attention (default 10000)")
    # a missing or unreadable source profile or mappings file is reported, not refused
    p.set_defaults(func=cmd_status, reports_config_files=True)

    p = parser("trace", sub, "one key through the system: CRM row, Kafka events, ERP row, "
               "held events, dead letters",
               "Follows one key (text: 42, a UUID, a composite key as a JSON array) from the\n"
               "CRM row (through the source profile) to its events on Kafka (partition,\n"
               "offset, op, position), the ERP rows and their positions, the events held for\n"
               "it and its dead letters with what was done to them. Reads the topics from the\n"
               "beginning (seconds per million events). Prints personal data: for the\n"
               "operator's screen, not for tickets.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--topic", action="append", help="only this topic (repeatable)")
    p.set_defaults(func=_kafka_quiet(cmd_trace))

    p = parser("pause", sub, "pause consumption (all or some partitions), audited",
               "Stop applying the named partitions (or --all) in every consumer of the group,\n"
               "within CRM_ERP_SYNC_BREAKER_POLL_S; the other partitions go on. The pause is\n"
               "kept in the ERP (sync.operator_pauses: who, when, why), so it survives restarts\n"
               "and rebalances until `crm-erp-sync resume`. The consumers stay ready (/readyz\n"
               "200, state \"paused_by_operator\" with the pauses listed: a planned pause must\n"
               "not hold up rollouts); `status` lists it meanwhile, and `consume\n"
               "--until-caught-up` stops at it (exit 1). Events wait in Kafka: nothing is lost.")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--partition", action="append", metavar="TOPIC:N",
                        help="this partition (repeatable), e.g. crm.sales:1")
    target.add_argument("--all", action="store_true", help="every partition of the group")
    p.add_argument("--reason", required=True, help="why (required, audited)")
    p.add_argument("--actor", help="who (default: the login name)")
    p.set_defaults(func=_kafka_quiet(cmd_pause))

    p = parser("resume", sub, "resume paused partitions (an operator's pause, or the "
               "dead-letter circuit breaker)",
               "Ends an operator's `pause` of the named partitions, and clears the dead-letter\n"
               "circuit breaker where it tripped. A partition whose share of dead letters\n"
               "reached CRM_ERP_SYNC_BREAKER_MAX_RATIO (over at least BREAKER_MIN_MESSAGES\n"
               "messages within BREAKER_WINDOW_S) is paused; the other partitions go on.\n"
               "`status` shows which, since when, the measured ratio, the limit and the last\n"
               "reasons. Look first (`dlq list --topic T`), fix the mappings or the CRM if\n"
               "needed, then resume: running consumers continue within\n"
               "CRM_ERP_SYNC_BREAKER_POLL_S, dead-lettering the messages that tripped it.\n"
               "Audited (who, when, why) in sync.breaker_trips / sync.operator_pauses.\n"
               "A named partition that is not paused is a no-op (exit 0, said so); one the\n"
               "group does not consume is an error (exit 2).")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--partition", action="append", metavar="TOPIC:N",
                        help="this partition (repeatable), e.g. crm.sales:1")
    target.add_argument("--all", action="store_true",
                        help="every paused or tripped partition")
    p.add_argument("--reason", required=True, help="why (required, audited)")
    p.add_argument("--actor", help="who (default: the login name)")
    p.set_defaults(func=_kafka_quiet(cmd_resume))

    p = parser("replay", sub, "resync the ERP: rewind the consumer group's offsets",
               "Rewind the consumer group so the ERP is re-applied from what Kafka holds.\n\n"
               "Safe: offsets are reset only while the group has no members; with consumers\n"
               "running it refuses (exit 1) and names them. Procedure: stop the consumers,\n"
               "replay, start them. Re-applying never corrupts the ERP: each row keeps the\n"
               "source position of its change and never takes an older one.")
    p.add_argument("--topic", required=True, help="the topic to replay (e.g. crm.sales)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true",
                       help="from the oldest event the topic still holds")
    start.add_argument("--from-time", metavar="ISO8601",
                       help="the first event at or after this time (zone-less = UTC)")
    start.add_argument("--from-offset", action="append", metavar="PARTITION:OFFSET",
                       help="an explicit offset per partition (repeatable)")
    p.add_argument("--partition", type=argtypes.offset, action="append",
                   help="only this partition (repeatable; default all)")
    p.add_argument("--dry-run", action="store_true",
                   help="show committed -> new offset and what would be reprocessed (allowed "
                        "while consumers run: it changes nothing)")
    p.set_defaults(func=cmd_replay)

    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, discard",
                         description="Dead letters: what could not be applied, and why.",
                         epilog=EPILOG)
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="DLQ_COMMAND")
    p = parser("list", dsub, "list dead letters (unresolved by default)",
               "List dead letters from sync.dead_letters, oldest first. By default the\n"
               "unresolved ones (open, failed_again).")
    p.add_argument("--since", metavar="ISO8601", help="created at or after this time")
    p.add_argument("--error-type", help="error class (MappingError, DecodeError, ...) or stage "
                                        "(capture, decode, transform, apply)")
    p.add_argument("--topic", help="the original topic (crm.sales, crm.market-demand)")
    p.add_argument("--key", help="message key (the customer id for crm.sales)")
    p.add_argument("--state", action="append",
                   help="open, redriven, discarded, failed_again, superseded, or all "
                        "(repeatable)")
    p.add_argument("--field", help="the CRM field a mapping failed on (phone, address, ...)")
    p.set_defaults(func=cmd_dlq_list)

    p = parser("show", dsub, "one dead letter: headers, payload as JSON, error and trace",
               "Everything about one dead letter: its state, all headers, the payload decoded\n"
               "from Avro to JSON (read from the dead-letter topic), the error, its trace and\n"
               "the actions taken. The payload holds personal data: it is printed for the\n"
               "operator, never logged; do not paste it into tickets.")
    p.add_argument("id", type=argtypes.object_id, metavar="ID")
    p.set_defaults(func=cmd_dlq_show)

    p = parser("redrive", dsub, "re-process dead letters through the apply path",
               "Re-process dead letters through the consumer's own decode -> transform ->\n"
               "apply stages, with the mappings file as it is now (fix mappings.toml, then\n"
               "redrive). Per key in the original order; then the events held behind the key\n"
               "are applied in order. Outcome recorded: redriven, held (its customer is not in\n"
               "the ERP yet), or failed_again (with the new error); every action audited.\n"
               "Already redriven or discarded letters are refused. Exit 1 unless all succeed.\n"
               "Prints the mappings version it maps with (recorded in the audit); refuses\n"
               "(exit 2) when consumers run and none applies that version, unless --force.")
    p.add_argument("ids", type=argtypes.object_id, nargs="*", metavar="ID")
    p.add_argument("--error-type", help="all unresolved letters of this error class or stage")
    p.add_argument("--field", help="all unresolved letters whose mapping failed on this CRM "
                                   "field (phone, address, ...)")
    p.add_argument("--key", help="all unresolved letters of this message key (the customer's "
                                 "for crm.sales), in their order")
    p.add_argument("--all", action="store_true", help="all unresolved letters")
    p.add_argument("--dry-run", action="store_true",
                   help="only check that each decodes and maps with the current mappings")
    p.add_argument("--actor", help="who (default: the login name)")
    p.add_argument("--reason", help="why (recorded in the audit)")
    p.add_argument("--force", action="store_true",
                   help="redrive even with a mappings file whose version no running "
                        "consumer applies (refused without it; a warning is printed)")
    p.set_defaults(func=cmd_dlq_redrive, prints_its_report=True)  # info logs: cli.main

    p = parser("discard", dsub, "give up on dead letters (audited), releasing their key",
               "Mark dead letters discarded (the change will not reach the ERP) and apply the\n"
               "events held behind their key. Audited with actor and reason. By ID, or in bulk\n"
               "by --error-type, --field and/or --key (asks for confirmation on a terminal;\n"
               "--yes in a script; --dry-run lists what would be discarded, changes nothing).")
    p.add_argument("ids", type=argtypes.object_id, nargs="*", metavar="ID")
    p.add_argument("--error-type", help="all unresolved letters of this error class or stage")
    p.add_argument("--field", help="all unresolved letters whose mapping failed on this CRM "
                                   "field (phone, address, ...)")
    p.add_argument("--key", help="all unresolved letters of this message key (the customer's "
                                 "for crm.sales)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be discarded; change nothing")
    p.add_argument("--yes", action="store_true", help="confirm a bulk discard without asking")
    p.add_argument("--reason", required=True, help="why (required, audited)")
    p.add_argument("--actor", help="who (default: the login name)")
    p.set_defaults(func=cmd_dlq_discard, prints_its_report=True)  # info logs: cli.main

    p = parser("resync", sub, "recover from a dropped, replaced or lost slot or a dropped "
               "publication", "The one recovery when `status` says capture stopped because the\n"
               "replication slot or the publication was dropped, replaced or lost (changes made\n"
               "meanwhile cannot be read any more). Requests a snapshot of every captured\n"
               "entity, drops the broken slot, creates the publication if missing and a new\n"
               "slot (the stopped producer resumes by itself); then waits until the consumers\n"
               "applied every event already on the topics and marks deleted the ERP rows whose\n"
               "CRM row no longer exists (each only if unchanged since compared).\n\n"
               "Exit 0 done (or nothing to do), 1 the consumers did not catch up within --wait\n"
               "(run it again: it does only what is left) or the slot is held by a process.")
    p.add_argument("--wait", type=argtypes.seconds, default=300.0, metavar="SECONDS",
                   help="how long to wait for the consumers before the delete pass "
                        "(default 300)")
    p.add_argument("--chunk-size", type=argtypes.chunk_size, default=5000, metavar="N",
                   help="keys compared per query in the delete pass, "
                        f"1-{argtypes.SNAPSHOT_MAX_CHUNK} (default 5000)")
    p.set_defaults(func=cmd_resync)

    p = parser("reconcile", sub, "compare CRM and ERP on the mapped fields; --repair drift",
               "Compare the CRM and the ERP entity by entity on the mapped fields, in key-\n"
               "ordered chunks, computing the CRM side with the pipeline's own transforms.\n"
               "Reports missing (in the CRM, not the ERP), extra (in the ERP, gone from the\n"
               "CRM), differing (with the fields) and unmappable (dead-lettered) keys.\n"
               "Exit 0 no drift, 1 drift.\n\n"
               "--repair requests an ad-hoc snapshot of the missing/differing keys (a running\n"
               "producer and consumers apply it), marks extra rows deleted in the ERP (only\n"
               "if unchanged since compared), then re-checks until converged or --wait.")
    p.add_argument("--entity", action="append", choices=["customers", "orders", "demand"],
                   help="only this entity (repeatable; default all)")
    p.add_argument("--repair", action="store_true",
                   help="repair the drift found (see above), then re-check")
    p.add_argument("--chunk-size", type=argtypes.chunk_size, default=5000, metavar="N",
                   help=f"keys compared per query, 1-{argtypes.SNAPSHOT_MAX_CHUNK} (default 5000)")
    p.add_argument("--limit", type=argtypes.count, default=20, metavar="N",
                   help="keys listed per entity and kind in the table (default 20, 0 = all; "
                        "--json always lists all)")
    p.add_argument("--wait", type=argtypes.seconds, default=120.0, metavar="SECONDS",
                   help="with --repair, how long to wait for convergence (default 120)")
    p.set_defaults(func=cmd_reconcile)

    stock = sub.add_parser("stock", help="stock: a full recount",
                           description="Stock kept by the consumers, per SKU in its base unit.",
                           epilog=EPILOG)
    ssub = stock.add_subparsers(dest="stock_command", required=True, metavar="STOCK_COMMAND")
    p = parser("recount", ssub, "recount stock from every order, with the current mappings",
               "Recount stock from scratch: every order line's base quantity from its quantity\n"
               "as typed (current [measures] and [sku_units]), every order's stock effect,\n"
               "every SKU's totals and unit. Consumers apply differences incrementally; run\n"
               "this after upgrading, and after changing a SKU's base unit or a factor (stop\n"
               "the consumers, change mappings.toml, recount, start them: they refuse to start\n"
               "while totals are in another unit). Safe beside running consumers: they wait\n"
               "while the totals are rebuilt. Lines that cannot be converted are listed and\n"
               "count nowhere. Exit 1 when such lines exist (or, with --check, on drift).")
    p.add_argument("--check", action="store_true",
                   help="only report what differs; write and lock nothing")
    p.set_defaults(func=cmd_stock_recount)
