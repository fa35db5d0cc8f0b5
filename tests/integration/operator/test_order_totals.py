"""An order's total reaches the sql ERP (``erp.sales_orders.total_amount``, added by `setup` to
an ERP set up before it), is checked as README "How values are read" says (more than two
decimals: a dead letter naming ``total_amount``) and is compared by `reconcile` (issue F3:
the profiles mapped it, the events carried it, the ERP dropped it)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from service import ops
from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.cdc.profile import PROFILES_DIR
from service.demo.load import load_demo
from service.erp.mappings import Mappings
from service.erp.sql_target import SqlTarget
from service.errors import ConfigError
from service.setup import run_setup
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running


def _profile_with_totals(tmp_path: Path) -> Path:
    """The demo profile, its orders' ``total_amount`` column mapped (BottleCRM's way)."""
    demo = (PROFILES_DIR / "demo.toml").read_text("utf-8")
    assert '[order.fields]\n' in demo
    path = tmp_path / "demo-with-totals.toml"
    path.write_text(demo.replace('[order.fields]\n',
                                 '[order.fields]\ntotal_amount = "total_amount"\n', 1), "utf-8")
    return path


def test_order_totals_are_stored_checked_and_reconciled(
        sync_env: SyncEnv, cli: Cli, running: Running, tmp_path: Path) -> None:
    # An ERP set up before the column: consumers refuse it by name until setup adds it.
    with sync_env.erp() as erp:
        erp.execute("ALTER TABLE erp.sales_orders DROP COLUMN total_amount")
        target = SqlTarget(sync_env.settings, Mappings.load())
        with pytest.raises(ConfigError, match=r"total_amount.*crm-erp-sync setup"):
            target.attach(erp)
    settings = sync_env.with_(source_profile=str(_profile_with_totals(tmp_path)))
    run_setup(settings)
    with sync_env.erp() as erp:
        SqlTarget(settings, Mappings.load()).attach(erp)  # no error now

    load_demo(settings.crm_dsn, customers=4, orders=6, rate=None, seed=3, changes=0)
    with sync_env.crm() as crm:
        crm.execute("ALTER TABLE crm.sales_orders ADD COLUMN total_amount numeric(16, 3)")
        ids = [r[0] for r in crm.execute(
            "SELECT order_id FROM crm.sales_orders ORDER BY order_id").fetchall()]
        crm.execute("UPDATE crm.sales_orders SET total_amount = 50000 WHERE order_id = %s",
                    (ids[0],))
        crm.execute("UPDATE crm.sales_orders SET total_amount = 12.345 WHERE order_id = %s",
                    (ids[1],))
    good, bad = str(ids[0]), str(ids[1])

    running.start_producer(settings)
    running.start_consumer(settings)
    lsn = ops.current_lsn(settings)
    # the orders were there before the producer: they arrive with its initial snapshot, which
    # may still be under way when the slot has passed lsn (snapshot finished first, then lag)
    wait_until(lambda: not ops.pending_snapshots(settings) and ops.caught_up(settings, lsn),
               timeout=120, message="initial snapshot applied")

    with sync_env.erp() as erp:
        totals = dict(erp.execute("SELECT crm_order_id, total_amount FROM erp.sales_orders "
                                  "WHERE NOT deleted").fetchall())
        assert totals[good] == Decimal("50000.00")
        assert bad not in totals  # dead-lettered, not rounded to 12.35
        assert all(totals[str(i)] is None for i in ids[2:] if str(i) in totals)
        letters = erp.execute("SELECT error_class, error_message FROM sync.dead_letters "
                              "WHERE event_kind = 'order'").fetchall()
    assert len(letters) == 1, letters
    assert letters[0][0] == "MappingError"
    assert "total_amount" in letters[0][1] and "two decimal places" in letters[0][1]

    with sync_env.erp() as erp:
        erp.execute("UPDATE erp.sales_orders SET total_amount = 49999.99 "
                    "WHERE crm_order_id = %s", (good,))
    drift = cli(settings, "reconcile", "--json", "--entity", "orders")
    assert drift.code == 1, drift.out
    [orders] = drift.json["entities"]
    assert orders["differing"] == {good: ["total_amount"]}
    cli(settings, "reconcile", "--repair", "--entity", "orders", "--wait", "60")
    after = cli(settings, "reconcile", "--json", "--entity", "orders")
    [orders] = after.json["entities"]
    assert orders["differing"] == {} and orders["unmappable"] == {}, after.out
    assert orders["held"][bad].startswith("cannot be mapped: MappingError"), after.out
    with sync_env.erp() as erp:
        assert erp.execute("SELECT total_amount FROM erp.sales_orders WHERE crm_order_id = %s",
                           (good,)).fetchone() == (Decimal("50000.00"),)


def test_a_drifted_total_held_behind_another_orders_letter_says_how_it_differs(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    # newcomer7: order A applied, order B of the same customer dead-lettered (12.345); the
    # ERP's total of A edited. A is `held` (a re-snapshot would be held behind B's letter
    # too), but that hid its drift: the note now says what differs.
    from service.avro import SchemaRegistry
    from service.cdc.producer import CdcProducer
    from service.consumer.pipeline import ErpConsumer
    from tests.helpers import consume_until_caught_up

    settings = sync_env.with_(source_profile=str(_profile_with_totals(tmp_path)))
    with sync_env.crm() as crm:
        crm.execute("ALTER TABLE crm.sales_orders ADD COLUMN total_amount numeric(16, 3)")
    run_setup(settings)
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('张', '三', '13812345678') RETURNING customer_id").fetchone()[0]
        for order_id, total in ((981, "5000"), (982, "12.345")):
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency, total_amount) VALUES (%s, %s, %s, "
                        "'2023-01-01', '已发货', '元', %s)",
                        (order_id, f"X{order_id}", buyer, total))
    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    consume_until_caught_up(ErpConsumer(settings))
    with sync_env.erp() as erp:
        assert erp.execute("UPDATE erp.sales_orders SET total_amount = 4999.99 "
                           "WHERE crm_order_id = '981'").rowcount == 1

    drift = cli(settings, "reconcile", "--json", "--entity", "orders")
    # held (listed, the note says what differs), not drift while B's letter is open (F10)
    assert drift.code == 0, drift.out
    [orders] = drift.json["entities"]
    assert orders["held"]["981"].startswith("held behind dead letter #"), orders
    assert orders["held"]["981"].endswith("(differs in: total_amount)"), orders
    assert "differs in" not in orders["held"].get("982", ""), orders


def test_setup_says_it_added_the_total_column_and_what_the_old_orders_need(
        sync_env: SyncEnv, cli: Cli) -> None:
    # newcomer7 F6: the upgrade printed only "ERP: schema sync in place", and every order
    # applied before then differed in total_amount at the next reconcile.
    with sync_env.erp() as erp:
        erp.execute("ALTER TABLE erp.sales_orders DROP COLUMN total_amount")
    upgraded = cli(sync_env.settings, "setup")
    assert upgraded.code == 0, upgraded.err
    assert ("ERP: added erp.sales_orders.total_amount; orders applied before have none "
            "(NULL) until re-read") in upgraded.out, upgraded.out
    assert "reconcile --repair --entity orders" in upgraded.out
    again = cli(sync_env.settings, "setup")  # nothing added the second time
    assert again.code == 0 and "added erp.sales_orders" not in again.out, again.out


def test_status_names_the_missing_total_column_as_why_no_consumer_runs(
        sync_env: SyncEnv, cli: Cli) -> None:
    # newcomer7 F6: consumers refused such an ERP (exit 2), and status said only "N event(s)
    # wait but group G has no member: start a consumer".
    with sync_env.erp() as erp:
        erp.execute("ALTER TABLE erp.sales_orders DROP COLUMN total_amount")
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('张', '三', '13800005678')")
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)  # events wait, no consumer can take them

    said = cli(sync_env.settings, "status", "--json")
    assert said.code == 1, said.out
    refusal = ("the ERP database has no erp.sales_orders.total_amount column: run "
               "`crm-erp-sync setup`")
    assert said.json["erp_not_set_up"].startswith(refusal), said.json
    attention = said.json["attention"]
    assert any(a.startswith(f"consumers refuse to start (exit 2): {refusal}")
               for a in attention), attention
    assert any("event(s) wait but group" in a and "has no member: consumers cannot start "
               "until `crm-erp-sync setup` has run" in a for a in attention), attention
    assert not any("start a consumer" in a for a in attention), attention
    assert not said.json["ok"]
    text = cli(sync_env.settings, "status")
    assert text.code == 1 and text.out.rstrip().splitlines()[-1] != "OK", text.out
    assert f"consumers refuse to start (exit 2): {refusal}" in text.out

    assert cli(sync_env.settings, "setup").code == 0
    after = cli(sync_env.settings, "status", "--json")
    assert after.json["erp_not_set_up"] is None
    assert not any("consumers" in a and "start" in a and "exit 2" in a
                   for a in after.json["attention"]), after.json["attention"]
    assert any("has no member: start a consumer" in a for a in after.json["attention"])
