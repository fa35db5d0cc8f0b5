"""The publication drifting from the source profile (real broker and databases): a table
dropped from it by hand, a row filter changed in the profile after `setup`. Nothing may be
lost silently: `setup` (as the publication's owner) brings the publication to the profile and
re-snapshots what it repaired, saying so; a producer that may not alter the publication (the
README's least-privilege role) stops capture like a source-contract violation (named in
/readyz, `status` and the metric; the slot kept) instead of crash-looping or streaming under
the old filter, and resumes by itself once `setup` ran."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.demo.bottlecrm import Role
from service.settings import Settings
from tests.conftest import Stack, SyncEnv
from tests.helpers import wait_until
from tests.integration.cdc.test_capture_dead_letters import _insert, _partners
from tests.integration.conftest import Cli, capture_ready
from tests.integration.runtime.test_endpoints import running

OLD_FILTER = "family_name <> '王'"  # 王五 is outside it
NEW_FILTER = "family_name IS NOT NULL"


@pytest.fixture
def capture_role(stack: Stack, sync_env: SyncEnv) -> Iterator[Role]:
    """A least-privilege capture role (README "Deployment"): LOGIN REPLICATION, SELECT on the
    CRM's tables, its own schema's rights; not the publication's owner. Unique name, dropped
    after (before sync_env drops the databases)."""
    role = Role(f"pubfix_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex)
    name = sql_ident(role.name)
    database = sql_ident(psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"])
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN REPLICATION PASSWORD '{role.password}'")
    with sync_env.crm() as crm:
        for statement in (
                f"GRANT CREATE ON DATABASE {database} TO {name}",
                f"GRANT USAGE ON SCHEMA crm TO {name}",
                f"GRANT SELECT ON ALL TABLES IN SCHEMA crm TO {name}",
                f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {name}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA crm_erp_sync "
                f"TO {name}"):
            crm.execute(statement)
    try:
        yield role
    finally:
        with sync_env.crm() as crm:
            crm.execute(f"DROP OWNED BY {name}")
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def sql_ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _profile(tmp_path: Path, row_filter: str, name: str) -> str:
    """The demo profile with a row filter on customers, as a file."""
    text = resources.files("service.profiles").joinpath("demo.toml").read_text("utf-8")
    head = 'table = "crm.customers"\nkey = ["customer_id"]\n'
    assert head in text
    text = text.replace(head, head + f'row_filter = "{row_filter}"\n')
    path = tmp_path / f"{name}.toml"
    path.write_text(text, "utf-8")
    return str(path)


def _producer(settings: Settings) -> CdcProducer:
    return CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))


def _stopped_on_publication(producer: CdcProducer, table: str) -> bool:
    ready, body = producer.health.readiness()
    return (not ready and body.get("state") == "source_contract_broken"
            and body.get("table") == table
            and producer.metrics.contract_violations.labels(table, "*")._value.get() == 1)


def _rowfilter(crm: Any, publication: str, table: str) -> str | None:
    row = crm.execute("SELECT rowfilter FROM pg_publication_tables WHERE pubname = %s AND "
                      "schemaname || '.' || tablename = %s", (publication, table)).fetchone()
    return None if row is None else row[0]


def _status_line(cli: Cli, settings: Settings) -> str:
    status = cli(settings, "status")
    assert status.code == 1, status.out
    assert "CAPTURE STOPPED" in status.out
    return next(x for x in status.out.splitlines() if "source contract broken:" in x)


def test_a_restricted_producer_stops_on_a_table_dropped_from_the_publication_until_setup(
        sync_env: SyncEnv, capture_role: Role, cli: Cli) -> None:
    """F14: the producer may not add the table back: it stops (no crash loop), named; `setup`
    as the owner re-adds it and re-snapshots it, so the change made meanwhile arrives."""
    admin = sync_env.settings
    publication = admin.publication_name
    as_role = sync_env.with_(crm_dsn=capture_role.dsn(admin.crm_dsn))
    producer = _producer(as_role)
    with running(producer), running(ErpConsumer(admin)), sync_env.crm() as crm:
        wait_until(lambda: capture_ready(sync_env), timeout=60,
                   message="the restricted producer capturing, its initial snapshot done")
        crm.execute(f"ALTER PUBLICATION {sql_ident(publication)} DROP TABLE crm.customers")
        gap = _insert(crm, "crm.customers", family_name="张", given_name="三")
        wait_until(lambda: _stopped_on_publication(producer, "crm.customers"), timeout=60,
                   message="capture stopped on the publication")
        line = _status_line(cli, admin)
        assert f"crm.customers: not in publication {publication}" in line, line
        assert "`crm-erp-sync setup` as the publication's owner" in line, line
        assert "ADD TABLE" in line, line
        assert crm.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                           (admin.slot_name,)).fetchone() == (1,)  # the slot is kept
        assert gap not in _partners(sync_env)
        refused = cli(as_role, "setup")  # as the producer's role: refused, named, exit 2
        assert refused.code == 2, (refused.out, refused.err)
        assert (f"cannot bring table crm.customers of publication {publication} to the "
                "source profile") in refused.err, refused.err

        done = cli(admin, "setup")
        assert done.code == 0, done.err
        assert f"added crm.customers back to publication {publication}" in done.out, done.out
        assert "requested snapshot" in done.out, done.out
        wait_until(lambda: gap in _partners(sync_env), timeout=120,
                   message="the change made outside the publication in the ERP")
        wait_until(lambda: producer.health.readiness()[1].get("state") == "active",
                   timeout=60, message="capture resumed by itself")
        later = _insert(crm, "crm.customers", family_name="李", given_name="四")
        wait_until(lambda: later in _partners(sync_env), timeout=60,
                   message="later changes captured again")
    assert cli(admin, "status", "--json").json["contract_violations"] == []


def test_a_changed_row_filter_stops_a_restricted_producer_until_setup_applies_it(
        sync_env: SyncEnv, capture_role: Role, cli: Cli, tmp_path: Path) -> None:
    """F15: the profile's row_filter changed after `setup`: the restricted producer stops
    naming both filters (it does not stream under the old one); `setup --check` shows the
    difference; `setup` as the owner applies the new filter and re-snapshots the table."""
    admin_old = sync_env.with_(source_profile=_profile(tmp_path, OLD_FILTER, "old"))
    admin_new = sync_env.with_(source_profile=_profile(tmp_path, NEW_FILTER, "new"))
    publication = admin_old.publication_name
    first = cli(admin_old, "setup")  # the publication had no filter: it gets the old one
    assert first.code == 0, first.err
    assert "changed the row filter of crm.customers" in first.out, first.out
    role_dsn = capture_role.dsn(admin_old.crm_dsn)
    with sync_env.crm() as crm:
        assert _rowfilter(crm, publication, "crm.customers") == "(family_name <> '王'::text)"
        producer = _producer(_with(admin_old, crm_dsn=role_dsn))
        with running(producer), running(ErpConsumer(admin_old)):
            wait_until(lambda: capture_ready(sync_env), timeout=60,
                       message="the restricted producer capturing, its initial snapshot done")
            wang = _insert(crm, "crm.customers", family_name="王", given_name="五")
            zhang = _insert(crm, "crm.customers", family_name="张", given_name="三")
            wait_until(lambda: zhang in _partners(sync_env), timeout=60,
                       message="a row inside the old filter")
        assert wang not in _partners(sync_env)  # outside the old filter: as configured

        # The operator corrects the profile and restarts the producer with it.
        once = cli(_with(admin_new, crm_dsn=role_dsn), "produce", "--until-idle")
        assert once.code == 2, (once.out, once.err)
        assert "crm.customers" in once.err and "(family_name <> '王'::text)" in once.err
        check = cli(admin_new, "setup", "--check")
        failed = next(x for x in check.out.splitlines()
                      if f"row filters of publication {publication}" in x)
        assert failed.startswith("✗"), check.out
        assert "(family_name IS NOT NULL)" in failed and "(family_name <> '王'::text)" in failed
        producer = _producer(_with(admin_new, crm_dsn=role_dsn))
        with running(producer), running(ErpConsumer(admin_new)):
            wait_until(lambda: _stopped_on_publication(producer, "crm.customers"),
                       timeout=60, message="capture stopped on the row filter")
            line = _status_line(cli, admin_new)
            assert "(family_name <> '王'::text)" in line and "(family_name IS NOT NULL)" in line
            assert "`crm-erp-sync setup` as the publication's owner" in line, line
            late = _insert(crm, "crm.customers", family_name="王", given_name="六")

            done = cli(admin_new, "setup")
            assert done.code == 0, done.err
            assert ("changed the row filter of crm.customers in publication "
                    f"{publication} from (family_name <> '王'::text) to "
                    "(family_name IS NOT NULL)") in done.out, done.out
            assert "requested snapshot" in done.out, done.out
            assert _rowfilter(crm, publication, "crm.customers") == "(family_name IS NOT NULL)"
            wait_until(lambda: {wang, late} <= set(_partners(sync_env)), timeout=120,
                       message="the rows only the new filter matches in the ERP")
            wait_until(lambda: producer.health.readiness()[1].get("state") == "active",
                       timeout=60, message="capture resumed by itself")
            later = _insert(crm, "crm.customers", family_name="王", given_name="七")
            wait_until(lambda: later in _partners(sync_env), timeout=60,
                       message="streamed under the new filter")
        again = cli(admin_new, "setup", "--check")
        assert next(x for x in again.out.splitlines()
                    if f"row filters of publication {publication}" in x).startswith("✓")


def test_a_producer_owning_the_publication_applies_a_changed_row_filter_and_resnapshots(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    """The producer that owns the publication repairs it itself (never silently: logged,
    and the table is re-snapshotted, so a row only the new filter matches arrives)."""
    admin_old = sync_env.with_(source_profile=_profile(tmp_path, OLD_FILTER, "old"))
    admin_new = sync_env.with_(source_profile=_profile(tmp_path, NEW_FILTER, "new"))
    pub = sql_ident(admin_old.publication_name)
    with sync_env.crm() as crm:  # the publication as a first `setup` with the old profile left it
        crm.execute(f"ALTER PUBLICATION {pub} DROP TABLE crm.customers")
        crm.execute(f"ALTER PUBLICATION {pub} ADD TABLE crm.customers WHERE ({OLD_FILTER})")
    assert cli(admin_old, "produce", "--until-idle").code == 0  # the slot exists from here
    with sync_env.crm() as crm:
        wang = _insert(crm, "crm.customers", family_name="王", given_name="五")
    assert cli(admin_old, "produce", "--until-idle").code == 0
    produced = cli(admin_new, "produce", "--until-idle")
    assert produced.code == 0, produced.err
    assert cli(admin_new, "consume", "--until-caught-up").code == 0
    assert wang in _partners(sync_env)
    with sync_env.crm() as crm:
        assert _rowfilter(crm, admin_new.publication_name, "crm.customers") == (
            "(family_name IS NOT NULL)")
        reasons = [r[0] for r in crm.execute(
            "SELECT reason FROM crm_erp_sync.snapshots WHERE table_name = 'crm.customers' "
            "ORDER BY snapshot_id").fetchall()]
    assert "publication-repaired" in reasons, reasons


def test_setup_narrowing_a_row_filter_says_rows_already_applied_stay_live_until_repair(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    """F7 (newcomer7): a narrower row filter does not retire the rows it now excludes (no
    event says they left): `setup` says how many CRM rows the old filter admitted and the
    new one does not, and that they stay live in the ERP until `reconcile --repair`, which
    then retires them. A wider filter retires nothing and says nothing of it."""
    admin_old = sync_env.with_(source_profile=_profile(tmp_path, OLD_FILTER, "old"))
    narrow = "family_name NOT IN ('王', '张')"
    admin_narrow = sync_env.with_(source_profile=_profile(tmp_path, narrow, "narrow"))
    first = cli(admin_old, "setup")  # no slot yet: no ERP rows, so nothing to say
    assert first.code == 0, first.err
    assert "reconcile --repair" not in first.out, first.out
    assert cli(admin_old, "produce", "--until-idle").code == 0  # the slot exists from here
    with sync_env.crm() as crm:
        zhang = _insert(crm, "crm.customers", family_name="张", given_name="三")
        li = _insert(crm, "crm.customers", family_name="李", given_name="四")
        wang = _insert(crm, "crm.customers", family_name="王", given_name="五")
    assert cli(admin_old, "produce", "--until-idle").code == 0
    assert cli(admin_old, "consume", "--until-caught-up").code == 0
    assert {zhang, li} <= set(_partners(sync_env)) and wang not in _partners(sync_env)

    done = cli(admin_narrow, "setup")
    assert done.code == 0, done.err
    line = next(x for x in done.out.splitlines() if "changed the row filter" in x)
    assert ("1 row(s) of crm.customers in the CRM pass the old filter but not the new one: "
            "those applied before stay live in the ERP until `crm-erp-sync reconcile "
            "--repair` marks them deleted") in line, line
    assert cli(admin_narrow, "produce", "--until-idle").code == 0
    assert cli(admin_narrow, "consume", "--until-caught-up").code == 0
    assert zhang in _partners(sync_env)  # what setup said: still live
    repaired = cli(admin_narrow, "reconcile", "--repair")
    assert repaired.code in (0, 1), (repaired.out, repaired.err)
    assert set(_partners(sync_env)) == {li}, repaired.out

    wide = cli(admin_old, "setup")  # back to the wider filter: retires nothing
    assert wide.code == 0, wide.err
    assert "changed the row filter" in wide.out and "reconcile --repair" not in wide.out, \
        wide.out
    json_run = cli(admin_narrow, "setup", "--json")  # the same line on stderr with --json
    assert json_run.code == 0, json_run.err
    assert "1 row(s) of crm.customers in the CRM pass the old filter" in json_run.err


def _with(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)


@pytest.mark.parametrize("row_filter", [
    "org_id = '00000000-0000-0000-0000-000000000000'",  # BottleCRM's shipped placeholder
    "org_id='00000000-0000-0000-0000-000000000000' and status in ('a', 'b')",
    "(n > 1.5 OR status IS NULL)",
    "NOT deleted",
])
def test_the_profile_filter_and_the_publication_filter_compare_equal_as_postgresql_prints_them(
        sync_env: SyncEnv, row_filter: str) -> None:
    """No false drift (it would stop a restricted producer for good): the profile's text and
    the catalog's normalised form of the same filter compare equal; another filter does not."""
    from types import SimpleNamespace

    from service.cdc.capture import publication_drift

    settings = sync_env.settings
    pub = sql_ident(settings.publication_name)
    with sync_env.crm() as crm:
        crm.execute("CREATE TABLE crm.tenant_rows (id int PRIMARY KEY, org_id uuid, "
                    "status text, n numeric(14,2), deleted boolean)")
        crm.execute(f"ALTER PUBLICATION {pub} ADD TABLE crm.tenant_rows WHERE ({row_filter})")
        entity = SimpleNamespace(table="crm.tenant_rows", row_filter=row_filter)
        profile = SimpleNamespace(entities={"tenant": entity})
        assert publication_drift(crm, settings, profile) == []  # type: ignore[arg-type]
        other = SimpleNamespace(entities={"tenant": SimpleNamespace(
            table="crm.tenant_rows", row_filter="org_id IS NULL")})
        [drift] = publication_drift(crm, settings, other)  # type: ignore[arg-type]
        assert (drift.table, drift.missing, drift.want) == (
            "crm.tenant_rows", False, "(org_id IS NULL)")
        assert drift.have is not None and drift.have.startswith("(")
        # nothing left behind by the comparison
        assert crm.execute("SELECT count(*) FROM pg_class WHERE relname = "
                           "'crm_erp_sync_filter_probe'").fetchone() == (0,)


def test_setup_check_adds_a_dropped_filtered_table_back_with_its_filter(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    """newcomer7: a filtered table dropped from the publication: `setup --check`'s SQL adds it
    back with the profile's row filter (its SQL without the filter led a DBA to the next
    failure, the filter check), and after that SQL every check passes."""
    admin = sync_env.with_(source_profile=_profile(tmp_path, OLD_FILTER, "filtered"))
    publication = sql_ident(admin.publication_name)
    assert cli(admin, "setup").code == 0
    with sync_env.crm() as crm:
        crm.execute(f"ALTER PUBLICATION {publication} DROP TABLE crm.customers")
        check = cli(admin, "setup", "--check")
        assert check.code == 1, check.out
        lines = check.out.splitlines()
        at = next(i for i, x in enumerate(lines) if x.startswith("✗ publication "))
        fix = lines[at + 1].strip()
        assert fix == (f'ALTER PUBLICATION {publication} ADD TABLE "crm"."customers" '
                       f"WHERE ({OLD_FILTER});"), check.out
        crm.execute(fix)
    again = cli(admin, "setup", "--check")
    assert not [x for x in again.out.splitlines() if x.startswith("✗")], again.out
