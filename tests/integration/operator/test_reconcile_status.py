"""`crm-erp-sync reconcile` finds drift made by hand in the ERP and repairs it through the
running pipeline; `crm-erp-sync status` exit codes."""

from __future__ import annotations

from service import ops
from service.demo.load import load_demo
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running


def test_reconcile_finds_and_repairs_drift_and_status_says_so(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    load_demo(settings.crm_dsn, customers=60, orders=120, rate=None, seed=5, changes=40)
    producer = running.start_producer(settings)
    running.start_consumer(settings)
    lsn = ops.current_lsn(settings)
    wait_until(lambda: ops.caught_up(settings, lsn), timeout=120, message="pipeline caught up")

    healthy = cli(settings, "status")
    assert healthy.code == 0, healthy.out
    assert "Producer: running" in healthy.out and "OK" in healthy.out
    clean = cli(settings, "reconcile", "--chunk-size", "25")
    assert clean.code == 0, clean.out
    assert "No drift." in clean.out

    with sync_env.erp() as erp:
        gone, = erp.execute("SELECT crm_customer_id FROM erp.business_partners WHERE NOT deleted "
                            "ORDER BY crm_customer_id LIMIT 1 OFFSET 7").fetchone()
        erp.execute("DELETE FROM erp.business_partners WHERE crm_customer_id = %s", (gone,))
        changed, = erp.execute("SELECT crm_order_id FROM erp.sales_orders WHERE NOT deleted "
                               "AND status_code <> 'CANCELLED' ORDER BY crm_order_id LIMIT 1"
                               ).fetchone()
        erp.execute("UPDATE erp.sales_orders SET status_code = 'CANCELLED' "
                    "WHERE crm_order_id = %s", (changed,))
        erp.execute("INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, "
                    "source_lsn, source_seq, event_id, crm_commit_time) "
                    "VALUES ('999999', '假 人', 'U', 1, 0, 'by-hand', now())")

    drift = cli(settings, "reconcile", "--json", "--chunk-size", "25")
    assert drift.code == 1
    by_entity = {e["entity"]: e for e in drift.json["entities"]}
    assert by_entity["customers"]["missing"] == [gone]
    assert by_entity["customers"]["extra"] == ["999999"]
    assert by_entity["orders"]["differing"] == {str(changed): ["status_code"]}
    assert by_entity["demand"]["missing"] == by_entity["demand"]["extra"] == []
    only_orders = cli(settings, "reconcile", "--entity", "orders")
    assert only_orders.code == 1 and f"{changed} differs in: status_code" in only_orders.out

    repaired = cli(settings, "reconcile", "--repair", "--wait", "90", "--chunk-size", "25")
    assert repaired.code == 0, repaired.out
    assert "converged" in repaired.out and "marked 1 extra customers" in repaired.out
    again = cli(settings, "reconcile", "--json")
    assert again.code == 0 and again.json["drift"] == 0
    with sync_env.erp() as erp:
        assert erp.execute("SELECT deleted FROM erp.business_partners "
                           "WHERE crm_customer_id = '999999'").fetchone() == (True,)

    running.stop(producer)
    stopped = cli(settings, "status", "--json")
    assert stopped.code == 1
    assert any("no producer is running" in a for a in stopped.json["attention"])
    assert stopped.json["total_lag"] == 0
