"""One CRM row the producer cannot read (a NaN amount, an ``infinity`` birth date) does not
stop `reconcile` or `resync`: reconcile calls its key held (table, column, reason, no value)
and checks every other row, `--repair` leaves it; resync's delete pass finishes and does not
mark its ERP row deleted (the row exists in the CRM)."""

from __future__ import annotations

from typing import Any

from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.cdc.test_slot_dropped import drop_slot_under, erp_partners, stopped_with
from tests.integration.conftest import Cli, Running, caught_up

NAMES = [("张", "三"), ("李", "四"), ("王", "五"), ("赵", "六"), ("钱", "七")]


def customers(sync_env: SyncEnv, running: Running) -> tuple[CdcProducer, list[str]]:
    """Five customers captured and applied: the producer, their keys in key order."""
    with sync_env.crm() as crm:
        ids = [str(crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                               "purchase_amount) VALUES (%s, %s, '13812345678', 5000) "
                               "RETURNING customer_id", (f, g)).fetchone()[0])
               for f, g in NAMES]
    producer = running.start_producer(sync_env.settings)
    running.start_consumer(sync_env.settings)
    caught_up(sync_env)
    return producer, ids


def capture_letters(sync_env: SyncEnv) -> list[tuple[Any, ...]]:
    with sync_env.erp() as erp:
        return erp.execute("SELECT convert_from(msg_key, 'UTF8'), error_class "
                           "FROM sync.dead_letters WHERE stage = 'capture' "
                           "ORDER BY dead_letter_id").fetchall()


def make_unreadable(sync_env: SyncEnv, nan: str, infinite: str) -> None:
    with sync_env.crm() as crm:
        crm.execute("UPDATE crm.customers SET purchase_amount = 'NaN' WHERE customer_id = %s",
                    (nan,))
        crm.execute("UPDATE crm.customers SET birth_date = 'infinity' WHERE customer_id = %s",
                    (infinite,))


def test_reconcile_holds_unreadable_rows_and_checks_the_rest(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    _, (a, b, c, d, _e) = customers(sync_env, running)
    # b and d end their chunks (--chunk-size 2): the next chunk starts after them all the same
    make_unreadable(sync_env, nan=b, infinite=d)
    wait_until(lambda: sorted(capture_letters(sync_env)) == [(b, "UnrepresentableValue"),
                                                             (d, "UnrepresentableValue")],
               timeout=90, message="the two changes are capture letters")
    with sync_env.erp() as erp:
        erp.execute("DELETE FROM erp.business_partners WHERE crm_customer_id = %s", (a,))
        erp.execute("UPDATE erp.business_partners SET full_name = '假 名' "
                    "WHERE crm_customer_id = %s", (c,))
        erp.execute("INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, "
                    "source_lsn, source_seq, event_id, crm_commit_time) "
                    "VALUES ('999999', '假 人', 'U', 1, 0, 'by-hand', now())")

    rec = cli(settings, "reconcile", "--json", "--entity", "customers", "--chunk-size", "2")
    assert rec.code == 1, rec.err  # drift: an operator is needed
    (report,) = rec.json["entities"]
    assert report["crm_rows"] == 5
    assert report["missing"] == [a]
    assert report["differing"] == {c: ["full_name"]}
    assert report["extra"] == ["999999"]
    assert report["unmappable"] == {}
    assert set(report["held"]) == {b, d}
    assert report["held"][b].startswith(
        "unreadable in the CRM (crm.customers: purchase_amount: numeric NaN is not a finite")
    assert report["held"][d].startswith("unreadable in the CRM (crm.customers: birth_date: ")
    assert all("held behind dead letter #" in why for why in report["held"].values())
    assert "13812345678" not in rec.out and "张" not in rec.out  # no row values
    text = cli(settings, "reconcile", "--entity", "customers", "--chunk-size", "2")
    assert text.code == 1
    assert f"customers {b} unreadable in the CRM (crm.customers: purchase_amount" in text.out

    with sync_env.crm() as crm:
        before = crm.execute("SELECT coalesce(max(snapshot_id), 0) FROM crm_erp_sync.snapshots"
                             ).fetchone()[0]
    repaired = cli(settings, "reconcile", "--json", "--entity", "customers", "--chunk-size", "2",
                   "--repair", "--wait", "90")
    assert repaired.code == 0, repaired.err  # the held keys remain: listed, not drift
    (left,) = repaired.json["repair"]["remaining"]
    assert left["counts"] == {"missing": 0, "extra": 0, "differing": 0, "unmappable": 0,
                              "held": 2}
    assert set(left["held"]) == {b, d}
    assert repaired.json["repair"]["marked_deleted"] == {"customers": ["999999"]}
    with sync_env.crm() as crm:
        requested = crm.execute("SELECT keys FROM crm_erp_sync.snapshots WHERE snapshot_id > %s",
                                (before,)).fetchall()
    assert requested == [([a, c],)]  # the held keys are left alone
    partners = erp_partners(sync_env)
    assert partners[b] is False and partners[d] is False and partners["999999"] is True
    assert sorted(capture_letters(sync_env)) == [(b, "UnrepresentableValue"),
                                                 (d, "UnrepresentableValue")]


def test_resync_delete_pass_finishes_past_an_unreadable_row(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    producer, (a, b, c, d, e) = customers(sync_env, running)
    make_unreadable(sync_env, nan=b, infinite=d)
    wait_until(lambda: len(capture_letters(sync_env)) == 2, timeout=90,
               message="the two changes are capture letters")
    drop_slot_under(sync_env)
    with sync_env.crm() as crm:  # nobody captures this delete
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (c,))
    wait_until(lambda: stopped_with(producer, "slot_dropped"), timeout=60,
               message="producer stopped capture")

    done = cli(settings, "resync", "--wait", "120", "--chunk-size", "2")
    assert done.code == 0, done.out + done.err
    assert "Delete pass done: 1 ERP row(s)" in done.out
    partners = erp_partners(sync_env)
    assert partners[c] is True  # gone from the CRM: marked deleted
    assert partners[b] is False and partners[d] is False  # unreadable, but in the CRM
    assert partners[a] is False and partners[e] is False
    status = cli(settings, "status", "--json")
    assert not any("resync" in line for line in status.json["attention"]), status.json
    # the resync's snapshot made the unreadable rows capture letters again, the rest flowed
    wait_until(lambda: sorted(k for k, _ in capture_letters(sync_env)) == [b, b, d, d],
               timeout=90, message="the resync snapshot's capture letters")
    again = cli(settings, "resync")
    assert again.code == 0 and "Nothing to resync" in again.out


def letter_of(sync_env: SyncEnv, table: str, key: str) -> int:
    """The one unresolved capture letter of a CRM row (source_table, source_key)."""
    with sync_env.erp() as erp:
        [(letter,)] = erp.execute(
            "SELECT dead_letter_id FROM sync.dead_letters WHERE stage = 'capture' "
            "AND state = 'open' AND source_table = %s AND source_key = %s",
            (table, key)).fetchall()
    return int(letter)


def test_reconcile_names_each_unreadable_rows_own_capture_letter(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    """For every entity: an unreadable customer, an unreadable order (its header, or a line),
    each named with the number of the capture letter of the very row that cannot be read.
    An order travels under its customer's key: its own key (here equal to an unreadable
    customer's) must not name that customer's letter."""
    settings = sync_env.settings
    _, (a, _b, c, _d, _e) = customers(sync_env, running)
    header, lined = int(c), 9002  # the header's key is also customer c's
    with sync_env.crm() as crm:
        for order_id in (header, lined):
            with crm.transaction():
                crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                            "order_date, status, currency) VALUES (%s, %s, %s, '2023-01-01', "
                            "'已发货', '元')", (order_id, f"X{order_id}", a))
                crm.execute("INSERT INTO crm.order_lines VALUES (%s, 1, %s, 'P-PHONE-5G', "
                            "'手机', '10台', 5000)", (order_id, a))
    caught_up(sync_env)
    with sync_env.crm() as crm:
        crm.execute("UPDATE crm.customers SET purchase_amount = 'NaN' WHERE customer_id = %s",
                    (c,))
        crm.execute("UPDATE crm.sales_orders SET order_date = 'infinity' WHERE order_id = %s",
                    (header,))
        crm.execute("UPDATE crm.order_lines SET unit_price = 'NaN' WHERE order_id = %s",
                    (lined,))
    wait_until(lambda: len(capture_letters(sync_env)) == 3, timeout=90,
               message="the three changes are capture letters")
    line_key = f'["{lined}","1"]'
    customer_letter = letter_of(sync_env, "crm.customers", c)
    header_letter = letter_of(sync_env, "crm.sales_orders", str(header))
    line_letter = letter_of(sync_env, "crm.order_lines", line_key)

    rec = cli(settings, "reconcile", "--json", "--entity", "customers", "--entity", "orders")
    assert rec.code == 0 and rec.json["drift"] == 0, rec.err  # held only: listed, not drift
    held = {r["entity"]: r["held"] for r in rec.json["entities"]}
    behind = "held behind dead letter #{} (capture: UnrepresentableValue)"
    assert held["customers"] == {
        c: "unreadable in the CRM (crm.customers: purchase_amount: numeric NaN is not a finite "
           "number: no event carries it), " + behind.format(customer_letter)}
    assert set(held["orders"]) == {str(header), str(lined)}
    assert held["orders"][str(header)].startswith(
        "unreadable in the CRM (crm.sales_orders: order_date: ")
    assert held["orders"][str(header)].endswith(", " + behind.format(header_letter))
    assert f"#{customer_letter} " not in held["orders"][str(header)]
    assert held["orders"][str(lined)].startswith(
        f"unreadable in the CRM (crm.order_lines {line_key}: unit_price: numeric NaN")
    assert held["orders"][str(lined)].endswith(", " + behind.format(line_letter))
    text = cli(settings, "reconcile", "--entity", "orders")
    assert f"#{header_letter} (capture" in text.out and f"#{line_letter} (capture" in text.out
