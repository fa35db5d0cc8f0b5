"""`crm-erp-sync`: a thin command-line layer over the service.

Exit codes: service/exit_codes.py (one table for every command).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from service import __version__, exit_codes, log
from service.errors import ConfigError, StackUnavailable, SyncError
from service.settings import Settings, unknown_env_vars

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

    report = run_setup(settings, demo_crm=not args.no_demo_schema)
    print(json.dumps({"topics_created": report.topics_created,
                      "demo_crm_schema_created": report.demo_crm_schema}, ensure_ascii=False))
    return EXIT_OK


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from service.avro import SchemaRegistry
    from service.cdc.producer import CdcProducer

    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    _on_sigterm(producer.stop, settings.shutdown_timeout_s)
    stats = producer.run(until_idle=args.until_idle)
    structlog.get_logger("cli").info("producer_stopped", transactions=stats.transactions,
                                     events=stats.events, snapshot_rows=stats.snapshot_rows)
    return EXIT_OK


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from service.consumer.pipeline import ErpConsumer

    consumer = ErpConsumer(settings)
    _on_sigterm(consumer.stop, settings.shutdown_timeout_s)
    stats = consumer.run(until_idle_s=args.until_idle, until_caught_up=args.until_caught_up)
    structlog.get_logger("cli").info("consumer_stopped", batches=stats.batches,
                                     messages=stats.messages, retries=stats.retries,
                                     applied=consumer.applier.applied,
                                     dead_lettered=consumer.applier.dead_lettered,
                                     held=consumer.applier.held,
                                     caught_up=stats.caught_up, blocked=stats.blocked)
    if stats.blocked:
        print("crm-erp-sync: not caught up: the circuit breaker keeps "
              f"{', '.join(stats.blocked)} paused (see `crm-erp-sync status`, then "
              "`crm-erp-sync resume`)", file=sys.stderr)
        return EXIT_ATTENTION
    return EXIT_OK


def cmd_snapshot(settings: Settings, args: argparse.Namespace) -> int:
    from service import pg
    from service.cdc.capture import ensure_capture_objects, request_snapshot

    table = args.table if "." in args.table else f"crm.{args.table}"
    with pg.connect(settings.crm_dsn, "CRM") as conn:
        ensure_capture_objects(conn, settings)
        keys = _existing_keys(conn, table, args.key) if args.key else None
        try:
            snapshot_id = request_snapshot(conn, table, keys, args.chunk_size)
        except ValueError as exc:
            raise ConfigError("--table", str(exc)) from exc
    print(json.dumps({"snapshot_id": snapshot_id, "table": table, "keys": args.key or "all"}))
    return EXIT_OK


def _existing_keys(conn: Any, table: str, wanted: list[str]) -> list[Any]:
    """The requested keys as the CRM stores them (whatever the key column's type); a key
    that is not in the table is refused (ConfigError) rather than snapshotted as nothing."""
    from psycopg import sql

    from service.cdc.capture import CAPTURED, SNAPSHOT_TABLES

    if table not in SNAPSHOT_TABLES:
        raise ConfigError("--table", f"cannot snapshot {table!r}: choose one of "
                                     f"{', '.join(SNAPSHOT_TABLES)}")
    column = sql.Identifier(CAPTURED[table].key[0])
    schema, name = table.split(".", 1)
    rows = conn.execute(sql.SQL("SELECT {k}, {k}::text FROM {t} WHERE {k}::text = ANY(%s)")
                        .format(k=column, t=sql.Identifier(schema, name)),
                        (sorted(set(wanted)),)).fetchall()
    found = {text: native for native, text in rows}
    missing = [k for k in dict.fromkeys(wanted) if k not in found]
    if missing:
        raise ConfigError("--key", f"no {table} row with {CAPTURED[table].key[0]} "
                                   f"{', '.join(missing)}")
    return [found[k] for k in dict.fromkeys(wanted)]


SNAPSHOT_MAX_CHUNK = 100_000


def _chunk_size(text: str) -> int:
    """Rows per snapshot chunk: 1..SNAPSHOT_MAX_CHUNK (a chunk is one query and one window
    between watermarks; 0 or less would never finish, a huge one holds a long snapshot)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if not 1 <= value <= SNAPSHOT_MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"must be 1-{SNAPSHOT_MAX_CHUNK}, got {value}")
    return value


def cmd_demo_load(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.load import load_demo

    report = load_demo(settings.crm_dsn, customers=args.customers, orders=args.orders,
                       rate=args.rate, seed=args.seed, changes=args.changes)
    print(json.dumps(_as_jsonable(report), ensure_ascii=False))
    return EXIT_OK


def cmd_demo_run(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo.run import run_demo

    return run_demo(settings, customers=args.customers, orders=args.orders)


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    shown = settings.redacted()
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(map(len, shown))
        for name, value in shown.items():
            print(f"{name:<{width}}  {value}")
    return EXIT_OK


def _as_jsonable(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _as_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _as_jsonable(v) for k, v in value.items()}
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crm-erp-sync",
        description="Real-time CRM -> ERP synchronisation over Apache Kafka. Every setting is an "
                    "environment variable (see `crm-erp-sync config`); the defaults point at the "
                    "local stack started by `make up`.",
        epilog=exit_codes.EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("setup", help="create topics, the CRM capture objects and the ERP schema")
    p.add_argument("--no-demo-schema", action="store_true",
                   help="do not create the demo CRM tables when the CRM has none")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("produce", help="capture CRM changes from the WAL and publish them")
    p.add_argument("--until-idle", action="store_true",
                   help="exit once the slot is drained and no snapshot is pending")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("consume", help="apply CRM events to the ERP (a consumer-group member)")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--until-idle", type=float, metavar="SECONDS",
                       help="exit after this many seconds without messages")
    until.add_argument("--until-caught-up", action="store_true",
                       help="apply everything up to the end offsets seen at start, then exit 0 "
                            "(for an hourly or daily sync from a scheduler); exit 1 if the "
                            "circuit breaker keeps a partition paused")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("snapshot", help="re-snapshot a CRM table (or some keys) while streaming")
    p.add_argument("--table", required=True, help="customers, sales_orders or market_demand")
    p.add_argument("--key", action="append",
                   help="only this primary key (repeatable); a key not in the table is refused")
    p.add_argument("--chunk-size", type=_chunk_size, default=1000,
                   help=f"rows per chunk, 1-{SNAPSHOT_MAX_CHUNK} (default 1000)")
    p.set_defaults(func=cmd_snapshot)

    demo = sub.add_parser("demo", help="the demo CRM: load data, or run the whole pipeline")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="DEMO_COMMAND")
    p = demo_sub.add_parser("load", help="write realistic CRM data, then a mix of changes")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--rate", type=float, help="changes per second (default: as fast as possible)")
    p.add_argument("--changes", type=int, help="follow-up changes (default: about a third)")
    p.add_argument("--seed", type=int, default=2023)
    p.set_defaults(func=cmd_demo_load)
    p = demo_sub.add_parser("run", help="load, produce, consume with two replicas, report")
    p.add_argument("--customers", type=int, default=500)
    p.add_argument("--orders", type=int, default=1000)
    p.set_defaults(func=cmd_demo_run)

    from service.operator.commands import register as register_operator_commands

    register_operator_commands(sub)  # status, replay, dlq, reconcile

    p = sub.add_parser("config", help="print the effective configuration, secrets hidden")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"crm-erp-sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.configure(settings.log_level, settings.log_format)
    for name, closest in unknown_env_vars():
        structlog.get_logger("cli").warning(
            "unknown_setting_ignored", variable=name, did_you_mean=closest,
            hint="see `crm-erp-sync config` for every setting")
    try:
        code: int = args.func(settings, args)
        return code
    except ConfigError as exc:
        print(f"crm-erp-sync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StackUnavailable as exc:
        print(f"crm-erp-sync: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SyncError as exc:
        print(f"crm-erp-sync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
