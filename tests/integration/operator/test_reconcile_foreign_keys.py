"""An ERP row whose key could never be a CRM key (text where the CRM's keys are integers, as an
ERP migrated from another CRM or typed in by hand holds) is *extra*: reconcile reports it,
``--repair`` marks it deleted, resync's delete pass does too, and every other key and entity
is still reconciled (issue F2: the cast of that key used to fail the whole pass)."""

from __future__ import annotations

import psycopg

from service import ops
from service.cdc.capture import read_table_info, typed_keys
from service.cdc.profile import load_profile
from service.demo.load import load_demo
from service.operator.reconcile import ENTITIES, Reconciler
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running

BY_HAND = ("INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, "
           "source_lsn, source_seq, event_id, crm_commit_time) "
           "VALUES (%s, '假 人', 'U', 1, 0, 'by-hand', now())")


def test_a_key_not_of_the_crm_keys_type_is_extra_and_the_rest_is_reconciled(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    load_demo(settings.crm_dsn, customers=12, orders=15, rate=None, seed=7, changes=0)
    running.start_producer(settings)
    running.start_consumer(settings)
    lsn = ops.current_lsn(settings)
    wait_until(lambda: ops.caught_up(settings, lsn), timeout=120, message="pipeline caught up")

    with sync_env.erp() as erp:
        erp.execute(BY_HAND, ("not-a-number",))
        erp.execute(BY_HAND, ("99999999999999999999",))  # digits, but beyond the CRM's integer
        changed, = erp.execute("SELECT crm_order_id FROM erp.sales_orders WHERE NOT deleted "
                               "AND status_code <> 'CANCELLED' ORDER BY crm_order_id LIMIT 1"
                               ).fetchone()
        erp.execute("UPDATE erp.sales_orders SET status_code = 'CANCELLED' "
                    "WHERE crm_order_id = %s", (changed,))
        erp.execute("INSERT INTO erp.sales_orders (crm_order_id, order_no, crm_customer_id, "
                    "order_date, status_code, currency, source_lsn, source_seq, event_id, "
                    "crm_commit_time) VALUES ('SO-by-hand', 'SO-X', 'not-a-number', "
                    "current_date, 'OPEN', 'CNY', 1, 0, 'by-hand', now())")

    drift = cli(settings, "reconcile", "--json", "--chunk-size", "5")
    assert drift.code == 1, drift.out
    by_entity = {e["entity"]: e for e in drift.json["entities"]}
    assert sorted(by_entity["customers"]["extra"]) == ["99999999999999999999", "not-a-number"]
    assert by_entity["customers"]["missing"] == []
    assert by_entity["orders"]["extra"] == ["SO-by-hand"]
    assert by_entity["orders"]["differing"] == {str(changed): ["status_code"]}

    repaired = cli(settings, "reconcile", "--repair", "--wait", "90", "--chunk-size", "5")
    assert repaired.code == 0, repaired.out
    assert "converged" in repaired.out
    with sync_env.erp() as erp:
        assert erp.execute("SELECT crm_customer_id, deleted FROM erp.business_partners "
                           "WHERE event_id = 'by-hand' ORDER BY 1").fetchall() == [
            ("99999999999999999999", True), ("not-a-number", True)]
        assert erp.execute("SELECT deleted FROM erp.sales_orders "
                           "WHERE crm_order_id = 'SO-by-hand'").fetchone() == (True,)

    # resync's delete pass reads the CRM through the same keyed read
    with sync_env.erp() as erp:
        erp.execute("UPDATE erp.business_partners SET deleted = false "
                    "WHERE crm_customer_id = 'not-a-number'")
    rec = Reconciler(settings, chunk_size=5)
    try:
        assert rec.mark_gone(ENTITIES["customers"]) == ["not-a-number"]
    finally:
        rec.close()


def test_typed_keys_lets_postgresql_split_composite_keys_and_keeps_the_connection(
        sync_env: SyncEnv) -> None:
    """The demo's order lines are keyed (order_id bigint, line_no integer): a key with a
    value out of a column's range, one that is not a number, one that is not a JSON array of
    two strings are not keys; the connection, inside a transaction, is still usable."""
    settings = sync_env.settings
    profile = load_profile(settings.source_profile)
    with psycopg.connect(settings.crm_dsn) as conn:  # not autocommit: a transaction is open
        conn.execute("SELECT 1")
        info = read_table_info(conn, profile)["crm.order_lines"]
        keys = ['["1","2"]', '["x","2"]', "garbage", '["1","99999999999"]', '["7","1"]',
                '["1"]', '[" 12 ","3"]']
        good, bad = typed_keys(conn, info, keys)
        assert good == ['["1","2"]', '["7","1"]', '[" 12 ","3"]']  # PostgreSQL reads " 12 "
        assert bad == ['["x","2"]', "garbage", '["1","99999999999"]', '["1"]']
        assert typed_keys(conn, info, []) == ([], [])
        assert conn.execute("SELECT 2").fetchone() == (2,)
        orders = read_table_info(conn, profile)["crm.sales_orders"]
        assert typed_keys(conn, orders, ["5", "-5", "5.0", "1e3", "not-a-number"]) == (
            ["5", "-5"], ["5.0", "1e3", "not-a-number"])
