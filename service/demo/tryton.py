"""`make demo-tryton`: the whole pipeline with Tryton as the ERP, then what Tryton holds.

A Tryton database ``tryton_demo`` is cloned from the template that deploy/tryton/install.sh
builds and served by deploy/tryton/server.sh on loopback; the demo CRM (its own database),
its own topics, slot and consumer group, and a sync-state database (held events, dead
letters, positions) of its own. One producer and two consumers (``CRM_ERP_SYNC_ERP_TARGET=
tryton``) run as real processes; the demo waits, with deadlines, until everything is through
and prints Tryton's parties, sales by state, shipments and the outgoing moves per SKU, read
over JSON-RPC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from service import pg
from service.demo.load import load_demo
from service.demo.run import (
    _environment,
    _with_database,
    print_sync_state,
    running_pipeline,
    wait_caught_up,
    wait_for_slot,
)
from service.erp.tryton import PositionStore, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.settings import REPO_ROOT, Settings
from service.setup import run_setup

TRYTON_DB = "tryton_demo"


def template_name() -> str:
    """The Tryton template database deploy/tryton/install.sh builds for this checkout:
    ``TRYTON_TEMPLATE_DB``, else ``tryton_template_`` + the first 8 hex digits of the sha1
    of the checkout's path. Per checkout because the template holds the checkout's own
    passwords (``.stack/tryton/*.pass``) and a PostgreSQL may serve several checkouts."""
    override = os.environ.get("TRYTON_TEMPLATE_DB")
    if override:
        return override
    digest = hashlib.sha1(str(REPO_ROOT).encode(), usedforsecurity=False).hexdigest()
    return f"tryton_template_{digest[:8]}"


TEMPLATE = template_name()
STATE = REPO_ROOT / ".stack" / "tryton"
SERVER = REPO_ROOT / "deploy" / "tryton" / "server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh_databases(settings: Settings, names: list[str], template: dict[str, str]) -> None:
    with pg.connect(settings.crm_dsn, "CRM") as admin:
        for db in names:
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                          " WHERE database = %s AND NOT active", (db,))
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            source = f' TEMPLATE "{template[db]}"' if db in template else ""
            admin.execute(f'CREATE DATABASE "{db}"{source}')


def demo_settings(settings: Settings, port: int, run: str = "") -> Settings:
    """The demo's own CRM, sync-state database, topics, slot and group, and Tryton. ``run``
    names this run's topics and group: a re-run must not consume an earlier run's events
    (its CRM and sync-state databases are new, the broker's topics are not)."""
    tag = f"tryton-demo{run}"
    return dataclasses.replace(
        settings, crm_dsn=_with_database(settings.crm_dsn, "crm_tryton_demo"),
        erp_dsn=_with_database(settings.erp_dsn, "sync_tryton_demo"),
        erp_target="tryton", tryton_url=f"http://127.0.0.1:{port}",
        tryton_database=TRYTON_DB, tryton_user="crm_sync",
        tryton_password=(STATE / "sync.pass").read_text().strip(),
        sales_topic=f"{tag}.crm.sales", market_topic=f"{tag}.crm.market-demand",
        dlq_topic=f"{tag}.dlq", consumer_group=f"{tag}-erp",
        slot_name="tryton_demo", publication_name="tryton_demo", source_profile="demo",
        batch_max_wait_ms=200)


def run_tryton_demo(settings: Settings, *, customers: int, orders: int) -> int:
    logs = REPO_ROOT / ".stack" / "demo-tryton"
    if not (STATE / "sync.pass").exists():
        print("demo: Tryton is not installed: run `make tryton` (deploy/tryton/install.sh)",
              file=sys.stderr)
        return 2
    port = _free_port()
    demo = demo_settings(settings, port, time.strftime("-%Y%m%d-%H%M%S"))
    print(f"Tryton: database {TRYTON_DB} cloned from {TEMPLATE}, server on 127.0.0.1:{port}")
    _fresh_databases(settings, [TRYTON_DB, "crm_tryton_demo", "sync_tryton_demo"],
                     {TRYTON_DB: TEMPLATE})
    logs.mkdir(parents=True, exist_ok=True)
    started = subprocess.run(["bash", str(SERVER), "start", TRYTON_DB, str(port)],
                             capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        print(f"demo: trytond did not start:\n{started.stderr[-2000:]}", file=sys.stderr)
        return 1
    try:
        print(f"setup: topics, CRM capture objects, sync-state database (logs in {logs})")
        run_setup(demo)
        env = {**_environment(demo), "CRM_ERP_SYNC_ON_SLOT_LOST": "resnapshot"}
        with running_pipeline(logs, env) as procs:
            if not _load_and_wait(demo, procs, logs, customers, orders):
                return 1
            print_tryton_summary(demo)
            print_reconcile(demo)
            return 0
    finally:
        subprocess.run(["bash", str(SERVER), "stop", TRYTON_DB], capture_output=True,
                       timeout=60)
        print(f"\n(Tryton stopped; serve the demo database again with: deploy/tryton/server.sh "
              f"start {TRYTON_DB} {port})")


def _load_and_wait(demo: Settings, procs: list[subprocess.Popen[bytes]], logs: Path,
                   customers: int, orders: int) -> bool:
    if not wait_for_slot(demo, procs, logs):
        return False
    started = time.monotonic()
    report = load_demo(demo.crm_dsn, customers=customers, orders=orders, rate=None,
                       seed=int(time.time()), changes=customers // 2, market_demand=0)
    print(f"CRM: loaded {report}")
    print("waiting for the producer and both consumers (tryton target) to catch up ...")
    if not wait_caught_up(demo, procs, logs, "the changes", started=started, timeout_s=600):
        return False
    print()
    return True


def print_tryton_summary(demo: Settings) -> None:
    """Parties, sales by state, shipments and outgoing moves per SKU, over JSON-RPC; then the
    sync state (dead letters with reasons, held events)."""
    rpc = TrytonRPC(demo.tryton_url, demo.tryton_database, demo.tryton_user,
                    demo.tryton_password)
    tryton = TrytonTarget(rpc, PositionStore(demo.erp_dsn))
    try:
        ctx = {"active_test": False}
        parties = rpc.execute("party.party", "search_read", [("code", "like", "CRM-%")], 0,
                              None, [("code", "ASC")], ["code", "active"], context=ctx)
        active = sum(1 for p in parties if p["active"])
        print(f"Tryton parties from the CRM: {len(parties)} ({active} active, "
              f"{len(parties) - active} deactivated by CRM deletes)")
        sample = tryton.read_parties([str(p["code"])[4:] for p in parties[:5]])
        for key, p in sorted(sample.items(), key=lambda kv: kv[1].code):
            name = p.name[:1] + "*" * max(1, len(p.name) - 1)
            phone = (p.phone or "-")[:6] + "****" if p.phone else "-"
            print(f"  {p.code:<10} {name:<6} {p.subdivision or '-':<6} {p.city or '-':<8} "
                  f"phone {phone}  crm key {key}")
        web_ids = [str(s["web_id"]) for s in rpc.execute(
            "sale.sale", "search_read", [("web_shop", "=", tryton.shop_id)], 0, None,
            [("web_id", "ASC")], ["web_id"])]
        sales = tryton.read_sales(web_ids)
        print(f"\nsales in web shop CRM: {len(sales)}")
        by_state = Counter((s.state, s.shipment_state) for s in sales.values())
        for (state, shipment_state), n in sorted(by_state.items()):
            print(f"  {n:>4} {state:<11} shipment {shipment_state}")
        for s in list(sales.values())[:3]:
            lines = "; ".join(f"{q:g} x {sku} @ {price}" for _, sku, q, price in s.lines)
            print(f"  e.g. {s.number or '-'} (CRM order {s.web_id}) {s.state}: {lines}")
        shipments = Counter(state for s in sales.values() for _, state in s.shipments)
        print("\ncustomer shipments: " + (", ".join(
            f"{n} {state}" for state, n in sorted(shipments.items())) or "none"))
        per_sku: dict[str, Counter[str]] = defaultdict(Counter)
        for s in sales.values():
            for m in s.moves:
                per_sku[m.sku][f"{m.from_location}->{m.to_location} {m.state}"] += int(
                    m.quantity)
        print("outgoing stock moves per SKU (quantity by route and state):")
        for sku in sorted(per_sku):
            detail = ", ".join(f"{q} {k}" for k, q in sorted(per_sku[sku].items()))
            print(f"  {sku:<12} {detail}")
        if not per_sku:
            print("  none")
    finally:
        tryton.close()
    with pg.connect(demo.erp_dsn, "sync-state") as conn:
        print_sync_state(conn)


def print_reconcile(demo: Settings) -> None:
    """`reconcile` against Tryton: what the CRM holds that Tryton does not (or differently)."""
    from service.operator.reconcile import reconcile

    report = reconcile(demo)
    print("\nreconcile (CRM vs Tryton, through the tryton target):")
    for r in report.entities:
        print(f"  {r.entity:<10} crm {r.crm_rows:>4}  tryton {r.erp_rows:>4}  missing "
              f"{len(r.missing)}  extra {len(r.extra)}  differing {len(r.differing)}  "
              f"unmappable {len(r.unmappable)}")
    print("  (missing: the events Tryton refused, dead-lettered above)" if report.drift
          else "  no drift")
