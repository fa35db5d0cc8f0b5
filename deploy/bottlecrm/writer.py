"""Write CRM data into a BottleCRM database through BottleCRM's own Django models.

Runs INSIDE the BottleCRM venv that deploy/bottlecrm/install.sh builds (Python 3.12,
django-crm 1.35.0), never in the project's venv: it imports BottleCRM's models, so what lands
in the database is what the CRM itself writes (its UUID keys, defaults, org checks, the line
``total`` its ``OrderLineItem.save`` computes), not SQL we made up.

    <venv>/bin/python deploy/bottlecrm/writer.py --dsn postgresql://user:pw@host:port/db

Protocol (one process serves many commands because Django start-up takes seconds): after
``django.setup()`` it prints ``{"ok": true, "ready": true}``; then each line on stdin is one
JSON command ``{"op": NAME, ...arguments}`` and it answers each with exactly one JSON line on
stdout: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": CLASS, "message": TEXT}``.
Keys are UUID strings; decimals may be given as JSON numbers or strings and come back as
strings. stdout carries nothing else (Django's own output goes to stderr). EOF ends it.

Operations (every one except ``create_org``/``ping`` takes ``org``, the tenant's UUID):
  ping
  create_org(name, currency="CNY")                                  -> {id}
  create_account(org, name, **Account fields)                       -> {id}
  update_account(org, account, fields={...})                        -> {id}
  deactivate_account(org, account)                                  -> {id}   is_active=false
  create_contact(org, first_name, last_name, account=None, **fields) -> {id}
  create_product(org, sku, name, price, currency=None, **fields)    -> {id}
  create_order(org, account, lines=[{product?, name?, quantity, unit_price,
               discount_amount?}], status="DRAFT", **Order fields)  -> {id, lines: [id…]}
  set_order_status(org, order, status)                              -> {id}
  update_order(org, order, fields={...})                            -> {id}
  add_line(org, order, product?, name?, quantity, unit_price, ...)  -> {id}
  update_line(org, line, fields={...})                              -> {id}
  delete_line(org, line)                                            -> {id}
  delete_order(org, order)                                          -> {id}

Row-level security: BottleCRM forces RLS on its org-scoped tables; the policies compare
``org_id`` with the session setting ``app.current_org``. Outside a request (Celery tasks,
management commands) the app sets it itself with ``common.tasks.set_rls_context(org_id)`` and
clears it after; the web middleware (``RequireOrgContext``) does the same around each request.
This writer does exactly that around each command, so it also works under a role that RLS
binds (a superuser such as the local stack's ``sync`` bypasses RLS anyway).

Order totals: BottleCRM 1.35.0 has no order API or service that sums lines (only the Django
admin edits orders), so after a line change the writer sets ``subtotal`` = sum of line totals
and ``total_amount`` = subtotal - discount_amount + tax_amount, the way the admin user would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

# stdout is the protocol channel: keep Django's and the app's prints off it.
PROTO_OUT = sys.stdout
sys.stdout = sys.stderr


def _configure_from_dsn(dsn: str) -> None:
    """BottleCRM's crm.settings reads DBNAME/DBUSER/DBPASSWORD/DBHOST/DBPORT."""
    parts = urlsplit(dsn)
    env = {
        "DBNAME": unquote(parts.path.lstrip("/")),
        "DBUSER": unquote(parts.username or ""),
        "DBPASSWORD": unquote(parts.password or ""),
        "DBHOST": parts.hostname or "127.0.0.1",
        "DBPORT": str(parts.port or 5432),
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crm.settings")
    os.environ.setdefault("ENV_TYPE", "dev")
    os.environ.setdefault("SECRET_KEY", "crm-erp-sync-tests-only-not-a-real-secret-key")


def _answer(payload: dict[str, Any]) -> None:
    PROTO_OUT.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")
    PROTO_OUT.flush()


class Writer:
    """The commands; imported models live on the instance after django.setup()."""

    def __init__(self) -> None:
        from accounts.models import Account
        from common.models import Org
        from common.tasks import clear_rls_context, set_rls_context
        from contacts.models import Contact
        from django.db import transaction
        from invoices.models import Product
        from orders.models import ORDER_STATUS, Order, OrderLineItem

        # BottleCRM's own choices (DRAFT, ACTIVATED, COMPLETED, CANCELLED): its admin, the
        # only editor of orders in 1.35.0, offers no other status, so the writer refuses one.
        self.order_statuses = tuple(code for code, _label in ORDER_STATUS)
        self.Account, self.Org, self.Contact = Account, Org, Contact
        self.Product, self.Order, self.OrderLineItem = Product, Order, OrderLineItem
        self.transaction = transaction
        self.set_rls_context, self.clear_rls_context = set_rls_context, clear_rls_context

    # ---- dispatch ------------------------------------------------------------------------
    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.pop("op", None)
        method: Callable[..., dict[str, Any]] | None = getattr(self, f"op_{op}", None)
        if not isinstance(op, str) or method is None:
            raise ValueError(f"unknown op {op!r}")
        org = command.pop("org", None)
        if op in ("ping", "create_org"):
            return method(**command)
        if not org:
            raise ValueError(f"{op} needs 'org' (the tenant UUID) for the RLS context")
        self.set_rls_context(org)
        try:
            with self.transaction.atomic():
                return method(org, **command)
        finally:
            self.clear_rls_context()

    # ---- org, accounts, contacts, products -------------------------------------------------
    def op_ping(self) -> dict[str, Any]:
        return {"pong": True}

    def op_create_org(self, name: str, currency: str = "CNY", **fields: Any) -> dict[str, Any]:
        org = self.Org.objects.create(name=name, default_currency=currency, **fields)
        return {"id": str(org.id)}

    def op_create_account(self, org: str, name: str, **fields: Any) -> dict[str, Any]:
        account = self.Account.objects.create(org_id=org, name=name,
                                              **_by_id(self.Account, fields))
        return {"id": str(account.id)}

    def op_update_account(self, org: str, account: str, fields: dict[str, Any]) -> dict[str, Any]:
        row = self.Account.objects.get(id=account, org_id=org)
        return self._update(row, fields)

    def op_deactivate_account(self, org: str, account: str) -> dict[str, Any]:
        return self.op_update_account(org, account, {"is_active": False})

    def op_create_contact(self, org: str, first_name: str, last_name: str,
                          account: str | None = None, **fields: Any) -> dict[str, Any]:
        contact = self.Contact.objects.create(org_id=org, first_name=first_name,
                                              last_name=last_name, account_id=account,
                                              **_by_id(self.Contact, fields))
        return {"id": str(contact.id)}

    def op_create_product(self, org: str, sku: str, name: str, price: Any,
                          **fields: Any) -> dict[str, Any]:
        product = self.Product.objects.create(org_id=org, sku=sku, name=name,
                                              price=_decimal(price),
                                              **_by_id(self.Product, fields))
        return {"id": str(product.id)}

    # ---- orders and lines ------------------------------------------------------------------
    def op_create_order(self, org: str, account: str, lines: list[dict[str, Any]] | None = None,
                        status: str = "DRAFT", name: str | None = None,
                        **fields: Any) -> dict[str, Any]:
        self._check_status(status)
        if "order_date" in fields and isinstance(fields["order_date"], str):
            fields["order_date"] = dt.date.fromisoformat(fields["order_date"])
        order = self.Order.objects.create(org_id=org, account_id=account, status=status,
                                          name=name or "Order", **_by_id(self.Order, fields))
        line_ids = [self._add_line(order, i, line) for i, line in enumerate(lines or [])]
        self._recompute_totals(order)
        return {"id": str(order.id), "lines": line_ids}

    def op_set_order_status(self, org: str, order: str, status: str) -> dict[str, Any]:
        self._check_status(status)
        row = self.Order.objects.get(id=order, org_id=org)
        return self._update(row, {"status": status})

    def op_update_order(self, org: str, order: str, fields: dict[str, Any]) -> dict[str, Any]:
        if "status" in fields:
            self._check_status(fields["status"])
        row = self.Order.objects.get(id=order, org_id=org)
        return self._update(row, fields)

    def op_add_line(self, org: str, order: str, **line: Any) -> dict[str, Any]:
        row = self.Order.objects.get(id=order, org_id=org)
        next_sort = row.line_items.count()
        line_id = self._add_line(row, next_sort, line)
        self._recompute_totals(row)
        return {"id": line_id}

    def op_update_line(self, org: str, line: str, fields: dict[str, Any]) -> dict[str, Any]:
        row = self.OrderLineItem.objects.select_related("order").get(id=line, org_id=org)
        for money in ("quantity", "unit_price", "discount_amount"):
            if money in fields:
                fields[money] = _decimal(fields[money])
        result = self._update(row, fields)
        # Only a change that moves money moves the order's totals (a description or the
        # sort order does not): such a transaction touches the line alone.
        if {"quantity", "unit_price", "discount_amount"} & set(fields):
            self._recompute_totals(row.order)
        return result

    def op_delete_line(self, org: str, line: str) -> dict[str, Any]:
        row = self.OrderLineItem.objects.select_related("order").get(id=line, org_id=org)
        order = row.order
        row.delete()
        self._recompute_totals(order)
        return {"id": line}

    def op_delete_order(self, org: str, order: str) -> dict[str, Any]:
        self.Order.objects.get(id=order, org_id=org).delete()
        return {"id": order}

    # ---- helpers ---------------------------------------------------------------------------
    def _check_status(self, status: str) -> None:
        if status not in self.order_statuses:
            raise ValueError(f"order status must be one of {self.order_statuses}")

    def _add_line(self, order: Any, sort_order: int, line: dict[str, Any]) -> str:
        product_id = line.get("product")
        name = line.get("name")
        unit_price = line.get("unit_price")
        if product_id and (name is None or unit_price is None):
            product = self.Product.objects.get(id=product_id, org_id=order.org_id)
            name = product.name if name is None else name
            unit_price = product.price if unit_price is None else unit_price
        item = self.OrderLineItem(
            org_id=order.org_id, order=order, product_id=product_id, name=name or "",
            description=line.get("description", ""),
            quantity=_decimal(line.get("quantity", 1)),
            unit_price=_decimal(unit_price if unit_price is not None else 0),
            discount_amount=_decimal(line.get("discount_amount", 0)),
            sort_order=line.get("sort_order", sort_order),
        )
        item.save()
        return str(item.id)

    def _recompute_totals(self, order: Any) -> None:
        subtotal = sum((li.total for li in order.line_items.all()), Decimal("0"))
        order.subtotal = subtotal
        order.total_amount = subtotal - order.discount_amount + order.tax_amount
        order.save(update_fields=["subtotal", "total_amount", "updated_at"])

    @staticmethod
    def _update(row: Any, fields: dict[str, Any]) -> dict[str, Any]:
        for name, value in _by_id(type(row), fields).items():
            setattr(row, name, value)
        row.save()
        return {"id": str(row.id)}


def _by_id(model: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Foreign keys arrive as UUID strings: ``contact`` becomes ``contact_id``."""
    from django.core.exceptions import FieldDoesNotExist

    out = {}
    for name, value in fields.items():
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            field = None
        if field is not None and field.many_to_one:
            name = field.attname
        out[name] = value
    return out


def _decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="postgresql://user:password@host:port/db")
    args = parser.parse_args(argv)
    _configure_from_dsn(args.dsn)

    import django

    django.setup()
    writer = Writer()
    _answer({"ok": True, "ready": True, "django": django.get_version()})
    for raw in sys.stdin:
        if not raw.strip():
            continue
        try:
            command = json.loads(raw, parse_float=Decimal)
            if not isinstance(command, dict):
                raise ValueError("a command is a JSON object")
            _answer({"ok": True, "result": writer.handle(command)})
        except Exception as exc:  # one bad command must not end the session
            if os.environ.get("BOTTLECRM_WRITER_DEBUG"):  # tracebacks may quote CRM data
                traceback.print_exc(file=sys.stderr)
            _answer({"ok": False, "error": type(exc).__name__, "message": str(exc)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
