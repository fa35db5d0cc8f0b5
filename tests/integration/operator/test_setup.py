"""`crm-erp-sync setup` (idempotent) prints sentences by default and, with --json, the JSON
line scripts parse, byte for byte as before."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import SyncEnv
from tests.integration.conftest import Cli


def test_setup_prints_text_by_default_and_the_same_json_with_json(sync_env: SyncEnv,
                                                                  cli: Cli) -> None:
    settings = sync_env.settings  # set up already by the fixture: everything exists
    said = cli(settings, "setup")
    assert said.code == 0, said.err
    assert said.out.splitlines() == [
        "topics: all existed already",
        f"CRM: publication {settings.publication_name} and schema crm_erp_sync in place "
        f"(the producer creates its slot {settings.slot_name} when it first starts)",
        "ERP: schema sync in place"]
    parsed = cli(settings, "setup", "--json")
    assert parsed.code == 0, parsed.err
    assert parsed.out == '{"topics_created": [], "demo_crm_schema_created": false}\n'


@pytest.fixture
def empty_sync_db(sync_env: SyncEnv) -> Iterator[str]:
    """A new, empty sync-state database on the stack (its DSN), dropped again."""
    name = f"{sync_env.settings.consumer_group.split('.')[0]}_tryton_sync"
    with psycopg.connect(sync_env.stack.admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sync_env.stack.dsn_for(name)
    finally:
        with psycopg.connect(sync_env.stack.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {f"{s}.{t}" for s, t in conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE "
            "table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()}


def test_setup_with_the_tryton_target_creates_only_the_sync_state(
        sync_env: SyncEnv, cli: Cli, empty_sync_db: str) -> None:
    # An earlier newcomer: with the tryton target, setup made the sql ERP's empty erp.*
    # tables in the sync-state database too. Tryton need not answer for setup: nothing is
    # asked of it (the URL is a port nothing listens on).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    tryton = sync_env.with_(erp_dsn=empty_sync_db, erp_target="tryton",
                            tryton_url=f"http://127.0.0.1:{nobody}", tryton_password="unused")

    said = cli(tryton, "setup")

    assert said.code == 0, said.err
    tables = _tables(empty_sync_db)
    assert not {t for t in tables if t.startswith("erp.")}, tables
    assert said.out.splitlines()[-1] == (
        "ERP: schema sync in place (ERP target tryton: no erp.* tables, the ERP is Tryton)")
    assert {"sync.held_events", "sync.dead_letters", "sync.breaker_trips",
            "sync.consumer_membership", "sync.truncations"} <= tables, tables
    assert {t for t in tables if not t.startswith("sync.")} == set(), tables
    with psycopg.connect(empty_sync_db) as conn:
        assert conn.execute("SELECT to_regnamespace('erp')").fetchone() == (None,)
    assert cli(tryton, "setup").code == 0  # idempotent
    # The sql target's database holds both, as before.
    assert {"erp.sales_orders", "sync.held_events"} <= _tables(sync_env.settings.erp_dsn)
