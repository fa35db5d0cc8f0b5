"""The BottleCRM writer: CRM data written through BottleCRM's own Django models lands in its
real tables (UUID keys, org_id tenant, no account on an order line), on a database cloned
from the migrated template."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from service.demo import bottlecrm
from service.demo.bottlecrm import Role
from tests.conftest import BottleCrmDb

pytestmark = pytest.mark.timeout(1500)  # the first test of a session may build the template


def _columns(conn: Any, table: str) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = %s", (table,)).fetchall())


def test_an_order_with_two_lines_written_through_the_models(bottlecrm_db: BottleCrmDb) -> None:
    w = bottlecrm_db.writer
    org = w.create_org("演示贸易有限公司")
    account = w.create_account(org, "张三五金店", phone="138 1234 5678", city="北京市",
                               state="朝阳区", country="CN", currency="CNY")
    contact = w.create_contact(org, "三", "张", account=account, phone="138 1234 5678")
    server = w.create_product(org, "SKU-100001", "服务器", "5000")
    screen = w.create_product(org, "SKU-100005", "显示器", "1200.50")
    order, lines = w.create_order(
        org, account, [{"product": server, "quantity": 10},
                       {"product": screen, "quantity": 2, "unit_price": "1000"}],
        order_number="SO-0001", currency="CNY", contact=contact)
    assert len(lines) == 2

    with bottlecrm_db.connect() as conn:  # the stack's superuser: reads past BottleCRM's RLS
        for key in (org, account, contact, server, screen, order, *lines):
            assert str(uuid.UUID(key)) == key
        assert conn.execute("SELECT id::text, org_id::text, name, is_active FROM accounts"
                            ).fetchall() == [(account, org, "张三五金店", True)]
        assert conn.execute("SELECT account_id::text, org_id::text FROM contacts"
                            ).fetchall() == [(account, org)]
        assert sorted(conn.execute("SELECT sku, price, org_id::text FROM product").fetchall()) \
            == [("SKU-100001", Decimal("5000.00"), org), ("SKU-100005", Decimal("1200.50"), org)]
        assert conn.execute(
            "SELECT account_id::text, org_id::text, status, order_number, subtotal, total_amount"
            " FROM orders").fetchall() == [
            (account, org, "DRAFT", "SO-0001", Decimal("52000.00"), Decimal("52000.00"))]
        assert conn.execute(
            "SELECT id::text, order_id::text, org_id::text, product_id::text, name, quantity,"
            " unit_price, total FROM order_line_item ORDER BY sort_order").fetchall() == [
            (lines[0], order, org, server, "服务器", Decimal("10.00"), Decimal("5000.00"),
             Decimal("50000.00")),
            (lines[1], order, org, screen, "显示器", Decimal("2.00"), Decimal("1000.00"),
             Decimal("2000.00")),
        ]
        line_columns = _columns(conn, "order_line_item")
        assert "account_id" not in line_columns and "order_id" in line_columns
        for table in ("accounts", "contacts", "orders", "order_line_item", "product"):
            columns = _columns(conn, table)
            assert (columns["id"], columns["org_id"]) == ("uuid", "uuid"), table


def test_status_changes_line_edits_and_deactivation(bottlecrm_db: BottleCrmDb) -> None:
    w = bottlecrm_db.writer
    org = w.create_org("演示贸易有限公司")
    account = w.create_account(org, "张三五金店")
    product = w.create_product(org, "SKU-1", "服务器", 5000)
    order, (first, second) = w.create_order(org, account, [{"product": product, "quantity": 10},
                                                           {"product": product, "quantity": 1}])
    w.set_order_status(org, order, "ACTIVATED")
    w.update_line(org, first, quantity=11)
    w.delete_line(org, second)
    w.deactivate_account(org, account)
    w.update_account(org, account, city="上海市")

    with pytest.raises(bottlecrm.WriterError) as refused:
        w.set_order_status(org, order, "已发货")
    assert refused.value.error == "ValueError"
    with pytest.raises(bottlecrm.WriterError) as duplicate:  # BottleCRM's own constraint
        w.create_account(org, "张三五金店")
    assert duplicate.value.error == "IntegrityError"

    with bottlecrm_db.connect() as conn:
        assert conn.execute("SELECT status, total_amount FROM orders").fetchone() == (
            "ACTIVATED", Decimal("55000.00"))
        assert conn.execute("SELECT id::text, quantity, total FROM order_line_item"
                            ).fetchall() == [(first, Decimal("11.00"), Decimal("55000.00"))]
        assert conn.execute("SELECT is_active, city FROM accounts").fetchone() == (False, "上海市")


def test_the_writer_works_under_a_role_that_rls_binds(bottlecrm_db: BottleCrmDb,
                                                      app_role: Role) -> None:
    """BottleCRM's policies refuse an insert whose org_id is not ``app.current_org``; the
    writer sets the context per command, as BottleCRM's Celery tasks and middleware do."""
    with bottlecrm_db.connect() as admin:
        admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public'
                      f' TO "{app_role.name}"')
        assert admin.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s",
                             (app_role.name,)).fetchone() == (False,)
    writer = bottlecrm.Writer(app_role.dsn(bottlecrm_db.dsn))
    try:
        org = writer.create_org("演示贸易有限公司")
        other = writer.create_org("另一家公司")
        account = writer.create_account(org, "张三五金店")
        product = writer.create_product(org, "SKU-1", "服务器", 5000)
        order, (line,) = writer.create_order(org, account, [{"product": product, "quantity": 3}])
        writer.set_order_status(org, order, "COMPLETED")
        with pytest.raises(bottlecrm.WriterError):  # another tenant's context sees no order
            writer.set_order_status(other, order, "CANCELLED")
    finally:
        writer.close()
    with bottlecrm_db.connect() as conn:
        assert conn.execute("SELECT o.org_id::text, o.status, l.id::text FROM orders o"
                            " JOIN order_line_item l ON l.order_id = o.id").fetchall() == [
            (org, "COMPLETED", line)]
    with psycopg.connect(app_role.dsn(bottlecrm_db.dsn), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)  # no context
