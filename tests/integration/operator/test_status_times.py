"""`status` prints every time in UTC with its offset, whatever zone the CRM's and the ERP's
database sessions run in (a contract-stop time was once printed in the CRM's zone)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running


def test_contract_stop_and_pause_times_are_printed_in_utc(sync_env: SyncEnv, cli: Cli,
                                                          running: Running) -> None:
    settings = sync_env.settings
    crm_db = settings.crm_dsn.rsplit("/", 1)[1].split("?")[0]
    erp_db = settings.erp_dsn.rsplit("/", 1)[1].split("?")[0]
    with sync_env.crm() as crm:  # new sessions of each database run in these zones
        crm.execute(f'ALTER DATABASE "{crm_db}" SET timezone = \'Asia/Shanghai\'')
        crm.execute(f'ALTER DATABASE "{erp_db}" SET timezone = \'America/New_York\'')
    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    with sync_env.crm() as crm:
        crm.execute("ALTER TABLE crm.customers RENAME COLUMN phone TO phone_no")
    running.start_producer(settings)  # stops on the broken contract, recording since when

    def stopped_since() -> Any:
        with sync_env.crm() as crm:
            row = crm.execute("SELECT since FROM crm_erp_sync.contract_violations "
                              "WHERE resolved_at IS NULL").fetchone()
        return row[0] if row else None

    since = wait_until(stopped_since, timeout=60, message="the contract stop recorded")
    assert since.utcoffset().total_seconds() == 8 * 3600  # read in the CRM's zone
    paused = cli(settings, "pause", "--partition", f"{settings.sales_topic}:0",
                 "--reason", "ERP upgrade")
    assert paused.code == 0, paused.err
    with sync_env.erp() as erp:
        paused_at = erp.execute("SELECT paused_at FROM sync.operator_pauses").fetchone()[0]
    assert paused_at.utcoffset().total_seconds() < 0  # read in the ERP's zone

    status = cli(settings, "status")
    assert status.code == 1
    stop = next(x for x in status.out.splitlines() if "source contract broken:" in x)
    assert f"capture STOPPED since {since.astimezone(UTC):%Y-%m-%d %H:%M:%S}+0000:" in stop, stop
    pause = next(x for x in status.out.splitlines() if x.startswith("Paused by an operator"))
    assert f"since {paused_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}+0000 " in pause, pause
    assert "+0800" not in status.out and "-0500" not in status.out, status.out
