"""Events written before the canonical schemas (v1: the demo CRM's rows) -> canonical (v2).

v2 renamed and retyped fields (keys long -> string, amounts decimal -> exact decimal text,
lines keyed by text), so Avro schema resolution cannot read a v1 record as v2
(``tests/unit/test_schema_compat.py`` proves the checker refuses it). A topic written by an
older producer is still replayable: the consumer decodes a v1 record with its own writer
schema and this module maps it, exactly as the demo source profile maps the demo CRM's
columns, so a replayed v1 event and a fresh v2 event of the same change build the same ERP
rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Record = dict[str, Any]

_CUSTOMER_FIELDS = ("family_name", "given_name", "middle_name", "name_order", "gender",
                    "birth_date", "phone", "email", "address", "purchase_frequency",
                    "purchase_amount", "product_preference", "notes")
_V2_CUSTOMER_ONLY = ("full_name", "street", "city", "region", "postcode", "country", "currency")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _source(record: Record) -> Record:
    return {**record["source"], "profile": "demo"}


def _customer_row(row: Record | None) -> Record | None:
    if row is None:
        return None
    out: Record = {"key": str(row["customer_id"])}
    for name in _CUSTOMER_FIELDS:
        value = row.get(name)
        out[name] = _text(value) if name == "purchase_amount" else value
    out.update(dict.fromkeys(_V2_CUSTOMER_ONLY))
    return out


def customer_v1(record: Record) -> Record:
    row = record["after"] or record["before"]
    return {"event_id": record["event_id"], "op": record["op"], "source": _source(record),
            "key": str(row["customer_id"]), "before": _customer_row(record["before"]),
            "after": _customer_row(record["after"])}


def _order_row(row: Record | None) -> Record | None:
    if row is None:
        return None
    return {"key": str(row["order_id"]), "customer_key": str(row["customer_id"]),
            "order_no": row["order_no"], "order_date": row["order_date"],
            "status": row["status"], "currency": row["currency"], "total_amount": None}


def _line_row(row: Record | None) -> Record | None:
    if row is None:
        return None
    key = json.dumps([str(row["order_id"]), str(row["line_no"])], separators=(",", ":"))
    return {"key": key, "order_key": str(row["order_id"]), "product_code": row["product_code"],
            "product_name": row["product_name"], "quantity": row["quantity"], "unit": None,
            "unit_price": _text(row["unit_price"])}


def order_v1(record: Record) -> Record:
    return {"event_id": record["event_id"], "op": record["op"], "source": _source(record),
            "key": str(record["order_id"]), "customer_key": str(record["customer_id"]),
            "before": _order_row(record["before"]), "after": _order_row(record["after"]),
            "lines": [{"op": li["op"], "before": _line_row(li["before"]),
                       "after": _line_row(li["after"])} for li in record["lines"]]}


def _demand_row(row: Record | None) -> Record | None:
    if row is None:
        return None
    return {"key": str(row["demand_id"]), "kind": row["kind"],
            "product_category": row["product_category"], "content": row["content"],
            "observed_at": row["observed_at"]}


def market_demand_v1(record: Record) -> Record:
    row = record["after"] or record["before"]
    return {"event_id": record["event_id"], "op": record["op"], "source": _source(record),
            "key": str(row["demand_id"]), "before": _demand_row(record["before"]),
            "after": _demand_row(record["after"])}


UPCASTERS: dict[tuple[str, int], Callable[[Record], Record]] = {
    ("customer", 1): customer_v1,
    ("order", 1): order_v1,
    ("market_demand", 1): market_demand_v1,
}
