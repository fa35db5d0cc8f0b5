"""A role that lacks a privilege `setup` or the producer needs gets a configuration error
(exit 2) naming the object and the grant, or who must run `setup` - never an anonymous
`unexpected_error` (exit 1) with a traceback: the newcomer's trial (F1, F10) of a producer
role whose schema `setup` had made as the administrator."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.cdc.producer import lock_key
from service.demo.bottlecrm import Role
from service.exit_codes import OK as EXIT_OK
from service.exit_codes import USAGE as EXIT_USAGE
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cdc_role(sync_env: SyncEnv) -> Iterator[Role]:
    """A LOGIN REPLICATION role with what `setup --check` asked of the newcomer's role before
    96e7fcf (read the captured tables, CREATE on the database, use and write the producer's
    schema's tables) but no CREATE on that schema, which `setup` made as the administrator.
    Roles are cluster-wide: a unique name, dropped again before the test's databases."""
    role = Role(f"priv_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex)
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"]
    with sync_env.crm() as admin:
        admin.execute(f"CREATE ROLE {role.name} LOGIN REPLICATION PASSWORD '{role.password}'")
        for grant in (f'CREATE ON DATABASE "{database}"', "USAGE ON SCHEMA crm",
                      "SELECT ON ALL TABLES IN SCHEMA crm", "USAGE ON SCHEMA crm_erp_sync",
                      "SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA crm_erp_sync"):
            admin.execute(f"GRANT {grant} TO {role.name}")
    try:
        yield role
    finally:
        with sync_env.crm() as admin:
            admin.execute(f"DROP OWNED BY {role.name}")  # its grants, and what it created
            admin.execute(f"DROP ROLE {role.name}")


def test_the_producer_names_the_schema_grant_it_lacks_and_starts_once_it_is_given(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    # privfix (newcomer9 F11): the start checks every grant at once, as a standby's does
    q = f'"{cdc_role.name}"'
    grants = [f'GRANT USAGE, CREATE ON SCHEMA "crm_erp_sync" TO {q};',
              f'GRANT DELETE ON TABLE "crm_erp_sync"."watermarks" TO {q};']
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot start "
            "capturing (checked at start, before anything is read; producer schema "
            "crm_erp_sync: ") in refused.err
    assert (f"): {' '.join(grants)} (`crm-erp-sync setup --check --role {cdc_role.name}` "
            "prints every prerequisite)") in refused.err
    assert "unexpected_error" not in refused.err and "Traceback" not in refused.err
    with sync_env.crm() as admin:  # nothing was created meanwhile
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (0,)

    with sync_env.crm() as admin:  # exactly the printed grants
        for grant in grants:
            admin.execute(grant)
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err
    with sync_env.crm() as admin:
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (1,)


def test_a_role_without_replication_is_named_at_start_not_a_traceback(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")
        admin.execute(f"GRANT DELETE ON crm_erp_sync.watermarks TO {cdc_role.name}")
        admin.execute(f"ALTER ROLE {cdc_role.name} NOREPLICATION")
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot start "
            f"capturing (checked at start, before anything is read; capture role "
            f"{cdc_role.name}: lacks REPLICATION: it cannot create or read a replication "
            f'slot): ALTER ROLE "{cdc_role.name}" REPLICATION; (`crm-erp-sync setup --check '
            f"--role {cdc_role.name}` prints every prerequisite)") in refused.err
    assert "Traceback" not in refused.err


def test_setup_as_a_restricted_role_says_the_publication_needs_an_administrator(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    # A publication not there yet (a first install), the tables someone else's.
    as_role = dataclasses.replace(
        sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn)),
        publication_name=f"{sync_env.settings.publication_name}_new")
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")

    refused = cli(as_role, "setup", "--no-demo-schema")

    assert refused.code == EXIT_USAGE, refused.err
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot create "
            f"publication {as_role.publication_name}: CREATE PUBLICATION needs the tables' "
            "owner or a superuser: run `crm-erp-sync setup` as an administrator") in refused.err
    assert "Traceback" not in refused.err
    with sync_env.crm() as admin:
        assert admin.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s",
                             (as_role.publication_name,)).fetchone() == (0,)


def test_setup_as_a_role_without_create_on_the_database_names_the_grants(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"]
    with sync_env.crm() as admin:
        admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {cdc_role.name}')
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "setup", "--no-demo-schema")

    assert refused.code == EXIT_USAGE, refused.err
    assert (f"the CRM role {cdc_role.name} cannot create the producer's schema crm_erp_sync "
            f'and its tables: GRANT CREATE ON DATABASE "{database}" TO "{cdc_role.name}"; '
            f'GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO "{cdc_role.name}"; or run '
            "`crm-erp-sync setup` as an administrator") in refused.err


def test_setup_check_asks_for_each_write_on_the_producers_tables_not_any_one(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    # standbyfix: has_table_privilege(role, table, 'SELECT, INSERT, UPDATE') is true when ANY
    # of them is held, so a role that could only read the producer's tables passed the check
    # and the producer then failed on its first write.
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")
        admin.execute(f"GRANT DELETE ON crm_erp_sync.watermarks TO {cdc_role.name}")
        admin.execute(f"REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA crm_erp_sync "
                      f"FROM {cdc_role.name}")

    found = cli(sync_env.settings, "setup", "--check", "--role", cdc_role.name)

    assert found.code != EXIT_OK, found.out
    grant = (f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "crm_erp_sync" TO '
             f'"{cdc_role.name}";')
    assert grant in found.out, found.out
    with sync_env.crm() as admin:  # exactly the printed grant
        admin.execute(grant)
    again = cli(sync_env.settings, "setup", "--check", "--role", cdc_role.name)
    assert grant not in again.out and "producer schema crm_erp_sync" in again.out, again.out


def test_the_producer_without_create_on_the_database_names_that_grant_not_the_schema_one(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    # newcomer7: a role with USAGE, CREATE on the producer's schema but no CREATE on the
    # database was told to grant what it had (the schema) and failed the same way again.
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"]
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")
        admin.execute(f"GRANT DELETE ON crm_erp_sync.watermarks TO {cdc_role.name}")
        admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {cdc_role.name}')
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    grant = f'GRANT CREATE ON DATABASE "{database}" TO "{cdc_role.name}"'
    assert (f"the CRM role {cdc_role.name} cannot start capturing (checked at start, before "
            "anything is read; producer schema crm_erp_sync: ") in refused.err
    assert f"): {grant}; (`crm-erp-sync setup --check" in refused.err
    assert "ON SCHEMA" not in refused.err
    with sync_env.crm() as admin:  # exactly the printed grant
        admin.execute(grant)
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err


def test_a_standby_without_a_grant_exits_at_start_naming_it_rather_than_waiting(
        sync_env: SyncEnv, cdc_role: Role, tmp_path: Path) -> None:
    # newcomer7 F4: a standby lacking grants logged `standby`, was ready, and failed (exit 2)
    # only when the active producer stopped: a failover that fails when it is needed.
    # The active producer's capture lock is held here by a session of its own.
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"]
    with sync_env.crm() as admin:
        admin.execute(f"REVOKE SELECT ON crm.order_lines FROM {cdc_role.name}")
        admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {cdc_role.name}')
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))
    env = {**os.environ, **settings_env(as_role)}

    def produce(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / f"{name}.log"
        with out.open("wb") as log:
            return subprocess.Popen([sys.executable, "-m", "service.cli", "produce"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT), out

    with sync_env.crm() as active:
        active.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock_key(as_role.slot_name),))
        refused, out = produce("refused")
        try:
            code = refused.wait(timeout=60)  # the old code waited here, ready, for ever
        except subprocess.TimeoutExpired:
            refused.kill()
            refused.wait()
            raise AssertionError("the standby waited for the lock instead of exiting: "
                                 + out.read_text("utf-8")[-2000:]) from None
        said = out.read_text("utf-8")
        assert code == EXIT_USAGE, said
        q = f'"{cdc_role.name}"'
        grants = [f'GRANT SELECT ON TABLE "crm"."order_lines" TO {q};',
                  f'GRANT CREATE ON DATABASE "{database}" TO {q};',
                  f'GRANT USAGE, CREATE ON SCHEMA "crm_erp_sync" TO {q};',
                  f'GRANT DELETE ON TABLE "crm_erp_sync"."watermarks" TO {q};']
        assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot take "
                "over capture from the producer that holds the capture lock (checked before "
                "waiting as its standby; read access crm.order_lines: ") in said
        assert f"): {' '.join(grants)} (`crm-erp-sync setup --check --role {cdc_role.name}`" \
            in said
        assert '"event": "standby"' not in said and "Traceback" not in said, said

        with sync_env.crm() as admin:  # exactly the printed grants
            for grant in grants:
                admin.execute(grant)
            # and no more than the start needs: TEMPORARY only compares row filters (the
            # demo profile has none), and tables written only when a contract breaks, a
            # capture letter is sent or a TRUNCATE is met are `setup --check`'s to ask for
            admin.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
            admin.execute(f"REVOKE ALL ON crm_erp_sync.contract_violations, "
                          f"crm_erp_sync.capture_letters_sent, crm_erp_sync.truncates "
                          f"FROM {cdc_role.name}")
        standby, out = produce("standby")
        try:
            wait_until(lambda: '"event": "standby"' in out.read_text("utf-8")
                       or standby.poll() is not None, timeout=60, message="the standby")
            assert standby.poll() is None, out.read_text("utf-8")
            active.execute("SELECT pg_advisory_unlock(hashtext(%s))",
                           (lock_key(as_role.slot_name),))
            wait_until(lambda: '"event": "capture_lock_acquired"' in out.read_text("utf-8")
                       or standby.poll() is not None, timeout=60, message="the takeover")
            wait_until(lambda: '"event": "slot_created"' in out.read_text("utf-8")
                       or standby.poll() is not None, timeout=60, message="capture started")
            assert standby.poll() is None, out.read_text("utf-8")
        finally:
            standby.send_signal(signal.SIGTERM)
            try:
                standby.wait(timeout=60)
            except subprocess.TimeoutExpired:
                standby.kill()
                standby.wait()
        assert standby.returncode == EXIT_OK, out.read_text("utf-8")[-2000:]


def _produce(as_role: Settings, out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "produce"],
                                env={**os.environ, **settings_env(as_role)},
                                stdout=log, stderr=subprocess.STDOUT)


def _exit_code(proc: subprocess.Popen[bytes], out: Path, what: str) -> int:
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what}: " + out.read_text("utf-8")[-2000:]) from None


def _all_grants(sync_env: SyncEnv, role: Role) -> None:
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {role.name}")
        admin.execute(f"GRANT DELETE ON crm_erp_sync.watermarks TO {role.name}")


def test_an_active_producer_without_select_on_a_captured_table_exits_at_start_naming_it(
        sync_env: SyncEnv, cdc_role: Role, tmp_path: Path) -> None:
    # newcomer9 F11: the active producer started without complaint although it could not
    # read crm.customers, and failed at the next snapshot of it (at every start after).
    _all_grants(sync_env, cdc_role)
    with sync_env.crm() as admin:
        admin.execute(f"REVOKE SELECT ON crm.customers FROM {cdc_role.name}")
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))
    out = tmp_path / "producer.log"

    code = _exit_code(_produce(as_role, out), out, "the producer started without the grant")

    said = out.read_text("utf-8")
    assert code == EXIT_USAGE, said
    grant = f'GRANT SELECT ON TABLE "crm"."customers" TO "{cdc_role.name}";'
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot start "
            "capturing (checked at start, before anything is read; read access crm.customers: "
            f"{cdc_role.name} cannot read it, so the snapshot cannot): {grant} "
            f"(`crm-erp-sync setup --check --role {cdc_role.name}`") in said
    assert '"event": "capture_lock_acquired"' not in said and "Traceback" not in said, said
    with sync_env.crm() as admin:  # nothing was created: the check comes first
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (0,)


def test_an_active_producer_without_usage_on_the_captured_schema_names_that_grant(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli, tmp_path: Path) -> None:
    # newcomer10 F11-b: without USAGE ON SCHEMA crm the start-up check itself was refused
    # (to_regclass of crm.customers: "permission denied for schema crm") and the producer
    # exited with the generic line naming no role and no grant.
    _all_grants(sync_env, cdc_role)
    with sync_env.crm() as admin:
        admin.execute(f"REVOKE USAGE ON SCHEMA crm FROM {cdc_role.name}")
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))
    out = tmp_path / "producer.log"

    code = _exit_code(_produce(as_role, out), out, "the producer started without the grant")

    said = out.read_text("utf-8")
    assert code == EXIT_USAGE, said
    grant = f'GRANT USAGE ON SCHEMA "crm" TO "{cdc_role.name}";'
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot start "
            "capturing (checked at start, before anything is read; read access crm.") in said
    assert f"): {grant} (`crm-erp-sync setup --check --role {cdc_role.name}`" in said, said
    assert said.count(grant) == 1, said  # once, not once per captured table
    assert '"event": "capture_lock_acquired"' not in said and "Traceback" not in said, said
    with sync_env.crm() as admin:  # nothing was created: the check comes first
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (0,)
        admin.execute(grant)  # exactly the printed grant
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err


def test_a_producer_without_usage_on_its_own_schema_names_that_grant(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    # The same refusal one schema over: the check of the producer's own tables resolved
    # crm_erp_sync.watermarks with to_regclass, which a role without USAGE cannot.
    _all_grants(sync_env, cdc_role)
    with sync_env.crm() as admin:
        admin.execute(f"REVOKE USAGE ON SCHEMA crm_erp_sync FROM {cdc_role.name}")
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    grant = f'GRANT USAGE, CREATE ON SCHEMA "crm_erp_sync" TO "{cdc_role.name}";'
    assert (f"the CRM role {cdc_role.name} cannot start capturing (checked at start, before "
            "anything is read; producer schema crm_erp_sync: ") in refused.err
    assert f"): {grant} (`crm-erp-sync setup --check" in refused.err, refused.err
    assert "Traceback" not in refused.err
    with sync_env.crm() as admin:  # exactly the printed grant
        admin.execute(grant)
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err


def test_a_select_revoked_while_running_is_named_with_its_grant_at_the_next_snapshot(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli, tmp_path: Path) -> None:
    # newcomer9 F11: the snapshot's refusal was PostgreSQL's bare "permission denied for
    # table customers" with advice about `setup --check` for some ROLE
    _all_grants(sync_env, cdc_role)
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))
    out = tmp_path / "producer.log"
    producer = _produce(as_role, out)
    try:
        wait_until(lambda: '"event": "snapshot_done"' in out.read_text("utf-8")
                   or producer.poll() is not None, timeout=90, message="the initial snapshot")
        assert producer.poll() is None, out.read_text("utf-8")[-2000:]
        with sync_env.crm() as admin:
            admin.execute(f"REVOKE SELECT ON crm.customers FROM {cdc_role.name}")
        requested = cli(sync_env.settings, "snapshot", "--table", "customer")
        assert requested.code == EXIT_OK, requested.err
        code = _exit_code(producer, out, "the producer went on without reading the table")
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()

    said = out.read_text("utf-8")
    assert code == EXIT_USAGE, said[-2000:]
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot read "
            "crm.customers for a snapshot (SELECT refused): GRANT SELECT ON TABLE "
            f'"crm"."customers" TO "{cdc_role.name}";') in said, said[-2000:]
    assert "Traceback" not in said
