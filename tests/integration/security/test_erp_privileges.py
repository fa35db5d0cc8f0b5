"""A consumer whose ERP role lacks a grant exits 2 naming the ERP role, each table and
privilege and the GRANT (newcomer9 F6): at start, before it joins its group, and when a
grant is revoked while it runs; never advice about the CRM's capture role."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.demo.bottlecrm import Role
from service.exit_codes import OK as EXIT_OK
from service.exit_codes import USAGE as EXIT_USAGE
from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli

pytestmark = pytest.mark.timeout(300)

README = "README, Deployment, \"Secure transport and least privilege\", lists the consumer's"


@pytest.fixture
def erp_role(sync_env: SyncEnv) -> Iterator[Role]:
    """A LOGIN role with exactly README's grants for the consumer's ERP role. Roles are
    cluster-wide: a unique name, dropped again before the test's databases."""
    role = Role(f"erpw_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex)
    database = psycopg.conninfo.conninfo_to_dict(sync_env.settings.erp_dsn)["dbname"]
    with sync_env.erp() as admin:
        admin.execute(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
        for grant in (f'CONNECT, TEMP ON DATABASE "{database}"', "USAGE ON SCHEMA erp, sync",
                      "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA erp, sync",
                      "USAGE, SELECT ON ALL SEQUENCES IN SCHEMA erp, sync"):
            admin.execute(f"GRANT {grant} TO {role.name}")
    try:
        yield role
    finally:
        with sync_env.erp() as admin:
            admin.execute(f"DROP OWNED BY {role.name}")
            admin.execute(f"DROP ROLE {role.name}")


def test_a_consumer_without_an_erp_grant_exits_at_start_naming_each(
        sync_env: SyncEnv, erp_role: Role, cli: Cli) -> None:
    with sync_env.erp() as admin:
        admin.execute(f"REVOKE UPDATE ON erp.business_partners FROM {erp_role.name}")
        admin.execute(f"REVOKE INSERT, DELETE ON sync.held_events FROM {erp_role.name}")
    as_role = sync_env.with_(erp_dsn=erp_role.dsn(sync_env.settings.erp_dsn))

    refused = cli(as_role, "consume", "--until-idle", "3")

    assert refused.code == EXIT_USAGE, refused.err
    q = f'"{erp_role.name}"'
    grants = [f'GRANT UPDATE ON TABLE "erp"."business_partners" TO {q};',
              f'GRANT INSERT, DELETE ON TABLE "sync"."held_events" TO {q};']
    assert (f"crm-erp-sync: CRM_ERP_SYNC_ERP_DSN: the ERP role {erp_role.name} cannot apply "
            "changes (checked when connecting, before anything is applied): it lacks UPDATE "
            "on table erp.business_partners; INSERT, DELETE on table sync.held_events: "
            f"{' '.join(grants)} ({README} ERP grants)") in refused.err, refused.err
    assert "setup --check" not in refused.err and "Traceback" not in refused.err

    with sync_env.erp() as admin:  # exactly the printed grants
        for grant in grants:
            admin.execute(grant)
    started = cli(as_role, "consume", "--until-idle", "3")
    assert started.code == EXIT_OK, started.err


def test_an_erp_grant_revoked_while_consuming_is_named_at_the_refused_batch(
        sync_env: SyncEnv, erp_role: Role, cli: Cli, tmp_path: Path) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, address) "
                    "VALUES ('张', '三', '138 1234 5678', '北京市朝阳区建国路88号')")
    assert cli(settings, "produce", "--until-idle").code == EXIT_OK  # the initial snapshot
    as_role = sync_env.with_(erp_dsn=erp_role.dsn(settings.erp_dsn))
    out = tmp_path / "consumer.log"
    with out.open("wb") as log:
        consumer = subprocess.Popen([sys.executable, "-m", "service.cli", "consume"],
                                    env={**os.environ, **settings_env(as_role)},
                                    stdout=log, stderr=subprocess.STDOUT)
    try:
        with sync_env.erp() as erp, sync_env.crm() as crm:
            customers = crm.execute("SELECT count(*) FROM crm.customers").fetchone()
            wait_until(lambda: erp.execute("SELECT count(*) FROM erp.business_partners")
                       .fetchone() == customers or consumer.poll() is not None,
                       timeout=90, message="the snapshot applied")
            assert customers == (1,)
            assert consumer.poll() is None, out.read_text("utf-8")[-2000:]
            erp.execute(f"REVOKE UPDATE ON erp.business_partners FROM {erp_role.name}")
            crm.execute("UPDATE crm.customers SET given_name = given_name || '.' "
                        "WHERE customer_id = (SELECT min(customer_id) FROM crm.customers)")
        assert cli(settings, "produce", "--until-idle").code == EXIT_OK
        try:
            code = consumer.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the consumer went on: "
                                 + out.read_text("utf-8")[-2000:]) from None
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()

    said = out.read_text("utf-8")
    assert code == EXIT_USAGE, said[-2000:]
    assert (f"crm-erp-sync: CRM_ERP_SYNC_ERP_DSN: the ERP role {erp_role.name} cannot apply a "
            "batch (permission denied for table business_partners): it lacks UPDATE on table "
            f'erp.business_partners: GRANT UPDATE ON TABLE "erp"."business_partners" TO '
            f'"{erp_role.name}"; ({README} ERP grants)') in said, said[-2000:]
    assert "setup --check" not in said and "Traceback" not in said
