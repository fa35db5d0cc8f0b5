"""A role that lacks a privilege `setup` or the producer needs gets a configuration error
(exit 2) naming the object and the grant, or who must run `setup` - never an anonymous
`unexpected_error` (exit 1) with a traceback: the newcomer's trial (F1, F10) of a producer
role whose schema `setup` had made as the administrator."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from service.demo.bottlecrm import Role
from service.exit_codes import OK as EXIT_OK
from service.exit_codes import USAGE as EXIT_USAGE
from tests.conftest import SyncEnv
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
    grant = f'GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO "{cdc_role.name}"'
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot create "
            f"table crm_erp_sync.capture_state: {grant} (or run `crm-erp-sync setup --check "
            f"--role {cdc_role.name}` for every grant the producer needs)") in refused.err
    assert "unexpected_error" not in refused.err and "Traceback" not in refused.err
    with sync_env.crm() as admin:  # nothing was created meanwhile
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (0,)

    with sync_env.crm() as admin:  # exactly the printed grant
        admin.execute(grant)
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err
    with sync_env.crm() as admin:
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                             (as_role.slot_name,)).fetchone() == (1,)


def test_a_slot_the_role_may_not_create_is_named_by_postgresql_not_a_traceback(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")
        admin.execute(f"ALTER ROLE {cdc_role.name} NOREPLICATION")
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    assert (f"crm-erp-sync: CRM_ERP_SYNC_CRM_DSN: the CRM role {cdc_role.name} cannot start "
            "capturing (") in refused.err
    assert (f"): run `crm-erp-sync setup --check --role {cdc_role.name}` and the SQL it "
            "prints") in refused.err
    assert "replication" in refused.err  # PostgreSQL's words about the slot
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


def test_the_producer_without_create_on_the_database_names_that_grant_not_the_schema_one(
        sync_env: SyncEnv, cdc_role: Role, cli: Cli) -> None:
    # newcomer7: a role with USAGE, CREATE on the producer's schema but no CREATE on the
    # database was told to grant what it had (the schema) and failed the same way again.
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.crm_dsn)["dbname"]
    with sync_env.crm() as admin:
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA crm_erp_sync TO {cdc_role.name}")
        admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {cdc_role.name}')
    as_role = sync_env.with_(crm_dsn=cdc_role.dsn(sync_env.settings.crm_dsn))

    refused = cli(as_role, "produce", "--until-idle")

    assert refused.code == EXIT_USAGE, refused.err
    grant = f'GRANT CREATE ON DATABASE "{database}" TO "{cdc_role.name}"'
    assert (f"the CRM role {cdc_role.name} cannot declare the producer's schema crm_erp_sync "
            f"(CREATE SCHEMA IF NOT EXISTS, at every start): {grant}") in refused.err
    assert "ON SCHEMA" not in refused.err
    with sync_env.crm() as admin:  # exactly the printed grant
        admin.execute(grant)
    started = cli(as_role, "produce", "--until-idle")
    assert started.code == EXIT_OK, started.err
