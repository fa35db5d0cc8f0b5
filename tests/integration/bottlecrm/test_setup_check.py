"""`setup --check` on a real CRM: BottleCRM forces row-level security, so a capture role
without BYPASSRLS would snapshot zero rows; the check refuses it and prints the SQL that fixes
it, and after that SQL it passes. The demo CRM passes as it is."""

from __future__ import annotations

import dataclasses
import uuid
from importlib import resources
from typing import Any

import psycopg
import pytest

from service.cdc import slot_guard
from service.cdc.capture import WATERMARK_TABLE, ensure_capture_objects
from service.cdc.prerequisites import Check, check_prerequisites, fix_script
from service.cdc.profile import load_profile
from service.demo.bottlecrm import Role
from service.errors import PrivilegeMissing
from service.exit_codes import ATTENTION as EXIT_ATTENTION
from service.exit_codes import OK as EXIT_OK
from service.exit_codes import USAGE as EXIT_USAGE
from service.settings import Settings
from tests.conftest import BottleCrmDb, Stack
from tests.integration.conftest import Cli

pytestmark = pytest.mark.timeout(1500)  # the first test of a session may build the template

TABLES = ["public.accounts", "public.contacts", "public.orders", "public.order_line_item",
          "public.product"]
ROW_FILTER = {"public.orders": ["org_id"], "public.order_line_item": ["org_id"],
              "public.accounts": ["id"]}  # the primary key: in the DEFAULT identity too


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _check(conn: Any, tables: list[str], row_filter: dict[str, list[str]],
           tag: str) -> list[Check]:
    return check_prerequisites(conn, capture_role=None, tables=tables,
                               row_filter_columns=row_filter, publication=f"pub_{tag}",
                               slot=f"slot_{tag}")


def test_a_capture_role_without_bypassrls_is_refused_until_the_printed_sql_is_run(
        bottlecrm_db: BottleCrmDb, capture_role: Role, cli: Cli) -> None:
    w = bottlecrm_db.writer
    org = w.create_org("演示贸易有限公司")
    account = w.create_account(org, "张三五金店")
    product = w.create_product(org, "SKU-1", "服务器", 5000)
    w.create_order(org, account, [{"product": product, "quantity": 10}])
    role_dsn = capture_role.dsn(bottlecrm_db.dsn)
    q = f'"{capture_role.name}"'

    with psycopg.connect(role_dsn, autocommit=True) as conn:  # checked as the role itself
        before = _by_name(_check(conn, TABLES, ROW_FILTER, capture_role.name))
    assert before["wal_level"].ok and before[f"capture role {capture_role.name}"].ok
    rls = before["row-level security"]
    assert not rls.ok
    assert rls.fix_sql == f"ALTER ROLE {q} BYPASSRLS;"
    assert "silently reads zero rows" in rls.detail
    assert all(f"{t} (forced)" in rls.detail for t in TABLES)
    for table in TABLES:
        assert not before[f"replica identity {table}"].ok
        assert before[f"replica identity {table}"].fix_sql == (
            f'ALTER TABLE "public"."{table.split(".")[1]}" REPLICA IDENTITY FULL;')
        assert not before[f"read access {table}"].ok
    assert before["read access public.orders"].fix_sql == (
        f'GRANT SELECT ON TABLE "public"."orders" TO {q};')  # PUBLIC has USAGE on public
    assert not before["row filter public.orders"].ok
    assert before["row filter public.accounts"].ok
    assert not before["producer schema crm_erp_sync"].ok
    assert before["producer schema crm_erp_sync"].fix_sql == (
        f'GRANT CREATE ON DATABASE "{bottlecrm_db.name}" TO {q};')

    # An administrator checking on the role's behalf sees the same.
    with bottlecrm_db.connect() as admin:
        on_behalf = check_prerequisites(
            admin, capture_role=capture_role.name, tables=TABLES,
            row_filter_columns={"public.orders": ["no_such_column"]},
            publication="p", slot="s")
    assert _by_name(on_behalf)["row-level security"] == rls
    assert _by_name(on_behalf)["row filter public.orders"] == Check(
        "row filter public.orders", False, "no column(s) no_such_column on the table")

    # The CLI prints the same and exits 1.
    # Slot names are cluster-wide: the default one may belong to `make demo`'s database.
    as_role = dataclasses.replace(Settings(), crm_dsn=role_dsn,
                                  slot_name=f"slot_{capture_role.name}",
                                  publication_name=f"pub_{capture_role.name}")
    refused = cli(as_role, "setup", "--check", "--tables", ",".join(TABLES))
    assert refused.code == EXIT_ATTENTION
    printed = refused.out
    assert f"✗ row-level security: {capture_role.name} is subject to row-level security" \
        in printed
    assert f"    ALTER ROLE {q} BYPASSRLS;" in printed.splitlines()

    # The DBA runs exactly the printed SQL; then everything passes.
    with psycopg.connect(bottlecrm_db.dsn, autocommit=True) as admin:
        for statement in fix_script(list(before.values())).splitlines():
            admin.execute(statement)
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        after = _check(conn, TABLES, ROW_FILTER, capture_role.name)
        assert [c for c in after if not c.ok] == []
        # ...and what the check was about: the role now reads the rows a snapshot needs.
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
    assert cli(as_role, "setup", "--check", "--tables", ",".join(TABLES)).code == EXIT_OK


def test_without_bypassrls_the_snapshot_would_read_nothing(
        bottlecrm_db: BottleCrmDb, capture_role: Role) -> None:
    """What the RLS check guards against, shown on the real CRM: SELECT rights alone give
    zero rows and no error."""
    w = bottlecrm_db.writer
    org = w.create_org("演示贸易有限公司")
    w.create_account(org, "张三五金店")
    with psycopg.connect(bottlecrm_db.dsn, autocommit=True) as admin:
        admin.execute(f'GRANT SELECT ON TABLE public.accounts TO "{capture_role.name}"')
    with psycopg.connect(capture_role.dsn(bottlecrm_db.dsn), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (0,)
        checks = _by_name(_check(conn, ["public.accounts"], {}, capture_role.name))
    assert checks["read access public.accounts"].ok
    assert not checks["row-level security"].ok


def test_the_demo_crm_passes(stack: Stack, capture_role: Role) -> None:
    tag = f"demo_{uuid.uuid4().hex[:8]}"
    name = f"bottlecrm_t{tag}"  # the capture_role fixture cleans grants in bottlecrm_t*
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(stack.dsn_for(name), autocommit=True) as conn:
            conn.execute(resources.files("service.demo").joinpath("crm_schema.sql")
                         .read_text("utf-8"))
            checks = _check(conn, load_profile("demo").tables, {}, tag)  # as the stack's superuser
            assert [c for c in checks if not c.ok] == []
            conn.execute(f'GRANT USAGE ON SCHEMA crm TO "{capture_role.name}"')
            conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA crm TO "{capture_role.name}"')
            conn.execute(f'GRANT CREATE ON DATABASE "{name}" TO "{capture_role.name}"')
        with psycopg.connect(capture_role.dsn(stack.dsn_for(name)), autocommit=True) as conn:
            checks = _check(conn, load_profile("demo").tables, {}, tag)  # as a least-privilege role
        assert [c for c in checks if not c.ok] == []
        assert _by_name(checks)["row-level security"].detail == (
            "no captured table has row-level security enabled")
    finally:
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_producer_schema_made_by_setup_as_admin_needs_create_and_delete_grants(
        stack: Stack, capture_role: Role) -> None:
    """README's order: `setup` as an administrator (it creates the publication, which only an
    owner may), then the producer as the capture role. The schema `setup` made is the
    administrator's, and the producer's `CREATE TABLE IF NOT EXISTS` at every start needs
    CREATE on it although the tables exist: the check must ask for that, and once its SQL
    ran, the producer's own start-up DDL must succeed as the role."""
    tag = f"own_{uuid.uuid4().hex[:8]}"
    name = f"bottlecrm_t{tag}"  # the capture_role fixture cleans grants in bottlecrm_t*
    role = f'"{capture_role.name}"'
    profile = load_profile("demo")
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        settings = dataclasses.replace(Settings(), crm_dsn=stack.dsn_for(name),
                                       publication_name=f"pub_{tag}", slot_name=f"slot_{tag}")
        with psycopg.connect(stack.dsn_for(name), autocommit=True) as admin:
            admin.execute(resources.files("service.demo").joinpath("crm_schema.sql")
                          .read_text("utf-8"))
            ensure_capture_objects(admin, settings, profile)  # what `setup` does, as admin
            slot_guard.ensure_table(admin)
            admin.execute(f"GRANT USAGE ON SCHEMA crm TO {role}")
            admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA crm TO {role}")
            admin.execute(f'GRANT CREATE ON DATABASE "{name}" TO {role}')
            # What the check asked for before: usage and the tables' rights, not CREATE.
            admin.execute(f"GRANT USAGE ON SCHEMA crm_erp_sync TO {role}")
            admin.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA crm_erp_sync"
                          f" TO {role}")
        role_dsn = capture_role.dsn(stack.dsn_for(name))
        with psycopg.connect(role_dsn, autocommit=True) as conn:
            with pytest.raises(PrivilegeMissing):
                slot_guard.ensure_table(conn)  # the producer's first DDL, as it failed
            own = _by_name(_check(conn, profile.tables, {}, tag))["producer schema crm_erp_sync"]
        assert not own.ok
        assert own.fix_sql == (
            f'GRANT USAGE, CREATE ON SCHEMA "crm_erp_sync" TO {role};\n'
            f'GRANT DELETE ON TABLE "crm_erp_sync"."watermarks" TO {role};')

        with psycopg.connect(stack.dsn_for(name), autocommit=True) as admin:
            for statement in own.fix_sql.splitlines():
                admin.execute(statement)
        with psycopg.connect(role_dsn, autocommit=True) as conn:
            assert _by_name(_check(conn, profile.tables, {}, tag))[
                "producer schema crm_erp_sync"].ok
            slot_guard.ensure_table(conn)  # the producer's start-up DDL now runs as the role
            ensure_capture_objects(conn, settings, profile)
            # ...and, after a snapshot chunk, its pruning of old watermarks
            conn.execute(f"DELETE FROM {WATERMARK_TABLE}"
                         " WHERE written_at < now() - interval '1 hour'")
    finally:
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_privilege_the_database_refuses_is_a_configuration_error_naming_it(
        stack: Stack, capture_role: Role, cli: Cli) -> None:
    """`setup` run as the least-privilege capture role (as a Kubernetes Job with the
    producer's Secret would) cannot create the publication: the CLI names what PostgreSQL
    refused and exits 2, instead of an anonymous `unexpected_error` with exit 1."""
    tag = f"priv_{uuid.uuid4().hex[:8]}"
    name = f"bottlecrm_t{tag}"  # the capture_role fixture cleans grants in bottlecrm_t*
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(stack.dsn_for(name), autocommit=True) as admin:
            admin.execute(resources.files("service.demo").joinpath("crm_schema.sql")
                          .read_text("utf-8"))
            admin.execute(f'GRANT USAGE ON SCHEMA crm TO "{capture_role.name}"')
            admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA crm TO "{capture_role.name}"')
            admin.execute(f'GRANT CREATE ON DATABASE "{name}" TO "{capture_role.name}"')
        role_dsn = capture_role.dsn(stack.dsn_for(name))
        as_role = dataclasses.replace(Settings(), crm_dsn=role_dsn, erp_dsn=role_dsn,
                                      publication_name=f"pub_{tag}", slot_name=f"slot_{tag}")
        refused = cli(as_role, "setup", "--no-demo-schema")
        assert refused.code == EXIT_USAGE
        assert "unexpected_error" not in refused.err
        assert "CREATE PUBLICATION" in refused.err, refused.err
        assert "owner" in refused.err and "administrator" in refused.err, refused.err
        assert capture_role.password not in refused.err
    finally:
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
