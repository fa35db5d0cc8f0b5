"""The whole pipeline on a real CRM nobody here wrote: BottleCRM (django-crm 1.35.0), data
written through its own Django models, captured with the shipped ``bottlecrm`` source
profile (one tenant selected by a publication row filter), applied to the ERP.

UUID keys end to end (Kafka key, ERP rows, dead letters, ad-hoc snapshot, reconcile), a
line-only change partitioned to its account, a deactivated account deleted in the ERP, and
the other tenant's rows never published.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.cdc.capture import request_snapshot
from service.cdc.profile import PROFILES_DIR, load_profile
from service.operator.reconcile import reconcile
from service.settings import Settings
from tests.conftest import BottleCrmDb, SyncEnv
from tests.helpers import decoded_events, wait_until
from tests.integration.conftest import Cli, Running

pytestmark = pytest.mark.timeout(1500)  # the first test of a session may build the template

CAPTURED = ("accounts", "orders", "order_line_item", "product")


def _profile_for(org: str, directory: Path) -> Path:
    """The shipped profile with this test's tenant in its row filter (what a user edits)."""
    text = (PROFILES_DIR / "bottlecrm.toml").read_text("utf-8")
    path = directory / "bottlecrm.toml"
    path.write_text(text.replace("00000000-0000-0000-0000-000000000000", org), "utf-8")
    return path


def _erp(sync_env: SyncEnv, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sync_env.erp() as erp:
        return erp.execute(query, params).fetchall()


def _stock(sync_env: SyncEnv) -> dict[str, tuple[Decimal, Decimal]]:
    return {sku: (reserved, issued) for sku, reserved, issued in _erp(
        sync_env, "SELECT sku, reserved, issued FROM erp.stock "
                  "WHERE reserved <> 0 OR issued <> 0")}


def test_bottlecrm_to_the_erp(sync_env: SyncEnv, bottlecrm_db: BottleCrmDb, tmp_path: Path,
                              running: Running, cli: Cli) -> None:
    w = bottlecrm_db.writer
    org = w.create_org("演示贸易有限公司")
    other = w.create_org("另一家公司")
    # Existing data: taken by the initial snapshot.
    acme = w.create_account(org, "张三五金店", phone="138 1234 5678",
                            email="Zhang.San@Example.cn ", address_line="建国路88号",
                            city="北京市", state="北京市", country="CN", currency="CNY")
    phone = w.create_product(org, "P-PHONE-5G", "5G手机", "5000")
    laptop = w.create_product(org, "P-LAPTOP", "笔记本电脑", "8000")
    order, (line1, line2) = w.create_order(
        org, acme, [{"product": phone, "quantity": 10}, {"product": laptop, "quantity": 2}],
        status="ACTIVATED", order_number="SO-0001", currency="CNY", order_date="2026-11-29")
    stranger = w.create_account(other, "别家客户", phone="139 0000 0000")
    their_product = w.create_product(other, "P-TABLET", "平板电脑", "3000")
    w.create_order(other, stranger, [{"product": their_product, "quantity": 1}],
                   status="ACTIVATED", order_number="X-1", currency="CNY",
                   order_date="2026-11-29")
    with bottlecrm_db.connect() as crm:  # what `setup --check` tells the CRM's DBA to run
        for table in CAPTURED:
            crm.execute(f"ALTER TABLE public.{table} REPLICA IDENTITY FULL")

    settings: Settings = sync_env.with_(crm_dsn=bottlecrm_db.dsn,
                                        source_profile=str(_profile_for(org, tmp_path)))
    check = cli(settings, "setup", "--check")
    assert check.code == 0, check.out  # the stack's superuser bypasses RLS: all prerequisites
    running.start_producer(settings)
    running.start_consumer(settings)

    # Initial snapshot: the account, its order with both lines, stock reserved.
    wait_until(lambda: _erp(sync_env, "SELECT count(*) FROM erp.sales_order_items "
                                      "WHERE NOT deleted") == [(2,)],
               timeout=120, message="the snapshot's order lines in the ERP")
    assert _erp(sync_env, "SELECT crm_customer_id, full_name, phone_e164, email, province, "
                          "city, street, deleted FROM erp.business_partners") == [
        (acme, "张三五金店", "+8613812345678", "zhang.san@example.cn", "北京市", "北京市",
         "建国路88号", False)]
    assert _erp(sync_env, "SELECT crm_order_id, crm_customer_id, order_no, status_code, "
                          "currency FROM erp.sales_orders") == [
        (order, acme, "SO-0001", "PAID", "CNY")]
    assert sorted(_erp(sync_env, "SELECT crm_line_id, sku, quantity, unit_code "
                                 "FROM erp.sales_order_items")) == sorted([
        (line1, "SKU-100001", Decimal("10.000"), "PCE"),
        (line2, "SKU-100003", Decimal("2.000"), "PCE")])
    assert _stock(sync_env) == {"SKU-100001": (10, 0), "SKU-100003": (2, 0)}

    # Streaming: a line-only change, a line deleted, a new account, a status moved forward,
    # an account deactivated; the other tenant keeps writing.
    w.update_line(org, line1, quantity=12)
    w.update_line(org, line1, description="加急")  # touches the line alone: no header in it
    w.delete_line(org, line2)
    beta = w.create_account(org, "李四电器", phone="010-65521234")
    w.set_order_status(org, order, "COMPLETED")
    w.deactivate_account(org, beta)
    w.update_account(other, stranger, phone="139 1111 1111")
    wait_until(lambda: _stock(sync_env) == {"SKU-100001": (0, 12)}, timeout=120,
               message="the completed order's 12 phones issued, the deleted line gone")
    wait_until(lambda: _erp(sync_env, "SELECT deleted FROM erp.business_partners "
                                      "WHERE crm_customer_id = %s", beta) == [(True,)],
               timeout=60, message="the deactivated account deleted in the ERP")
    assert _erp(sync_env, "SELECT status_code FROM erp.sales_orders") == [("COMPLETED",)]
    assert _erp(sync_env, "SELECT crm_line_id, deleted FROM erp.sales_order_items "
                          "ORDER BY deleted") == [(line1, False), (line2, True)]

    events = decoded_events(settings)
    keys = {key.decode() for key, _kind, _event, _ in events}
    assert keys == {acme, beta}  # the other tenant's rows were never published
    line_only = [(key.decode(), ev) for key, kind, ev, _ in events
                 if kind == "order" and ev["after"] is None and ev["before"] is None]
    assert [(key, ev["key"], ev["customer_key"], [li["op"] for li in ev["lines"]])
            for key, ev in line_only] == [(acme, order, acme, ["UPDATE"])]
    assert line_only[0][1]["source"]["table"] == "public.order_line_item"

    # A dead letter keyed by the account's UUID: a product the ERP's mappings do not know.
    gamma = w.create_account(org, "王五商行", phone="138 0013 8000")
    odd = w.create_product(org, "P-UNKNOWN", "未知产品", "1")
    w.create_order(org, gamma, [{"product": odd, "quantity": 1}], status="DRAFT",
                   order_number="SO-0002", currency="CNY", order_date="2026-11-29")
    wait_until(lambda: _erp(sync_env, "SELECT count(*) FROM sync.dead_letters") == [(1,)],
               timeout=60, message="the unknown product dead-lettered")
    listed = cli(settings, "dlq", "list", "--json")
    assert listed.code == 0, listed.err
    assert [(d["key"], d["error_class"]) for d in listed.json] == [(gamma, "MappingError")]

    # An ad-hoc snapshot of one account by its UUID, re-read through the row filter.
    def account_reads() -> int:
        return sum(1 for key, _kind, ev, _ in decoded_events(settings)
                   if ev["op"] == "READ" and ev["source"]["table"] == "public.accounts"
                   and ev["key"] == acme and key.decode() == acme)

    assert account_reads() == 1  # the initial snapshot's
    with bottlecrm_db.connect() as crm:
        request_snapshot(crm, load_profile(settings.source_profile), "customer", [acme])
    wait_until(lambda: account_reads() == 2, timeout=60,
               message="the ad-hoc snapshot's READ of the account")

    running.stop_all()
    report = reconcile(settings)
    # an unmappable row behind its open letter is held (newcomer9 F10): both kinds here
    drift = {r.entity: (r.missing, r.extra, r.differing, sorted({*r.unmappable, *r.held}))
             for r in report.entities}
    # Only the dead-lettered order is out of step, and reconcile says why.
    assert drift["customers"] == ([], [], {}, [])
    assert drift["orders"][:3] == ([], [], {})
    assert len(drift["orders"][3]) == 1
    assert drift["demand"] == ([], [], {}, [])
