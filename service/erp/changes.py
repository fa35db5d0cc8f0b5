"""CRM event records -> ERP rows (pure). Every mapping failure names its field.

A delete becomes a tombstone (deleted = true) carrying the event's position, so an older event
that arrives later (a replay, a rebalance overlap) cannot bring the row back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from service.erp import transform as tf
from service.erp.mappings import Mappings
from service.errors import MappingError


@dataclass(frozen=True, slots=True)
class Position:
    lsn: int
    seq: int
    event_id: str
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class PartnerRow:
    crm_customer_id: int
    deleted: bool
    full_name: str
    gender_code: str
    birth_date: date | None
    age: int | None
    phone_e164: str | None
    email: str | None
    province: str | None
    city: str | None
    district: str | None
    street: str | None
    purchase_frequency: str | None
    purchase_amount: Decimal | None
    amount_currency: str | None
    product_preference: str | None
    notes: str | None
    pos: Position
    phone_extension: str | None = None
    phone_others: tuple[str, ...] = ()
    division_code: str | None = None


@dataclass(frozen=True, slots=True)
class OrderHeaderRow:
    crm_order_id: int
    order_no: str
    crm_customer_id: int
    order_date: date
    status_code: str
    currency: str
    deleted: bool
    pos: Position


@dataclass(frozen=True, slots=True)
class OrderItemRow:
    crm_order_id: int
    line_no: int
    sku: str
    product_name: str
    quantity: Decimal
    unit_code: str
    unit_price: Decimal
    deleted: bool
    pos: Position


@dataclass(frozen=True, slots=True)
class DemandRow:
    crm_demand_id: int
    signal_type: str
    product_category: str
    content: str
    observed_at: datetime
    deleted: bool
    pos: Position


@dataclass(slots=True)
class ErpChange:
    """What one event does to the ERP."""

    kind: str
    customer_id: int | None  # the customer this event needs to exist (orders), or is
    partner: PartnerRow | None = None
    header: OrderHeaderRow | None = None
    items: list[OrderItemRow] = field(default_factory=list)
    demand: DemandRow | None = None

    @property
    def order_id(self) -> int | None:
        if self.header is not None:
            return self.header.crm_order_id
        return self.items[0].crm_order_id if self.items else None

    @property
    def needs_customer(self) -> int | None:
        """An order (not a delete) needs its customer in the ERP first."""
        if self.header is not None and not self.header.deleted:
            return self.header.crm_customer_id
        return None


def _position(record: dict[str, Any], seq: int | None = None) -> Position:
    source = record["source"]
    return Position(source["lsn"], source["seq"] if seq is None else seq, record["event_id"],
                    source["commit_time"])


def partner_row(record: dict[str, Any], mappings: Mappings) -> PartnerRow:
    pos = _position(record)
    after = record["after"]
    if after is None:
        before = record["before"] or {}
        return PartnerRow(before.get("customer_id", 0), True, "", "U", None, None, None, None,
                          None, None, None, None, None, None, None, None, None, pos)
    address = tf.parse_cn_address(after["address"]) if after["address"] else None
    phones = tf.parse_phones(after["phone"], mappings)
    amount = after["purchase_amount"]
    return PartnerRow(
        crm_customer_id=after["customer_id"],
        deleted=False,
        full_name=tf.full_name(after["family_name"], after["given_name"], after["middle_name"],
                               after["name_order"]),
        gender_code=tf.gender_code(after["gender"], mappings),
        birth_date=after["birth_date"],
        age=tf.age_on(after["birth_date"], pos.commit_time.date()) if after["birth_date"]
        else None,
        phone_e164=phones.primary if phones else None,
        email=tf.normalise_email(after["email"]),
        province=address.province if address else None,
        city=address.city if address else None,
        district=address.district if address else None,
        street=address.street if address else None,
        purchase_frequency=after["purchase_frequency"],
        purchase_amount=amount,
        amount_currency="CNY" if amount is not None else None,
        product_preference=after["product_preference"],
        notes=after["notes"],
        pos=pos,
        phone_extension=phones.extension if phones else None,
        phone_others=phones.others if phones else (),
        division_code=address.division_code if address else None,
    )


def order_change(record: dict[str, Any], mappings: Mappings) -> ErpChange:
    pos = _position(record)
    header: OrderHeaderRow | None = None
    after, before = record["after"], record["before"]
    currency = None
    if after is not None:
        currency = tf.currency_code(after["currency"], mappings)
        header = OrderHeaderRow(after["order_id"], tf.order_number(after["order_no"]),
                                after["customer_id"],
                                after["order_date"], tf.order_status(after["status"], mappings),
                                currency, False, pos)
    elif before is not None or record["op"] == "DELETE":
        header = OrderHeaderRow(record["order_id"], (before or {}).get("order_no", ""),
                                record["customer_id"], (before or {}).get("order_date")
                                or date(1970, 1, 1), "", "", True, pos)
    items: list[OrderItemRow] = []
    # Lines share the event's position: the event is one CRM transaction's effect on the
    # order. A line changed twice in one transaction: the applier keeps the last.
    for line in record["lines"]:
        line_pos = pos
        la = line["after"]
        if la is None:
            lb = line["before"] or {}
            items.append(OrderItemRow(lb.get("order_id", record["order_id"]),
                                      lb.get("line_no", 0), "", "", Decimal(1), "", Decimal(0),
                                      True, line_pos))
            continue
        qty = tf.parse_quantity(la["quantity"], mappings)
        price = la["unit_price"]
        if price is None or price < 0:
            raise MappingError("lines.unit_price", price, "missing or negative")
        items.append(OrderItemRow(la["order_id"], la["line_no"],
                                  tf.sku_for(la["product_code"], mappings), la["product_name"],
                                  qty.value, qty.unit, price, False, line_pos))
    return ErpChange("order", record["customer_id"], header=header, items=items)


def demand_row(record: dict[str, Any], mappings: Mappings) -> DemandRow:
    pos = _position(record)
    after = record["after"]
    if after is None:
        before = record["before"] or {}
        return DemandRow(before.get("demand_id", 0), "", "", "", pos.commit_time, True, pos)
    return DemandRow(after["demand_id"], tf.demand_kind(after["kind"], mappings),
                     after["product_category"], after["content"], after["observed_at"], False,
                     pos)


def to_erp(kind: str, record: dict[str, Any], mappings: Mappings) -> ErpChange:
    if kind == "customer":
        partner = partner_row(record, mappings)
        return ErpChange("customer", partner.crm_customer_id, partner=partner)
    if kind == "order":
        return order_change(record, mappings)
    if kind == "market_demand":
        return ErpChange("market_demand", None, demand=demand_row(record, mappings))
    raise MappingError("kind", kind, f"no ERP mapping for event kind {kind!r}")
