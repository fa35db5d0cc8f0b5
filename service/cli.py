"""`crm-erp-sync`: a thin command-line layer over the service.

Exit codes: service/exit_codes.py (one table for every command).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from service import __version__, exit_codes, log
from service.errors import (
    ConfigError,
    PrivilegeMissing,
    SourceContractBroken,
    SourceContractError,
    StackUnavailable,
    SyncError,
)
from service.operator import argtypes
from service.settings import Settings, unknown_env_vars

if TYPE_CHECKING:
    from service.cdc.capture import Repair
    from service.setup import SetupReport

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE, EXIT_UNAVAILABLE = (
    exit_codes.OK, exit_codes.ATTENTION, exit_codes.USAGE, exit_codes.UNAVAILABLE)


def _on_sigterm(stop: Callable[[], None], shutdown_timeout_s: float | None = None) -> None:
    """SIGTERM/SIGINT call stop(); with a timeout, a watchdog exits non-zero if the process
    has not stopped by then (CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S)."""
    armed: list[object] = []

    def handler(signum: int, _frame: Any) -> None:
        structlog.get_logger("cli").info("stopping", signal=signal.Signals(signum).name)
        stop()
        if shutdown_timeout_s and not armed:
            from service.health import start_shutdown_watchdog

            armed.append(start_shutdown_watchdog(shutdown_timeout_s))

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_setup(settings: Settings, args: argparse.Namespace) -> int:
    from service.setup import run_setup

    if args.check:
        return cmd_setup_check(settings, args)
    report = run_setup(settings, demo_crm=not args.no_demo_schema)
    if args.json:  # kept byte for byte: scripts parse it
        print(json.dumps({"topics_created": report.topics_created,
                          "demo_crm_schema_created": report.demo_crm_schema},
                         ensure_ascii=False))
        for line in [*repair_lines(report), *erp_upgrade_lines(report)]:  # stdout stays as
            print(line, file=sys.stderr)  # it was; a repair or an upgrade is still said
        return EXIT_OK
    print("\n".join(setup_lines(settings, report)))
    return EXIT_OK


def setup_lines(settings: Settings, report: SetupReport) -> list[str]:
    """`setup`'s text output (without --json): what it created, what was there already."""
    return ["topics: " + (f"created {', '.join(report.topics_created)}"
                          if report.topics_created else "all existed already"),
            *(["demo CRM tables: created (the CRM had none)"] if report.demo_crm_schema
              else []),
            f"CRM: publication {settings.publication_name} and schema crm_erp_sync in place"
            + (f"; slot {settings.slot_name} exists" if report.slot_exists else
               f" (the producer creates its slot {settings.slot_name} when it first starts)"),
            *repair_lines(report),
            "ERP: schema sync in place" + (
                "" if settings.erp_target == "sql" else
                f" (ERP target {settings.erp_target}: no erp.* tables, the ERP is Tryton)"),
            *erp_upgrade_lines(report)]


def erp_upgrade_lines(report: SetupReport) -> list[str]:
    """What an upgrade of the ERP's schema leaves to do (orders applied before the column)."""
    if not report.erp_totals_added:
        return []
    return ["ERP: added erp.sales_orders.total_amount; orders applied before have none (NULL) "
            "until re-read: with a source profile that maps total_amount, run `crm-erp-sync "
            "reconcile --repair --entity orders`"]


def repair_lines(report: SetupReport) -> list[str]:
    """One line per table `setup` brought back to the profile in the publication, naming
    the snapshot it requested (or why none)."""
    out = []
    for r in report.publication_repaired:
        d = r.drift
        what = (f"added {d.table} back to publication {d.publication}" if d.missing else
                f"changed the row filter of {d.table} in publication {d.publication} from "
                f"{d.have or 'none'} to {d.want or 'none'}")
        if r.snapshot_id is not None:
            then = (f"; requested snapshot {r.snapshot_id} of it (changes made meanwhile "
                    "were not captured; the producer re-reads the table)")
        elif not report.slot_exists:
            then = "; the producer's first start snapshots every table"
        else:
            then = ""
        out.append(f"CRM: {what}{then}{_left_filter_words(r)}")
    return out


def _left_filter_words(repair: Repair) -> str:
    """What a narrower row filter leaves to do: no event retires the rows it now excludes."""
    d, n = repair.drift, repair.left_filter
    retire = ("stay live in the ERP until `crm-erp-sync reconcile --repair` marks them "
              "deleted")
    if n is None:
        return (f"; rows of {d.table} applied before that the new filter excludes (if any) "
                f"{retire} (they could not be counted)")
    if n == 0:
        return ""
    return (f"; {n} row(s) of {d.table} in the CRM pass the old filter but not the new one: "
            f"those applied before {retire}")


def cmd_setup_check(settings: Settings, args: argparse.Namespace) -> int:
    """Report the CRM's capture prerequisites (changes nothing); exit 1 if one fails."""
    from service import pg
    from service.cdc.prerequisites import check_prerequisites, render_checks
    from service.cdc.profile import load_profile

    profile = load_profile(settings.source_profile)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables \
        else profile.tables
    filters = {e.table: e.filter_columns for e in profile.entities.values()
               if e.row_filter is not None and e.table in tables}
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        checks = check_prerequisites(conn, capture_role=args.role, tables=tables,
                                     row_filter_columns=filters,
                                     publication=settings.publication_name,
                                     slot=settings.slot_name,
                                     row_filters={
                                         e.table: e.row_filter
                                         for e in profile.entities.values()
                                         if e.row_filter is not None and e.table in tables})
        if not args.tables:  # the profile's own tables: check its columns too
            checks.append(_profile_check(conn, profile))
            if checks[-1].ok:
                checks.append(_row_filter_check(conn, settings, profile))
    print(render_checks(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_ATTENTION


def _profile_check(conn: Any, profile: Any) -> Any:
    """Every table and column the source profile maps exists in the CRM (what the producer
    checks at start-up, so that it never publishes a NULL for a renamed column)."""
    from service.cdc.capture import read_table_info
    from service.cdc.prerequisites import Check

    name = f"source profile {profile.name} ({profile.path})"
    try:
        read_table_info(conn, profile)
    except SourceContractError as exc:
        return Check(name, False, f"{exc.table}.{exc.column}: {exc.problem}: rename it back, "
                                  "or map the new name in the profile")
    return Check(name, True, f"every mapped table and column exists ({len(profile.tables)} "
                             "tables)")


def _row_filter_check(conn: Any, settings: Settings, profile: Any) -> Any:
    """The publication filters each captured table with the profile's row_filter, compared
    as PostgreSQL prints both (service.cdc.capture.normalised_filters). A table missing from
    the publication is the publication check's."""
    from service.cdc.capture import publication_drift
    from service.cdc.prerequisites import Check

    name = f"row filters of publication {settings.publication_name}"
    try:
        drifts = [d for d in publication_drift(conn, settings, profile) if not d.missing]
    except (SourceContractError, PrivilegeMissing) as exc:
        return Check(name, False, f"cannot compare with the source profile: {exc}")
    if not drifts:
        return Check(name, True, "as the source profile says (or the publication is not "
                                 "created yet)")
    return Check(name, False, "; ".join(f"{d.table}: {d.problem}" for d in drifts),
                 "-- as the publication's owner: `crm-erp-sync setup` (it also re-snapshots "
                 "the tables), or:\n" + "\n".join(d.sql_fix for d in drifts)
                 + "\n-- then `crm-erp-sync snapshot --table TABLE` for each")


# net allocations of GC-tracked objects between two collections of the youngest generation
YOUNG_COLLECTION_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, schemas, the consumer's division data) into the
    garbage collector's permanent generation (``gc.freeze``), called once a long-running
    process has loaded what it keeps for life.

    Why: CPython's full collections walk every tracked object; a consumer holds ~82,000 from
    start-up (56,000 of imports, 25,000 of the GB/T 2260 division data), and each full
    collection took 16-23 ms of its loop (more on a busy machine), landing in the commit ->
    ERP latency of whatever batch was in flight. Frozen objects are never scanned (and
    never freed: they live as long as the process anyway). The collector keeps running for
    everything allocated later.

    The youngest generation is then collected every ``YOUNG_COLLECTION_THRESHOLD`` net
    allocations instead of CPython's 700. Why: each event allocates a few dozen containers
    (decoded rows, records, Kafka records) that reference counting frees at once; with 700
    the collector ran every ~20 events and, through the older generations, walked the batch
    in flight again and again. Measured over a 20,000-change catch-up (gc callbacks): the
    producer spent ~0.10 s collecting (588 young, 53 middle, 4 full collections), a consumer
    0.06 s (2.7% of its CPU); with 10,000, 0.07 s (27 young, 2 middle) and none. Cyclic
    garbage lives at most that many allocations longer."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from service.avro import SchemaRegistry
    from service.cdc.producer import CdcProducer

    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    _on_sigterm(producer.stop, settings.shutdown_timeout_s)
    freeze_startup_heap()
    stats = producer.run(until_idle=args.until_idle)
    structlog.get_logger("cli").info("producer_stopped", transactions=stats.transactions,
                                     events=stats.events, snapshot_rows=stats.snapshot_rows)
    return EXIT_OK


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from service.consumer.pipeline import ErpConsumer
    from service.erp.divisions import divisions

    consumer = ErpConsumer(settings)
    _on_sigterm(consumer.stop, settings.shutdown_timeout_s)
    divisions()  # loaded for life by the first address anyway: loaded now, to be frozen
    freeze_startup_heap()
    # SIGHUP: re-read the mappings file now (it is also checked every MAPPINGS_CHECK_S).
    signal.signal(signal.SIGHUP, lambda _signum, _frame: consumer.watcher.request_reload())
    stats = consumer.run(until_idle_s=args.until_idle, until_caught_up=args.until_caught_up)
    structlog.get_logger("cli").info("consumer_stopped", batches=stats.batches,
                                     messages=stats.messages, retries=stats.retries,
                                     applied=consumer.applier.applied,
                                     dead_lettered=consumer.applier.dead_lettered,
                                     held=consumer.applier.held,
                                     caught_up=stats.caught_up, blocked=stats.blocked)
    if stats.outside_window_until is not None:
        print("crm-erp-sync: not caught up: outside the apply window "
              f"({settings.apply_window} {settings.apply_window_tz}) until "
              f"{stats.outside_window_until.isoformat()}; the rest is applied by the next run "
              "inside the window", file=sys.stderr)
        return EXIT_ATTENTION
    if stats.blocked:
        print(f"crm-erp-sync: not caught up: {', '.join(stats.blocked)} paused, by the "
              "circuit breaker or an operator's `pause` (see `crm-erp-sync status`, then "
              "`crm-erp-sync resume`)", file=sys.stderr)
        return EXIT_ATTENTION
    return EXIT_OK


def cmd_snapshot(settings: Settings, args: argparse.Namespace) -> int:
    from service import pg
    from service.cdc.capture import (
        ensure_capture_objects,
        request_snapshot,
        snapshot_entity_named,
    )
    from service.cdc.profile import load_profile

    if args.action is not None:
        return cmd_snapshot_manage(settings, args)
    if args.table is None:
        raise ConfigError("snapshot", "give --table (a new snapshot), or `snapshot list`, "
                                      "or `snapshot cancel ID`")

    profile = load_profile(settings.source_profile)
    try:
        entity = snapshot_entity_named(profile, args.table)
    except ValueError as exc:
        raise ConfigError("--table", str(exc)) from exc
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        # the snapshots table only: a drifted publication is the producer's and setup's
        # (they re-snapshot what they repair; a repair here would lose changes silently)
        ensure_capture_objects(conn, settings, profile, repair=False)
        keys = _existing_keys(conn, profile, entity.entity, args.key) if args.key else None
        try:
            snapshot_id = request_snapshot(conn, profile, entity.entity, keys, args.chunk_size)
        except ValueError as exc:
            raise ConfigError("--key" if args.key else "--chunk-size", str(exc)) from exc
    if args.json:  # kept byte for byte: scripts parse it
        print(json.dumps({"snapshot_id": snapshot_id, "table": entity.table,
                          "keys": args.key or "all"}, ensure_ascii=False))
        return EXIT_OK
    rows = f"keys {', '.join(args.key)}" if args.key else "all rows"
    print(f"requested snapshot {snapshot_id} of {entity.table} ({rows}): the producer "
          f"publishes it in chunks of {args.chunk_size} rows while streaming; see "
          "`crm-erp-sync snapshot list`")
    return EXIT_OK


def _no_snapshot(snapshot_id: int) -> ConfigError:
    return ConfigError("ID", f"no snapshot {snapshot_id} (see `crm-erp-sync snapshot list`)")


def cmd_snapshot_manage(settings: Settings, args: argparse.Namespace) -> int:
    """`snapshot list [ID]` and `snapshot cancel ID`."""
    import psycopg

    from service import pg
    from service.cdc.capture import cancel_snapshot, list_snapshots
    from service.operator import render

    with pg.connect(settings.crm_dsn, "CRM") as conn:
        try:
            if args.action == "list":
                rows = list_snapshots(conn)
                if args.id is not None:  # `snapshot list ID`: that one
                    rows = [r for r in rows if r["snapshot_id"] == args.id]
                    if not rows:
                        raise _no_snapshot(args.id)
            else:
                if args.id is None:
                    raise ConfigError("snapshot cancel", "give the snapshot ID (see "
                                                         "`crm-erp-sync snapshot list`)")
                with conn.transaction():
                    was = cancel_snapshot(conn, args.id)
        except psycopg.errors.UndefinedTable as exc:
            raise ConfigError("CRM_ERP_SYNC_CRM_DSN", "the CRM has no crm_erp_sync.snapshots "
                              "table: run `crm-erp-sync setup` or the producer once") from exc
    if args.action == "list":
        if args.json:
            print(render.dumps(render.jsonable(rows)))
        elif not rows:
            print("No snapshots.")
        else:
            print(render.table(["id", "table", "keys", "reason", "state", "chunks", "rows",
                                "requested", "finished"],
                               [(r["snapshot_id"], r["table_name"],
                                 ", ".join(r["keys"]) if r["keys"] else "all", r["reason"],
                                 r["state"], r["chunks_done"], r["rows_emitted"],
                                 render.cell(r["requested_at"]), render.cell(r["finished_at"]))
                                for r in rows], max_width=50))
        return EXIT_OK
    if was is None:
        raise _no_snapshot(args.id)
    if was != "pending":
        print(f"crm-erp-sync: snapshot {args.id} is {was}: nothing to cancel", file=sys.stderr)
        return EXIT_ATTENTION
    print(f"cancelled snapshot {args.id}: the producer reads no further chunk of it (a "
          "chunk already read is still published)")
    return EXIT_OK


def _existing_keys(conn: Any, profile: Any, entity: str, wanted: list[str]) -> list[str]:
    """The requested keys, once each; a key that is not in the table (or outside the
    profile's row filter) is refused rather than snapshotted as nothing. Raises ConfigError
    naming the missing keys."""
    from service.cdc.capture import missing_keys

    try:
        missing = missing_keys(conn, profile, entity, wanted)
    except ValueError as exc:
        raise ConfigError("--key", str(exc)) from exc
    if missing:
        table = profile.entities[entity].table
        raise ConfigError("--key", f"no {table} row with key {', '.join(missing)}")
    return list(dict.fromkeys(wanted))


def cmd_demo_load(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.load import load_demo

    report = load_demo(settings.crm_dsn, customers=args.customers, orders=args.orders,
                       rate=args.rate, seed=args.seed, changes=args.changes)
    print(json.dumps(_as_jsonable(report), ensure_ascii=False))
    return EXIT_OK


def cmd_demo_run(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.run import run_demo

    return run_demo(settings, customers=args.customers, orders=args.orders)


def cmd_demo_bottlecrm(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.run import run_bottlecrm_demo

    return run_bottlecrm_demo(settings)


def cmd_demo_tryton(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.tryton import run_tryton_demo

    return run_tryton_demo(settings, customers=args.customers, orders=args.orders)


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    from service.settings import origins

    shown = settings.redacted()
    where = origins() if args.show_origin else {}
    if args.json:
        print(json.dumps({k: {"value": v, "origin": where[k]} for k, v in shown.items()}
                         if args.show_origin else shown, indent=2))
    else:
        width = max(map(len, shown))
        vwidth = max(len(str(v)) for v in shown.values()) if args.show_origin else 0
        for name, value in shown.items():
            print(f"{name:<{width}}  {value:<{vwidth}}  {where[name]}".rstrip()
                  if args.show_origin else f"{name:<{width}}  {value}")
    # The source profile and the mappings file are configuration too: a broken one is named
    # (setting, file and key) here, not first by a producer or consumer that will not start.
    from service.operator.status import config_file_problems

    problems = config_file_problems(settings)
    for problem in problems:
        print(f"crm-erp-sync: error: {problem}", file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK


def _as_jsonable(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _as_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _as_jsonable(v) for k, v in value.items()}
    return value


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser that refuses its own unknown arguments with its own usage line.

    Why not plain argparse: a subparser hands what it does not know up to the top-level
    parser, whose error shows ``usage: crm-erp-sync [-h] [--version] COMMAND ...``, naming
    none of the subcommand's options (``stock recount --bogus``)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None  # type: ignore[override]
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crm-erp-sync",
        description="Real-time CRM -> ERP synchronisation over Apache Kafka. Every setting is an "
                    "environment variable (see `crm-erp-sync config`); the defaults point at the "
                    "local stack started by `make up`.",
        epilog=exit_codes.EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Subcommand)

    p = sub.add_parser("setup", help="create topics, the CRM capture objects and the ERP schema")
    p.add_argument("--no-demo-schema", action="store_true",
                   help="do not create the demo CRM tables when the CRM has none")
    p.add_argument("--check", action="store_true",
                   help="only check the CRM's capture prerequisites (wal_level, slots, replica "
                        "identity, the capture role's rights, row-level security) and print "
                        "the SQL that fixes each failure; changes nothing; exit 1 if one fails")
    p.add_argument("--tables", metavar="A,B",
                   help="with --check: the captured tables (schema.table, comma-separated); "
                        "default: the source profile's (CRM_ERP_SYNC_SOURCE_PROFILE), whose "
                        "columns are then checked too")
    p.add_argument("--role", metavar="ROLE",
                   help="with --check: the capture role to check (default: the CRM DSN's user)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (not with --check, which prints its table)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("produce", help="capture CRM changes from the WAL and publish them")
    p.add_argument("--until-idle", action="store_true",
                   help="exit once the slot is drained and no snapshot is pending")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("consume", help="apply CRM events to the ERP (a consumer-group member)")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--until-idle", type=argtypes.seconds, metavar="SECONDS",
                       help="exit after this many seconds without messages")
    until.add_argument("--until-caught-up", action="store_true",
                       help="apply everything up to the end offsets seen at start, then exit 0 "
                            "(for an hourly or daily sync from a scheduler); exit 1 if the "
                            "circuit breaker or an operator's `pause` keeps a partition "
                            "paused, or the apply window (CRM_ERP_SYNC_APPLY_WINDOW) is "
                            "closed")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("snapshot", help="re-snapshot a CRM table (or some keys) while "
                       "streaming; `snapshot list`, `snapshot cancel ID`")
    p.add_argument("action", nargs="?", choices=["list", "cancel"],
                   help="list the snapshot requests (newest first), or cancel a pending one")
    p.add_argument("id", nargs="?", type=argtypes.object_id, metavar="ID",
                   help="the snapshot: the one to cancel, or the one to list")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (a new snapshot, or list)")
    p.add_argument("--table",
                   help="an entity (customer, order, market_demand) or its CRM table")
    p.add_argument("--key", action="append",
                   help="only this key, as text (repeatable; a composite key is a JSON array)")
    p.add_argument("--chunk-size", type=argtypes.chunk_size, default=1000,
                   help=f"rows per chunk, 1-{argtypes.SNAPSHOT_MAX_CHUNK} (default 1000)")
    p.set_defaults(func=cmd_snapshot)

    demo = sub.add_parser("demo", help="the demo CRM: load data, or run the whole pipeline")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="DEMO_COMMAND")
    p = demo_sub.add_parser("load", help="write realistic CRM data, then a mix of changes")
    p.add_argument("--customers", type=argtypes.count, default=1000,
                   help="customers to write (default 1000)")
    p.add_argument("--orders", type=argtypes.count, default=2000,
                   help="orders to write, spread over the customers (default 2000)")
    p.add_argument("--rate", type=argtypes.rate,
                   help="changes per second (default: as fast as possible)")
    p.add_argument("--changes", type=argtypes.count,
                   help="follow-up changes (default: about a third)")
    p.add_argument("--seed", type=int, default=2023,
                   help="random seed: the same seed writes the same data (default 2023)")
    p.set_defaults(func=cmd_demo_load)
    p = demo_sub.add_parser("run", help="load, produce, consume with two replicas, report")
    p.add_argument("--customers", type=argtypes.count, default=500,
                   help="customers to load (default 500)")
    p.add_argument("--orders", type=argtypes.count, default=1000,
                   help="orders to load (default 1000)")
    p.set_defaults(func=cmd_demo_run)
    p = demo_sub.add_parser("bottlecrm", help="the pipeline on a real BottleCRM (installs it)")
    p.set_defaults(func=cmd_demo_bottlecrm)
    p = demo_sub.add_parser("tryton",
                            help="the pipeline with Tryton as the ERP (make tryton first)")
    p.add_argument("--customers", type=argtypes.count, default=20,
                   help="customers to load (default 20)")
    p.add_argument("--orders", type=argtypes.count, default=30,
                   help="orders to load (default 30)")
    p.set_defaults(func=cmd_demo_tryton)

    from service.operator.commands import register as register_operator_commands

    register_operator_commands(sub)  # status, replay, dlq, reconcile

    p = sub.add_parser("config", help="print the effective configuration, secrets hidden")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--show-origin", action="store_true",
                   help="say where each value comes from: env (a CRM_ERP_SYNC_* variable), "
                        "file PATH (CRM_ERP_SYNC_CONFIG_FILE) or default")
    p.set_defaults(func=cmd_config)
    return parser


# glibc's mallopt parameter number for the arena limit (malloc.h); read with MALLOC_ARENA_MAX.
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas at `arenas` for the threads this process starts from now on
    (``mallopt(M_ARENA_MAX)``), unless ``MALLOC_ARENA_MAX`` is set (glibc then read it at
    start). True when the cap was set; False on another C library or when the variable rules.

    Why: glibc gives threads their own arenas (up to 8 per core), each keeping its own free
    memory; kafka-python's sender and heartbeat threads and the health server made a process
    ~1-1.5 MiB larger, against issue #13's memory target (docs/DESIGN.md, "Memory"). Our
    threads allocate little and mostly under the GIL, so one arena costs no measurable CPU.
    Set here, in the entry point every deployment runs, so production gets it too.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    try:
        # `status` names a missing or unreadable profile or mappings file under NEEDS
        # ATTENTION (config_file_problems) rather than refusing to run.
        settings = Settings.from_env(
            files_reported=getattr(args, "reports_config_files", False))
    except ConfigError as exc:
        for variable, problem in exc.problems:  # every one found, one per line
            print(f"crm-erp-sync: configuration error: {variable}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    level = settings.log_level
    if getattr(args, "prints_its_report", False) and level.lower() == "info":
        # `dlq redrive`/`discard` run the consumer's apply code in this process: its info
        # lines (held_events_released, events_held) say what the printed report says, as
        # JSON objects on the operator's terminal after the table. Warnings still show, and
        # CRM_ERP_SYNC_LOG_LEVEL=debug still shows everything.
        level = "warning"
    log.configure(level, settings.log_format)
    for name, closest in unknown_env_vars():
        structlog.get_logger("cli").warning(
            "unknown_setting_ignored", variable=name, did_you_mean=closest,
            hint="see `crm-erp-sync config` for every setting")
    try:
        code: int = args.func(settings, args)
        # Flushed here, not at exit: a reader that went away (`| head`) shows up as
        # BrokenPipeError inside this try, where it ends the command quietly.
        sys.stdout.flush()
        return code
    except BrokenPipeError as exc:
        if _stdout_pipe_closed():
            return _stdout_closed()
        # a library's socket or pipe (the broker's, a database's, an ERP's): a fault to
        # report like any other unexpected one, never the quiet end of `| head`
        _report_bug(exc)
        return EXIT_ATTENTION
    except ConfigError as exc:
        for variable, problem in exc.problems:
            print(f"crm-erp-sync: {variable}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StackUnavailable as exc:
        print(f"crm-erp-sync: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SourceContractError as exc:  # the CRM and the source profile disagree: fix either
        fix = f"; fix: {exc.fix}" if isinstance(exc, SourceContractBroken) else ""
        print(f"crm-erp-sync: {exc}{fix} (fix the CRM or the source profile "
              f"CRM_ERP_SYNC_SOURCE_PROFILE; `crm-erp-sync setup --check` shows every "
              "mismatch)", file=sys.stderr)
        return EXIT_USAGE
    except SyncError as exc:
        print(f"crm-erp-sync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except Exception as exc:  # a bug, not a fault: say where, never what
        refused = _privilege_refused(exc)
        if refused is not None:
            print(refused, file=sys.stderr)
            return EXIT_USAGE
        _report_bug(exc)
        return EXIT_ATTENTION


def _privilege_refused(exc: BaseException) -> str | None:
    """The line to print when a database refused a privilege the command needs (SQLSTATE
    42501, ``InsufficientPrivilege``), else None. That is configuration (a grant, an owner),
    not a bug: exit 2 naming it, not an anonymous ``unexpected_error``. PostgreSQL's primary
    message names only the object and the privilege ("permission denied for schema
    crm_erp_sync", "must be owner of table accounts"), never a row's values, so it is
    printed; nothing else of the exception is."""
    import psycopg  # every database command has imported it already; `--help` need not

    if not isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return None
    primary = exc.diag.message_primary or "permission denied"
    # Either database: the CRM's capture role or the consumer's ERP role (newcomer9 F6: an
    # ERP refusal was given the CRM's advice alone).
    return (f"crm-erp-sync: a database refused a privilege this command needs: {primary}; "
            "for the CRM, `crm-erp-sync setup --check --role ROLE` prints the grants the "
            "capture role needs, and `setup` itself must run as the captured tables' owner "
            "or a superuser; for the ERP, README (Deployment, \"Secure transport and least "
            "privilege\") lists the consumer's ERP grants")


def _stdout_pipe_closed() -> bool:
    """Whether our stdout's reader is gone: polling its descriptor reports POLLERR (a pipe
    whose read end is closed) or POLLHUP (a socket whose peer hung up). A BrokenPipeError
    says only that *some* pipe or socket broke; this tells ours from a library's. False
    when stdout has no descriptor (replaced in a test) or is a file or a terminal."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)  # POLLERR and POLLHUP are reported regardless
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def _stdout_closed() -> int:
    """The reader of our stdout went away (``crm-erp-sync dlq list | head``): end quietly, as
    a Unix tool killed by SIGPIPE does, with its exit code 141 (128 + SIGPIPE). Python ignores
    SIGPIPE, so this is the "Note on SIGPIPE" of the signal module's documentation: point
    stdout at devnull so the interpreter's own flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (replaced in a test)
        pass
    finally:
        os.close(devnull)
    return exit_codes.BROKEN_PIPE


def _report_bug(exc: Exception) -> None:
    """One JSON line for an unexpected exception: its class and the innermost frames
    (file, line, function). Neither the message nor the locals are printed: a library's
    message can quote a CRM row (``ValueError: Invalid isoformat string: '...'``)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    line = {"event": "unexpected_error", "level": "critical", "error": type(exc).__name__,
            "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]}
    print(json.dumps(line), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
