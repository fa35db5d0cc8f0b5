"""Canonical event records (schemas/*/v2.avsc) -> ERP rows (pure). Every mapping failure
names its canonical field. Keys are the CRM's keys as text.

A CRM that lacks a canonical field sends null for it: a customer known only by one name
field (``full_name``: a company, or a person's name typed into one field) keeps that name;
a structured address (street / city / region / postcode / country) is taken as it is
instead of being parsed from free text.

A delete becomes a tombstone (deleted = true) carrying the event's position, so an older event
that arrives later (a replay, a rebalance overlap) cannot bring the row back.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from service.erp import transform as tf
from service.erp import units
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
    crm_customer_id: str
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
    crm_order_id: str
    order_no: str
    crm_customer_id: str
    order_date: date
    status_code: str
    currency: str
    deleted: bool
    pos: Position
    total_amount: Decimal | None = None  # None: the CRM has no total (the demo CRM)


@dataclass(frozen=True, slots=True)
class OrderItemRow:
    crm_order_id: str
    crm_line_id: str
    sku: str
    product_name: str
    quantity: Decimal
    unit_code: str
    unit_price: Decimal
    deleted: bool
    pos: Position
    base_quantity: Decimal = Decimal(1)  # quantity in the SKU's base unit (units.to_base)
    base_unit: str = ""
    # The ISO code written with the unit price (100美元 -> USD) of a line in a lines-only
    # event, to be checked against its order's currency in the ERP
    # (``line_currency_errors``); None when none was written, or when the event's header
    # was there to check it against already.
    price_currency: str | None = None


@dataclass(frozen=True, slots=True)
class DemandRow:
    crm_demand_id: str
    signal_type: str
    product_category: str
    content: str
    observed_at: datetime
    deleted: bool
    pos: Position


# The entities a truncate event can name (schemas/truncate/v1.avsc).
TRUNCATABLE = ("customer", "order", "order_line", "market_demand")


@dataclass(frozen=True, slots=True)
class TruncateRow:
    """A TRUNCATE of the CRM table of ``entity``: every ERP row of it older than ``pos`` is
    marked deleted, and ``pos`` becomes its truncation watermark."""

    entity: str
    table: str
    pos: Position


@dataclass(slots=True)
class ErpChange:
    """What one event does to the ERP."""

    kind: str
    customer_id: str | None  # the customer this event needs to exist (orders), or is
    partner: PartnerRow | None = None
    header: OrderHeaderRow | None = None
    items: list[OrderItemRow] = field(default_factory=list)
    demand: DemandRow | None = None
    truncate: TruncateRow | None = None

    @property
    def order_id(self) -> str | None:
        if self.header is not None:
            return self.header.crm_order_id
        return self.items[0].crm_order_id if self.items else None

    @property
    def needs_customer(self) -> str | None:
        """An order (not a delete) needs its customer in the ERP first."""
        if self.header is not None and not self.header.deleted:
            return self.header.crm_customer_id
        return None


def _position(record: dict[str, Any], seq: int | None = None) -> Position:
    source = record["source"]
    return Position(source["lsn"], source["seq"] if seq is None else seq, record["event_id"],
                    source["commit_time"])


def _decimal(text: str | None, field: str) -> Decimal | None:
    """The CRM's exact decimal text -> Decimal; NaN and infinities are refused."""
    if text is None:
        return None
    try:
        value = Decimal(text.strip())
    except ArithmeticError:
        raise MappingError(field, text, "not a decimal number") from None
    if not value.is_finite():
        raise MappingError(field, text, "not a finite number (NaN or infinity in the CRM)")
    return value


def _purchase_amount(after: dict[str, Any], mappings: Mappings
                     ) -> tuple[Decimal | None, str | None]:
    """A customer's purchase amount and its ISO currency, read like an order's total
    (``transform.parse_money``: 5000元, ¥5,000.00, 5000.00) with the customer's currency
    column; when neither names a currency, ``[money] default_currency`` of the mappings
    (CNY unless configured). ``(None, None)`` when the CRM has no amount (null, or blank
    text). Raises MappingError naming ``purchase_amount`` (``currency`` for an unknown
    word of the currency column)."""
    text = after.get("purchase_amount")
    if text is None or not text.strip():
        return None, None
    money = tf.parse_money(text, after.get("currency") or None, mappings,
                           field="purchase_amount", default_currency=mappings.default_currency)
    return money.amount, money.currency


def _total(after: dict[str, Any], mappings: Mappings) -> Decimal | None:
    """The order's total (the CRM's exact decimal text) as the ERP keeps it, numeric(14, 2),
    read by ``transform.parse_money`` with the order's currency: more than two decimal
    places, more than 12 digits before the point, a negative or non-finite amount raise
    MappingError naming ``total_amount``. None when the CRM has no total."""
    text = after.get("total_amount")
    if text is None:
        return None
    return tf.parse_money(text, after.get("currency") or None, mappings,
                          field="total_amount").amount


def _full_name(after: dict[str, Any]) -> str:
    if after.get("family_name") or after.get("given_name"):
        return tf.full_name(after.get("family_name"), after.get("given_name"),
                            after.get("middle_name"), after.get("name_order") or "eastern")
    whole = " ".join(unicodedata.normalize("NFKC", after.get("full_name") or "").split())
    if not whole:
        raise MappingError("full_name", after.get("full_name"), "the customer has no name")
    return whole


_CHINA = {"", "cn", "chn", "china", "中国", "中华人民共和国"}


def _address(after: dict[str, Any]) -> tf.Address | None:
    """Free text is parsed; a structured address in China is read as its parts written
    together (so it is checked against the division list and coded the same way); one
    elsewhere is kept as typed, without a division code."""
    if after.get("address"):
        return tf.parse_cn_address(after["address"])
    parts = [after.get(k) for k in ("region", "city", "street")]
    if not any(parts):
        return None
    region, city, street = (" ".join(p.split()) if p else None for p in parts)
    if (after.get("country") or "").strip().casefold() in _CHINA:
        if region and city and (city.startswith(region) or region.startswith(city)):
            city = city if len(city) >= len(region) else region  # a municipality: 北京 + 北京市
            region = None
        return tf.parse_cn_address("".join(p for p in (region, city, street) if p))
    return tf.Address(region or "", city, None, street, "")


def partner_row(record: dict[str, Any], mappings: Mappings) -> PartnerRow:
    pos = _position(record)
    after = record["after"]
    if after is None:
        return PartnerRow(record["key"], True, "", "U", None, None, None, None,
                          None, None, None, None, None, None, None, None, None, pos)
    address = _address(after)
    phones = tf.parse_phones(after.get("phone"), mappings)
    amount, currency = _purchase_amount(after, mappings)
    birth_date = after.get("birth_date")
    return PartnerRow(
        crm_customer_id=record["key"],
        deleted=False,
        full_name=_full_name(after),
        gender_code=tf.gender_code(after.get("gender") or "", mappings),
        birth_date=birth_date,
        age=tf.age_on(birth_date, pos.commit_time.date()) if birth_date else None,
        phone_e164=phones.primary if phones else None,
        email=tf.normalise_email(after.get("email")),
        province=address.province or None if address else None,
        city=address.city or None if address else None,
        district=address.district if address else None,
        street=address.street if address else None,
        purchase_frequency=after.get("purchase_frequency"),
        purchase_amount=amount,
        amount_currency=currency,
        product_preference=after.get("product_preference"),
        notes=after.get("notes"),
        pos=pos,
        phone_extension=phones.extension if phones else None,
        phone_others=phones.others if phones else (),
        division_code=address.division_code or None if address else None,
    )


def order_change(record: dict[str, Any], mappings: Mappings) -> ErpChange:
    pos = _position(record)
    header: OrderHeaderRow | None = None
    after, before = record["after"], record["before"]
    if after is not None:
        if after.get("order_date") is None:
            raise MappingError("order_date", None, "the order has no order date")
        header = OrderHeaderRow(record["key"], tf.order_number(after.get("order_no")),
                                record["customer_key"], after["order_date"],
                                tf.order_status(after.get("status") or "", mappings),
                                tf.currency_code(after.get("currency") or "", mappings),
                                False, pos, _total(after, mappings))
    elif before is not None or record["op"] == "DELETE":
        header = OrderHeaderRow(record["key"], (before or {}).get("order_no") or "",
                                record["customer_key"], (before or {}).get("order_date")
                                or date(1970, 1, 1), "", "", True, pos)
    items: list[OrderItemRow] = []
    # Lines share the event's position: the event is one CRM transaction's effect on the
    # order. A line changed twice in one transaction: the applier keeps the last.
    for line in record["lines"]:
        la = line["after"]
        if la is None:
            lb = line["before"] or {}
            items.append(OrderItemRow(lb.get("order_key", record["key"]), lb.get("key", ""),
                                      "", "", Decimal(1), "", Decimal(0), True, pos))
            continue
        try:
            items.append(_item(la, pos, mappings, (after or {}).get("currency") or None))
        except MappingError as exc:
            # which line of the order: its CRM key (an id, never a value)
            raise exc.in_line(str(la.get("key", ""))) from None
    return ErpChange("order", record["customer_key"], header=header, items=items)


def _item(la: dict[str, Any], pos: Position, mappings: Mappings,
          order_currency: str | None = None) -> OrderItemRow:
    """One live order line (its ``after``); raises MappingError naming a ``lines.`` field.

    The unit price is read by ``transform.parse_amount`` (5000元, ¥5,000.00, 5000.00): a
    currency written with it must be the order's (``order_currency``, the header's
    currency word, when the header is in this event). A lines-only event carries no
    header: a currency written with a price is then checked to be a known one here and
    kept (``price_currency``) for ``line_currency_errors`` to compare with the order's
    currency in the ERP."""
    quantity = la.get("quantity") or ""
    if la.get("unit"):
        # A numeric column's scale is not the count's precision: 10.00 个 is 10 个.
        number = _decimal(quantity, "lines.quantity")
        quantity = "" if number is None else format(number.normalize(), "f")
    qty = tf.parse_quantity(quantity + (la.get("unit") or ""), mappings,
                            field="lines.quantity")
    text = la.get("unit_price")
    if text is None or not text.strip():
        raise MappingError("lines.unit_price", text, "the line has no unit price")
    price, code = tf.parse_amount(text, order_currency, mappings, field="lines.unit_price")
    sku = tf.sku_for(la.get("product_code") or "", mappings)
    base = units.to_base(sku, qty.value, qty.unit, mappings,
                         raw=quantity + (la.get("unit") or ""), field="lines.quantity")
    return OrderItemRow(la["order_key"], la["key"], sku, la.get("product_name") or "",
                        qty.value, qty.unit, price, False, pos, base,
                        mappings.sku_units[sku].base,
                        code if order_currency is None else None)


@dataclass(frozen=True, slots=True)
class OrderCurrency:
    """An order's currency as the ERP holds it (``ErpTarget.order_currencies``): ``code``
    an ISO 4217 code; ``position`` the (lsn, seq) of the newest change the ERP applied to
    what holds it (the sql target's order header, the tryton target's order), None when
    unknown. An event at or before ``position`` may predate the currency (a replay after
    the order's currency changed): it is not checked against it."""

    code: str
    position: tuple[int, int] | None = None


def _written_currencies(change: ErpChange | None) -> list[OrderItemRow]:
    """The live lines of a lines-only order event that have a currency written with their
    unit price (the only lines whose currency can differ from their order's)."""
    if change is None or change.kind != "order" or change.header is not None:
        return []
    return [i for i in change.items if not i.deleted and i.price_currency is not None]


def line_currency_lookups(changes: Sequence[ErpChange | None]) -> list[str]:
    """The orders whose currency the ERP must tell for ``line_currency_errors``: those of
    lines-only events (in batch order; None: an event that failed already) with a currency
    written with a line's price, and no live header earlier in the batch to say it.
    Sorted, each once; empty when there is nothing to check (no ERP read at all)."""
    known: set[str] = set()
    wanted: set[str] = set()
    for change in changes:  # every event of every batch: kept to attribute reads
        if change is None:
            continue
        header = change.header
        if header is not None:
            if not header.deleted:
                known.add(header.crm_order_id)
            continue
        for i in change.items:
            if i.price_currency is not None and not i.deleted and i.crm_order_id not in known:
                wanted.add(i.crm_order_id)
    return sorted(wanted)


def line_currency_errors(changes: Sequence[ErpChange | None],
                         stored: Mapping[str, OrderCurrency]) -> dict[int, MappingError]:
    """Which lines-only events price a line in another currency than its order's.

    ``changes`` in batch order (None: an event that failed already); ``stored``: CRM order
    key -> the order's currency as the ERP holds it (``ErpTarget.order_currencies`` of
    ``line_currency_lookups``). The order's currency at an event is that of the newest live
    header before it in the batch, else the ERP's when the event is newer than what the
    ERP holds; otherwise (an order the ERP does not hold yet: its lines are applied or held
    as without this check; an older event, replayed) the event is not checked. A line
    without a written currency is in its order's currency.
    Returns index in ``changes`` -> MappingError naming ``lines.unit_price``, the line's
    CRM key and both codes (no row value), for the first differing line of each event."""
    in_batch: dict[str, str] = {}
    out: dict[int, MappingError] = {}
    for n, change in enumerate(changes):
        if change is not None and change.header is not None and not change.header.deleted:
            in_batch[change.header.crm_order_id] = change.header.currency
        for item in _written_currencies(change):
            order = in_batch.get(item.crm_order_id)
            erp = stored.get(item.crm_order_id)
            if (order is None and erp is not None and erp.code
                    and (erp.position is None or (item.pos.lsn, item.pos.seq) > erp.position)):
                order = erp.code
            if order is not None and order != item.price_currency:
                out[n] = MappingError(
                    "lines.unit_price", item.price_currency,
                    f"currency written with the amount ({item.price_currency}) differs from "
                    f"the order's currency in the ERP ({order})", line=item.crm_line_id)
                break
    return out


def demand_row(record: dict[str, Any], mappings: Mappings) -> DemandRow:
    pos = _position(record)
    after = record["after"]
    if after is None:
        return DemandRow(record["key"], "", "", "", pos.commit_time, True, pos)
    if after.get("observed_at") is None:
        raise MappingError("observed_at", None, "the signal has no observation time")
    return DemandRow(record["key"], tf.demand_kind(after.get("kind") or "", mappings),
                     after.get("product_category") or "", after.get("content") or "",
                     after["observed_at"], False, pos)


def to_erp(kind: str, record: dict[str, Any], mappings: Mappings) -> ErpChange:
    if kind == "customer":
        partner = partner_row(record, mappings)
        return ErpChange("customer", partner.crm_customer_id, partner=partner)
    if kind == "order":
        return order_change(record, mappings)
    if kind == "market_demand":
        return ErpChange("market_demand", None, demand=demand_row(record, mappings))
    if kind == "truncate":
        if record["entity"] not in TRUNCATABLE:
            raise MappingError("entity", record["entity"], "no ERP rows for this entity")
        return ErpChange("truncate", None, truncate=TruncateRow(
            record["entity"], record["source"]["table"], _position(record)))
    raise MappingError("kind", kind, f"no ERP mapping for event kind {kind!r}")
