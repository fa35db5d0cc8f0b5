"""The `tryton` ERP target: customers -> party.party, orders -> sale.sale, over JSON-RPC.

Keys (all enforced by Tryton's own constraints, so a race cannot duplicate a record):
- customer -> ``party.party`` with ``code`` = ``code_prefix`` + the CRM customer key
  (``Unique(code)``). The prefix keeps CRM keys apart from the codes Tryton's own sequence
  gives other parties (the company's party is ``1``).
- order -> ``sale.sale`` under the web shop ``CRM`` with ``web_id`` = the CRM order key
  (``Exclude(web_shop, web_id)``); a line is the sale line whose ``sequence`` = the CRM
  line number; products by ``product.product.code`` = SKU; the sale's ``currency`` by
  ``currency.currency.code`` = the order's ISO currency (none in Tryton: refused, never the
  web shop's currency by default).

Ownership (what the sync may write): the CRM owns the customer master data, the order intake
(quotation, confirmation), the lines and cancellation while the sale is draft or quotation.
Tryton owns everything after confirmation: shipping, invoicing, stock (moves and shipments
are created by Tryton when it processes a confirmed sale; this target never writes stock).
A CRM change Tryton cannot take any more (lines edited, cancelled or moved back after
confirmation) is ``refused`` with a reason naming what an operator does in Tryton.

One RPC call per step per batch: read positions, read the records, ``create`` the missing
ones in one call, ``write`` the changed ones in one call (Tryton's ``write`` takes many
``records, values`` pairs), then one ``draft``/``quote``/``confirm``/``cancel`` call per
workflow step. When a batched call is refused, that step is retried one record at a time
so that only the offending change is refused.

Idempotency without a shared transaction: the sync's position (lsn, seq) per key is kept in
``tryton_positions`` in the sync-state database and advanced only after Tryton accepted the
change. An event at or below the stored position is ``stale`` and touches nothing. An event
re-applied after a crash between Tryton's commit and the position's is harmless because
every step compares first: a record already equal is not written (its ``write_date`` stays),
a sale already past a workflow step is not moved.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from service import pg
from service.erp.changes import OrderHeaderRow, OrderItemRow, PartnerRow, Position
from service.erp.target import Outcome, Status
from service.erp.tryton_rpc import TrytonRPC
from service.errors import StackUnavailable, TargetError, TargetRefused, TargetUnavailable

SHOP_NAME = "CRM"

# ERP status code (mappings.toml [order_status]) -> the Tryton sale state the CRM asks for.
# SHIPPED/COMPLETED are facts Tryton owns: the sync only makes sure the sale is confirmed.
STATUS_TARGET: dict[str, str] = {
    "PENDING_PAYMENT": "quotation",
    "PAID": "confirmed",
    "SHIPPED": "confirmed",
    "COMPLETED": "confirmed",
    "CANCELLED": "cancelled",
}
_RANK = {"draft": 0, "quotation": 1, "confirmed": 2, "processing": 3, "done": 4}
_EDITABLE = ("draft", "quotation")
# The state a workflow call leaves a sale in, then the states past it.
_REACHED: dict[str, tuple[str, ...]] = {
    "draft": ("draft",),
    "quote": ("quotation", "confirmed", "processing", "done"),
    "confirm": ("confirmed", "processing", "done"),
    "cancel": ("cancelled",),
}
# ERP unit code -> Tryton product.uom symbol (Tryton's own data: "u" is its Unit). A set (套)
# is counted in whole units of the SKU sold as a set: Tryton has no "set" unit of its own.
UNIT_SYMBOLS: dict[str, str] = {"UNIT": "u", "PCE": "u", "SET": "u", "KGM": "kg"}

CANCEL_ACTION = (
    "Tryton cannot cancel a sale past quotation: in Tryton cancel its customer shipment "
    "(Inventory > Customer Shipments > Cancel), then on the sale run Handle Shipment "
    "Exception and ignore the cancelled moves; credit any invoice")
EDIT_ACTION = (
    "Tryton makes the lines of a sale past quotation read-only: amend the sale in Tryton "
    "(module sale_amendment) or cancel it there (see the cancel procedure) and let the CRM "
    "enter a new order")
BACK_ACTION = (
    "Tryton does not move a confirmed sale back: decide in Tryton whether to cancel it (cancel "
    "its shipment, Handle Shipment Exception) or correct the order in the CRM")
CURRENCY_ACTION = (
    "create the currency in Tryton (Currency > Currencies, its ISO code as Code; or with "
    "proteus, or the currency module's trytond_import_currencies script), then redrive this "
    "letter")
CURRENCY_CHANGE_ACTION = (
    "Tryton keeps the currency of a sale past quotation: correct the order's currency in the "
    "CRM, or cancel the sale in Tryton (see the cancel procedure) and let the CRM enter a new "
    "order")


def _pos(p: Position) -> tuple[int, int]:
    return (p.lsn, p.seq)


# ---- positions in the sync-state database -------------------------------------------------

POSITIONS_DDL = """
CREATE TABLE IF NOT EXISTS tryton_positions (
    kind       text        NOT NULL,  -- customer | order
    crm_key    text        NOT NULL,
    erp_id     integer,               -- party.party / sale.sale id (NULL: nothing in Tryton)
    lsn        bigint      NOT NULL,
    seq        bigint      NOT NULL,
    event_id   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    crm_commit_time timestamptz,      -- of the event applied (`status`'s end-to-end delay)
    PRIMARY KEY (kind, crm_key)
);
-- A table created before the column gets it (NULL on its older rows); only then, so a
-- consumer's start does not take the table's exclusive lock each time.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'tryton_positions'::regclass
                   AND attname = 'crm_commit_time' AND NOT attisdropped) THEN
        ALTER TABLE tryton_positions ADD COLUMN crm_commit_time timestamptz;
    END IF;
END $$
"""


class PositionStore:
    """(lsn, seq) per (kind, CRM key) already applied to Tryton, in the sync-state database.

    Raises TargetUnavailable when that database cannot be reached.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: pg.PgConn | None = None

    def _db(self) -> pg.PgConn:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = pg.connect(self.dsn, "sync-state")
                with self._conn.transaction():
                    # Consumers starting together: CREATE TABLE IF NOT EXISTS is not safe
                    # against a concurrent one (a unique violation in pg_type), so serialise.
                    self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                       ("tryton_positions",))
                    self._conn.execute(POSITIONS_DDL)
            except (StackUnavailable, psycopg.OperationalError) as exc:
                self.close()
                raise TargetUnavailable("tryton_positions", "sync-state database unreachable") \
                    from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, kind: str, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
        try:
            rows = self._db().execute(
                "SELECT crm_key, lsn, seq FROM tryton_positions "
                "WHERE kind = %s AND crm_key = ANY(%s)", (kind, list(keys))).fetchall()
        except psycopg.OperationalError as exc:
            self.close()
            raise TargetUnavailable("tryton_positions", "sync-state database lost") from exc
        return {k: (lsn, seq) for k, lsn, seq in rows}

    def advance(self, kind: str, rows: Sequence[tuple[str, int | None, Position]]) -> None:
        """Store each (key, erp_id, position) unless a newer position is stored already."""
        if not rows:
            return
        try:
            with self._db().cursor() as cur:
                cur.executemany(
                    "INSERT INTO tryton_positions (kind, crm_key, erp_id, lsn, seq, event_id, "
                    "crm_commit_time) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (kind, crm_key) DO UPDATE SET erp_id = "
                    "COALESCE(EXCLUDED.erp_id, tryton_positions.erp_id), lsn = EXCLUDED.lsn, "
                    "seq = EXCLUDED.seq, event_id = EXCLUDED.event_id, applied_at = now(), "
                    "crm_commit_time = EXCLUDED.crm_commit_time "
                    "WHERE (tryton_positions.lsn, tryton_positions.seq) "
                    "< (EXCLUDED.lsn, EXCLUDED.seq)",
                    [(kind, key, erp_id, p.lsn, p.seq, p.event_id, p.commit_time)
                     for key, erp_id, p in rows])
        except psycopg.OperationalError as exc:
            self.close()
            raise TargetUnavailable("tryton_positions", "sync-state database lost") from exc


# ---- what Tryton holds (reads for reconcile and the demo) -----------------------------------


@dataclass(frozen=True, slots=True)
class PartyState:
    id: int
    code: str
    name: str
    active: bool
    street: str | None
    city: str | None
    subdivision: str | None  # ISO 3166-2 code, CN-BJ
    country: str | None
    phone: str | None
    email: str | None
    write_date: datetime | None


@dataclass(frozen=True, slots=True)
class MoveState:
    sku: str
    quantity: float
    state: str
    from_location: str
    to_location: str


@dataclass(frozen=True, slots=True)
class SaleState:
    id: int
    web_id: str
    number: str | None
    state: str
    shipment_state: str
    party_code: str | None
    lines: tuple[tuple[int, str, float, Decimal], ...]  # (line no, SKU, quantity, unit price)
    shipments: tuple[tuple[int, str], ...]  # (id, state)
    moves: tuple[MoveState, ...]  # outgoing moves, one per line
    write_date: datetime | None
    currency: str = ""  # ISO code of the sale's currency.currency


# ---- the target ---------------------------------------------------------------------------


def line_sequence(crm_line_id: str) -> int:
    """The Tryton sale line's ``sequence`` that identifies a CRM line within its sale.

    Tryton's sale.line has no external key, so the line is found by its sequence: the line
    number where the CRM key ends in one (demo: ``["9001","2"]`` -> 2), else a stable 31-bit
    CRC-32 of the key (BottleCRM's UUIDs); two lines of one sale colliding is a 1 in ~10^8
    chance per pair, and would be refused by the target as a duplicate sequence, not merged.
    """
    text = crm_line_id
    if text.startswith("["):
        try:
            parts = json.loads(text)
            text = str(parts[-1]) if isinstance(parts, list) and parts else text
        except ValueError:
            pass
    if text.isdigit() and len(text) < 10:
        return int(text)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@dataclass
class _Order:
    """The changes a batch carries for one order key, already past the stored position."""

    key: str
    header: OrderHeaderRow | None = None
    items: dict[int, OrderItemRow] = field(default_factory=dict)
    pos: Position | None = None
    indexes: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one order needs from Tryton: the state to reach, and a create or a write."""

    target: str  # draft | quotation | confirmed | cancelled | the sale's current state
    create: dict[str, Any] | None = None
    write: dict[str, Any] | None = None
    draft_first: bool = False  # a quotation goes back to draft before its write


class TrytonTarget:
    """Apply customer and order changes to one Tryton database.

    ``rpc`` is a TrytonRPC logged in as the sync's user; ``positions`` the store in the
    sync-state database. Methods raise TargetUnavailable (retry the whole batch: every step
    is idempotent) or TargetError (configuration: no CRM web shop, login refused); a change
    Tryton refuses is an Outcome, not an exception.
    """

    def __init__(self, rpc: TrytonRPC, positions: PositionStore, *,
                 code_prefix: str = "CRM-", shop_name: str = SHOP_NAME) -> None:
        self.rpc = rpc
        self.positions = positions
        self.code_prefix = code_prefix
        self.shop_name = shop_name
        self._shop: dict[str, Any] | None = None
        self._country_cn: int | None = None
        self._subdivisions: dict[str, int] = {}
        self._subdivision_codes: dict[int, str] = {}
        self._uoms: dict[str, int] = {}
        self._currencies: dict[str, int] = {}  # ISO code -> currency.currency id (active)

    def close(self) -> None:
        self.rpc.close()
        self.positions.close()

    # -- reference data, read once --------------------------------------------------------
    def _search_read(self, model: str, domain: list[Any], fields_: list[str],
                     *, inactive: bool = False) -> list[dict[str, Any]]:
        ctx = {"active_test": False} if inactive else None
        rows: list[dict[str, Any]] = self.rpc.execute(
            model, "search_read", domain, 0, None, [("id", "ASC")], fields_, context=ctx)
        return rows

    def _load_reference(self) -> None:
        if self._shop is not None:
            return
        shops = self._search_read("web.shop", [("name", "=", self.shop_name)],
                                  ["id", "currency", "company"])
        if not shops:
            raise TargetError("web.shop", f"no web shop named {self.shop_name!r} in Tryton: "
                              "run deploy/tryton/install.sh (setup_template.py)")
        cn = self._search_read("country.country", [("code", "=", "CN")], ["id"])
        self._country_cn = cn[0]["id"] if cn else None
        for s in self._search_read("country.subdivision", [("country.code", "=", "CN")],
                                   ["id", "name", "code"]):
            self._subdivisions[s["name"]] = s["id"]
            self._subdivision_codes[s["id"]] = s["code"]
        for u in self._search_read("product.uom", [], ["id", "symbol"]):
            self._uoms[u["symbol"]] = u["id"]
        self._read_currencies(None)
        self._shop = shops[0]

    def _read_currencies(self, codes: Sequence[str] | None) -> None:
        """Add the active ``currency.currency`` records (only ``codes`` when given) to the
        ISO code -> id cache; one call."""
        domain: list[Any] = [] if codes is None else [("code", "in", list(codes))]
        for c in self._search_read("currency.currency", domain, ["id", "code"]):
            self._currencies[str(c["code"])] = int(c["id"])

    @property
    def shop_id(self) -> int:
        self._load_reference()
        assert self._shop is not None
        return int(self._shop["id"])

    def party_code(self, key: str) -> str:
        return f"{self.code_prefix}{key}"

    # -- customers --------------------------------------------------------------------------
    def _read_party_rows(self, codes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """code -> party with its first address and first phone/e-mail mechanisms."""
        if not codes:
            return {}
        parties = self._search_read(
            "party.party", [("code", "in", list(codes))],
            ["id", "code", "name", "active", "write_date"], inactive=True)
        by_id = {p["id"]: p for p in parties}
        for p in parties:
            p["address"] = None
            p["phone"] = None
            p["email"] = None
        if by_id:
            for a in self._search_read(
                    "party.address", [("party", "in", list(by_id))],
                    ["id", "party", "street_unstructured", "city", "subdivision", "country"],
                    inactive=True):
                party = by_id[a["party"]]
                if party["address"] is None:
                    party["address"] = a
            for c in self._search_read(
                    "party.contact_mechanism",
                    [("party", "in", list(by_id)), ("type", "in", ["phone", "email"])],
                    ["id", "party", "type", "value"], inactive=True):
                party = by_id[c["party"]]
                if party[c["type"]] is None:
                    party[c["type"]] = c
        return {p["code"]: p for p in parties}

    def _address_values(self, row: PartnerRow) -> dict[str, Any]:
        street = " ".join(x for x in (row.district, row.street) if x) or None
        return {
            "street_unstructured": street,
            "city": row.city,
            "subdivision": self._subdivisions.get(row.province or ""),
            "country": self._country_cn,
        }

    def _party_create(self, key: str, row: PartnerRow) -> dict[str, Any]:
        mechanisms = [{"type": t, "value": v}
                      for t, v in (("phone", row.phone_e164), ("email", row.email)) if v]
        values: dict[str, Any] = {
            "code": self.party_code(key),
            "name": row.full_name,
            "addresses": [["create", [self._address_values(row)]]],
        }
        if mechanisms:
            values["contact_mechanisms"] = [["create", mechanisms]]
        return values

    def _party_changes(self, party: dict[str, Any], row: PartnerRow) -> dict[str, Any]:
        """Only what differs: an unchanged party is not written (its write_date stays)."""
        values: dict[str, Any] = {}
        if party["name"] != row.full_name:
            values["name"] = row.full_name
        if not party["active"]:
            values["active"] = True
        want = self._address_values(row)
        address = party["address"]
        if address is None:
            values["addresses"] = [["create", [want]]]
        else:
            diff = {k: v for k, v in want.items() if address.get(k) != v}
            if diff:
                values["addresses"] = [["write", [address["id"]], diff]]
        ops: list[list[Any]] = []
        for kind, value in (("phone", row.phone_e164), ("email", row.email)):
            have = party[kind]
            if have is None and value:
                ops.append(["create", [{"type": kind, "value": value}]])
            elif have is not None and not value:
                ops.append(["delete", [have["id"]]])
            elif have is not None and have["value"] != value:
                ops.append(["write", [have["id"]], {"value": value}])
        if ops:
            values["contact_mechanisms"] = ops
        return values

    def apply_customers(self, rows: Sequence[PartnerRow]) -> list[Outcome]:
        """Apply customer changes; one Outcome per row, in order.

        Within the batch the newest change per key wins; older ones are ``stale``. A delete
        makes the party inactive (a party with sales cannot be deleted).
        """
        self._load_reference()
        out: dict[int, Outcome] = {}
        newest: dict[str, int] = {}
        for i, row in enumerate(rows):
            key = str(row.crm_customer_id)
            j = newest.get(key)
            if j is None or _pos(rows[j].pos) < _pos(row.pos):
                if j is not None:
                    out[j] = Outcome("customer", key, Status.STALE, "superseded in the batch")
                newest[key] = i
            else:
                out[i] = Outcome("customer", key, Status.STALE, "superseded in the batch")
        stored = self.positions.get("customer", newest)
        todo: dict[str, int] = {}
        for key, i in newest.items():
            if key in stored and stored[key] >= _pos(rows[i].pos):
                out[i] = Outcome("customer", key, Status.STALE)
            else:
                todo[key] = i
        if not todo:
            return [out[i] for i in range(len(rows))]

        parties = self._read_party_rows([self.party_code(k) for k in todo])
        creates: dict[str, dict[str, Any]] = {}
        writes: dict[str, tuple[int, dict[str, Any]]] = {}
        erp_ids: dict[str, int | None] = {}
        for key, i in todo.items():
            row, party = rows[i], parties.get(self.party_code(key))
            erp_ids[key] = party["id"] if party else None
            if row.deleted:
                if party is not None and party["active"]:
                    writes[key] = (party["id"], {"active": False})
            elif party is None:
                creates[key] = self._party_create(key, row)
            else:
                changes = self._party_changes(party, row)
                if changes:
                    writes[key] = (party["id"], changes)

        refused: dict[str, TargetRefused] = {}
        if creates:
            created = self._batched("party.party", "create", creates,
                                    lambda batch: [list(batch.values())], refused)
            self._created_meanwhile("party", [k for k in creates if k in refused])
            for key, new_id in created.items():
                erp_ids[key] = new_id
        if writes:
            self._batched("party.party", "write", writes,
                          lambda batch: [x for pid, vals in batch.values()
                                         for x in ([pid], vals)], refused)
        done = []
        for key, i in todo.items():
            if key in refused:
                out[i] = Outcome("customer", key, Status.REFUSED,
                                 f"Tryton refused the party: {refused[key].error_class}",
                                 refused[key].detail)
            else:
                out[i] = Outcome("customer", key, Status.APPLIED)
                done.append((key, erp_ids.get(key), rows[i].pos))
        self.positions.advance("customer", done)
        return [out[i] for i in range(len(rows))]

    def _batched(self, model: str, method: str, items: dict[str, Any],
                 args: Any, refused: dict[str, TargetRefused]) -> dict[str, Any]:
        """Call ``model.method`` once for all ``items`` (key -> payload); when Tryton
        refuses the batch, call it once per item so only the offending ones are refused
        (recorded in ``refused``). Returns key -> result element for ``create``."""
        keys = list(items)
        try:
            result = self.rpc.execute(model, method, *args(items))
            return dict(zip(keys, result, strict=True)) if method == "create" else {}
        except TargetRefused as exc:
            if len(keys) == 1:
                refused[keys[0]] = exc
                return {}
        results: dict[str, Any] = {}
        for key in keys:
            try:
                result = self.rpc.execute(model, method, *args({key: items[key]}))
                if method == "create":
                    results[key] = result[0]
            except TargetRefused as exc:
                refused[key] = exc
        return results

    # -- orders -----------------------------------------------------------------------------
    def _group_orders(self, headers: Sequence[OrderHeaderRow], items: Sequence[OrderItemRow],
                      stored: dict[str, tuple[int, int]],
                      out: dict[str, Outcome]) -> dict[str, _Order]:
        orders: dict[str, _Order] = {}
        seen: set[str] = set()
        for h in sorted(headers, key=lambda r: _pos(r.pos)):
            key = str(h.crm_order_id)
            seen.add(key)
            if key in stored and stored[key] >= _pos(h.pos):
                continue
            o = orders.setdefault(key, _Order(key))
            o.header = h
            o.pos = h.pos if o.pos is None or _pos(o.pos) < _pos(h.pos) else o.pos
        for it in sorted(items, key=lambda r: _pos(r.pos)):
            key = str(it.crm_order_id)
            seen.add(key)
            if key in stored and stored[key] >= _pos(it.pos):
                continue
            o = orders.setdefault(key, _Order(key))
            o.items[line_sequence(it.crm_line_id)] = it
            o.pos = it.pos if o.pos is None or _pos(o.pos) < _pos(it.pos) else o.pos
        for key in seen - set(orders):
            out[key] = Outcome("order", key, Status.STALE)
        return orders

    def _read_sale_rows(self, web_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not web_ids:
            return {}
        sales = self._search_read(
            "sale.sale", [("web_shop", "=", self.shop_id), ("web_id", "in", list(web_ids))],
            ["id", "web_id", "state", "party", "currency", "currency.code", "sale_date",
             "reference", "write_date"])
        by_id = {s["id"]: s for s in sales}
        for s in sales:
            s["lines"] = {}
        if by_id:
            for line in self._search_read(
                    "sale.line", [("sale", "in", list(by_id)), ("type", "=", "line")],
                    ["id", "sale", "sequence", "product", "quantity", "unit", "unit_price"]):
                by_id[line["sale"]]["lines"][line["sequence"]] = line
        return {s["web_id"]: s for s in sales}

    def _line_values(self, it: OrderItemRow, products: dict[str, dict[str, Any]]
                     ) -> dict[str, Any] | str:
        """Sale-line values for a CRM line, or the reason it cannot be one."""
        product = products.get(it.sku)
        if product is None:
            return f"no product with code {it.sku} in Tryton: create it there or fix [products]"
        unit = self._uoms.get(UNIT_SYMBOLS.get(it.unit_code, ""))
        if unit is None:
            return f"unit {it.unit_code} has no Tryton unit of measure (UNIT_SYMBOLS)"
        return {"type": "line", "sequence": line_sequence(it.crm_line_id),
                "product": product["id"],
                "quantity": float(it.quantity), "unit": unit, "unit_price": it.unit_price,
                "description": it.product_name}

    def apply_orders(self, headers: Sequence[OrderHeaderRow],
                     items: Sequence[OrderItemRow]) -> list[Outcome]:
        """Apply order changes; one Outcome per order key, in order of first appearance.

        ``headers``/``items`` are the rows of the batch's order events; per key the newest
        header wins and each line keeps its newest row. An order whose customer is not in
        Tryton is ``held``; one Tryton can no longer take is ``refused`` with the action.
        """
        self._load_reference()
        order_keys = list(dict.fromkeys(
            [str(h.crm_order_id) for h in headers] + [str(i.crm_order_id) for i in items]))
        out: dict[str, Outcome] = {}
        stored = self.positions.get("order", order_keys)
        orders = self._group_orders(headers, items, stored, out)
        sales = self._read_sale_rows(list(orders))

        codes = {self.party_code(str(o.header.crm_customer_id))
                 for o in orders.values() if o.header is not None and not o.header.deleted}
        parties = self._read_party_rows(sorted(codes))
        skus = sorted({it.sku for o in orders.values() for it in o.items.values()
                       if not it.deleted})
        products = {p["code"]: p for p in self._search_read(
            "product.product", [("code", "in", skus)], ["id", "code"])} if skus else {}
        # A currency not seen yet is looked up (one call): one created in Tryton since the
        # consumer started is found without a restart. Known ones cost no call.
        unknown = sorted({o.header.currency for o in orders.values()
                          if o.header is not None and not o.header.deleted}
                         - set(self._currencies))
        if unknown:
            self._read_currencies(unknown)

        creates: dict[str, dict[str, Any]] = {}
        writes: dict[str, tuple[int, dict[str, Any]]] = {}
        to_draft: dict[str, int] = {}
        target: dict[str, str] = {}
        for key, o in orders.items():
            plan = self._plan_order(o, sales.get(key), parties, products)
            if isinstance(plan, Outcome):
                out[key] = plan
                continue
            if plan.create is not None:
                creates[key] = plan.create
            if plan.write is not None:
                writes[key] = (sales[key]["id"], plan.write)
                if plan.draft_first:
                    to_draft[key] = sales[key]["id"]
            target[key] = plan.target

        refused: dict[str, TargetRefused] = {}
        sale_ids = {key: s["id"] for key, s in sales.items()}
        states = {key: str(s["state"]) for key, s in sales.items()}
        if creates:
            created = self._batched("sale.sale", "create", creates,
                                    lambda batch: [list(batch.values())], refused)
            self._created_meanwhile("sale", [k for k in creates if k in refused])
            sale_ids.update(created)
            states.update({key: "draft" for key in created})
        self._step("draft", {k: v for k, v in to_draft.items() if k not in refused},
                   refused, states)
        live = {k: v for k, v in writes.items() if k not in refused}
        if live:
            self._batched("sale.sale", "write", live,
                          lambda batch: [x for sid, vals in batch.values()
                                         for x in ([sid], vals)], refused)

        def ready(step_targets: tuple[str, ...], from_states: tuple[str, ...]
                  ) -> dict[str, int]:
            return {k: sale_ids[k] for k, t in target.items()
                    if k not in refused and k in sale_ids and t in step_targets
                    and states[k] in from_states}

        self._step("quote", ready(("quotation", "confirmed"), ("draft",)), refused, states)
        self._step("confirm", ready(("confirmed",), ("draft", "quotation")), refused, states)
        self._step("cancel", ready(("cancelled",), _EDITABLE), refused, states)

        done = []
        for key, o in orders.items():
            if key not in out:
                if key in refused:
                    out[key] = Outcome("order", key, Status.REFUSED,
                                       f"Tryton refused the sale: {refused[key].error_class}",
                                       refused[key].detail)
                else:
                    out[key] = Outcome("order", key, Status.APPLIED)
            if out[key].status is Status.APPLIED:
                assert o.pos is not None
                done.append((key, sale_ids.get(key), o.pos))
        self.positions.advance("order", done)
        return [out[k] for k in order_keys]

    def _plan_order(self, o: _Order, sale: dict[str, Any] | None,
                    parties: dict[str, dict[str, Any]], products: dict[str, dict[str, Any]]
                    ) -> _Plan | Outcome:
        """What one order's changes ask of Tryton, or the outcome when Tryton is not to be
        called (held, refused, nothing to do). Makes no call: decides from what was read."""
        key, h = o.key, o.header

        def refuse(reason: str) -> Outcome:
            return Outcome("order", key, Status.REFUSED, reason)

        if h is not None and not h.deleted and h.status_code not in STATUS_TARGET:
            return refuse(f"ERP status {h.status_code} has no Tryton sale state (STATUS_TARGET)")
        currency = None
        if h is not None and not h.deleted:
            # Never the web shop's currency by default: USD amounts would become yuan.
            currency = self._currencies.get(h.currency)
            if currency is None:
                return refuse(f"currency {h.currency or '(none)'} is not in Tryton: "
                              f"{CURRENCY_ACTION}")
        want = "cancelled" if h is not None and h.deleted else (
            STATUS_TARGET[h.status_code] if h is not None else None)
        party = None
        if h is not None and not h.deleted:
            party = parties.get(self.party_code(str(h.crm_customer_id)))
            if party is None:
                return Outcome("order", key, Status.HELD,
                               f"customer {h.crm_customer_id} is not in Tryton yet")
        line_ops, bad = self._line_ops(o, sale, products)
        if bad:
            return refuse(bad)
        lines_after = len(sale["lines"] if sale else {}) + sum(
            (op[0] == "create") - (op[0] == "delete") for op in line_ops)
        if (lines_after <= 0 and want in ("quotation", "confirmed")
                and (sale is None or sale["state"] == "draft")):
            # Tryton refuses to quote a sale without lines; the header arrived without them
            # (its lines were refused, or come later): keep it a draft until they arrive.
            want = "draft"
        if sale is None:
            if h is None:
                return Outcome("order", key, Status.HELD, "order lines before the order header")
            if want == "cancelled":
                return Outcome("order", key, Status.APPLIED,
                               "cancelled before it reached Tryton: nothing to do")
            assert party is not None and want is not None
            address = party["address"]["id"] if party["address"] else None
            return _Plan(want, create={
                "web_shop": self.shop_id, "web_id": key, "party": party["id"],
                "currency": currency,
                "invoice_address": address, "shipment_address": address,
                "sale_date": h.order_date, "reference": h.order_no,
                "lines": [["create", [op[1] for op in line_ops]]],
            })
        state = str(sale["state"])
        values: dict[str, Any] = {}
        if h is not None and party is not None:
            if sale["party"] != party["id"]:
                address = party["address"]["id"] if party["address"] else None
                values.update(party=party["id"], invoice_address=address,
                              shipment_address=address)
            if sale["currency"] != currency:
                values["currency"] = currency
            if sale["reference"] != h.order_no:
                values["reference"] = h.order_no
            if sale["sale_date"] != h.order_date:
                values["sale_date"] = h.order_date
        if line_ops:
            values["lines"] = [list(op) for op in line_ops]
        if want == "cancelled":
            if state == "cancelled":
                return Outcome("order", key, Status.APPLIED)
            if state not in _EDITABLE:
                return refuse(f"cancelled in the CRM but the Tryton sale is {state}: "
                              f"{CANCEL_ACTION}")
            return _Plan("cancelled")
        if state == "cancelled":
            if values or want is not None:
                return refuse("changed in the CRM but the Tryton sale is cancelled: reset it "
                              "to draft in Tryton (Draft button) if the order is live again")
            return Outcome("order", key, Status.APPLIED)
        if "currency" in values and state not in _EDITABLE:
            assert h is not None
            return refuse(f"currency changed to {h.currency} in the CRM but the Tryton sale "
                          f"is {state} in {_code(sale, 'currency') or '?'}: "
                          f"{CURRENCY_CHANGE_ACTION}")
        if values and state not in _EDITABLE:
            return refuse(f"lines or customer changed in the CRM but the Tryton sale is "
                          f"{state}: {EDIT_ACTION}")
        if want is not None and _RANK[want] < _RANK[state]:
            # "confirmed" means at least confirmed: processing and done are past it.
            if _RANK[want] < _RANK["confirmed"] <= _RANK[state]:
                return refuse(f"moved back to {h.status_code if h else '?'} in the CRM but "
                              f"the Tryton sale is {state}: {BACK_ACTION}")
            want = state  # already past the CRM's step (processing, done)
        # An edited quotation goes back to draft for the edit, then is quoted again.
        return _Plan(want or state, write=values or None,
                     draft_first=bool(values) and state == "quotation")

    def _line_ops(self, o: _Order, sale: dict[str, Any] | None,
                  products: dict[str, dict[str, Any]]) -> tuple[list[tuple[Any, ...]], str]:
        """Line changes as Tryton One2Many operations (only real differences), or a reason."""
        have: dict[int, dict[str, Any]] = sale["lines"] if sale else {}
        ops: list[tuple[Any, ...]] = []
        for line_no, it in sorted(o.items.items()):
            line = have.get(line_no)
            if it.deleted:
                if line is not None:
                    ops.append(("delete", [line["id"]]))
                continue
            vals = self._line_values(it, products)
            if isinstance(vals, str):
                return [], vals
            if line is None:
                ops.append(("create", [vals]))
                continue
            diff = {k: v for k, v in vals.items()
                    if k in ("product", "quantity", "unit", "unit_price") and line.get(k) != v}
            if diff:
                ops.append(("write", [line["id"]], diff))
        if sale is None:
            # A new sale takes its lines in one create.
            return [("create", op[1][0]) for op in ops if op[0] == "create"], ""
        return ops, ""

    def _sale_states(self, ids: Sequence[int]) -> dict[int, str]:
        rows = self.rpc.execute("sale.sale", "read", list(ids), ["state"])
        return {r["id"]: r["state"] for r in rows}

    def _step(self, method: str, ids: dict[str, int], refused: dict[str, TargetRefused],
              states: dict[str, str]) -> None:
        """One workflow call (draft/quote/confirm/cancel) for all ``ids``; ``states`` (key ->
        sale state) is updated.

        Tryton refuses a button on a sale whose state does not allow it ("You can not call
        quote on ..."). That happens when another writer moved the sale after we read it (a
        killed consumer's last call still runs on the server): sales found already at or
        past the step are fine; the rest are tried one by one so only a real refusal is
        refused. ``confirm`` returns after Tryton processed the sales: with no worker the
        server runs the queued ``process`` task before answering.
        """
        if not ids:
            return
        reached = _REACHED[method]
        try:
            self.rpc.execute("sale.sale", method, list(ids.values()))
            states.update({key: reached[0] for key in ids})
            return
        except TargetRefused:
            pass
        fresh = self._sale_states(list(ids.values()))
        for key, sale_id in ids.items():
            states[key] = fresh.get(sale_id, states[key])
            if states[key] in reached:
                continue
            try:
                self.rpc.execute("sale.sale", method, [sale_id])
                states[key] = reached[0]
            except TargetRefused as exc:
                now = self._sale_states([sale_id]).get(sale_id, states[key])
                states[key] = now
                if now not in reached:
                    refused[key] = exc

    def _created_meanwhile(self, kind: str, keys: Sequence[str]) -> None:
        """A create refused because the record exists now: another writer (a killed
        consumer's last call) created it after our read. Retrying the batch finds it."""
        if not keys:
            return
        if kind == "sale":
            found = self._search_read("sale.sale", [("web_shop", "=", self.shop_id),
                                                    ("web_id", "in", list(keys))], ["id"])
        else:
            found = self._search_read("party.party",
                                      [("code", "in", [self.party_code(k) for k in keys])],
                                      ["id"], inactive=True)
        if found:
            raise TargetUnavailable(f"{kind} create",
                                    "created meanwhile by another writer: retry the batch")

    # -- reads for reconcile and the demo ----------------------------------------------------
    def read_parties(self, keys: Iterable[str]) -> dict[str, PartyState]:
        """CRM customer key -> what Tryton holds for its party (inactive ones included)."""
        self._load_reference()
        by_code = {self.party_code(str(k)): str(k) for k in keys}
        result: dict[str, PartyState] = {}
        for code, p in self._read_party_rows(list(by_code)).items():
            a = p["address"] or {}
            result[by_code[code]] = PartyState(
                id=p["id"], code=code, name=p["name"], active=p["active"],
                street=a.get("street_unstructured"), city=a.get("city"),
                subdivision=self._subdivision_codes.get(a.get("subdivision") or 0),
                country="CN" if a.get("country") == self._country_cn and a else None,
                phone=(p["phone"] or {}).get("value"), email=(p["email"] or {}).get("value"),
                write_date=p["write_date"])
        return result

    def sale_currencies(self, web_ids: Iterable[str]) -> dict[str, str]:
        """CRM order key -> the ISO code of its sale's currency (``currency.code``: the web
        shop's when the sync created the sale), cancelled sales included; one call."""
        keys = sorted({str(k) for k in web_ids})
        if not keys:
            return {}
        rows = self._search_read(
            "sale.sale", [("web_shop", "=", self.shop_id), ("web_id", "in", keys)],
            ["web_id", "currency.code"])
        return {str(r["web_id"]): code for r in rows if (code := _code(r, "currency"))}

    def read_sales(self, web_ids: Iterable[str]) -> dict[str, SaleState]:
        """CRM order key -> the Tryton sale: state, lines, shipments and outgoing moves."""
        self._load_reference()
        keys = [str(k) for k in web_ids]
        if not keys:
            return {}
        sales = self._search_read(
            "sale.sale", [("web_shop", "=", self.shop_id), ("web_id", "in", keys)],
            ["id", "web_id", "number", "state", "shipment_state", "party", "shipments",
             "write_date", "currency.code"])
        if not sales:
            return {}
        sale_ids = [s["id"] for s in sales]
        lines = self._search_read(
            "sale.line", [("sale", "in", sale_ids), ("type", "=", "line")],
            ["id", "sale", "sequence", "product", "quantity", "unit_price", "moves"])
        product_ids = {line["product"] for line in lines if line["product"]}
        party_ids = {s["party"] for s in sales}
        codes = {p["id"]: p["code"] for p in self._search_read(
            "party.party", [("id", "in", sorted(party_ids))], ["id", "code"], inactive=True)}
        skus = {p["id"]: p["code"] for p in self._search_read(
            "product.product", [("id", "in", sorted(product_ids))], ["id", "code"],
            inactive=True)} if product_ids else {}
        move_ids = [m for line in lines for m in line["moves"]]
        moves = self._search_read(
            "stock.move", [("id", "in", move_ids)],
            ["id", "product", "quantity", "state", "from_location.code",
             "to_location.code", "origin"]) if move_ids else []
        shipment_ids = sorted({sid for s in sales for sid in s["shipments"]})
        shipments = {x["id"]: x["state"] for x in self._search_read(
            "stock.shipment.out", [("id", "in", shipment_ids)], ["id", "state"])} \
            if shipment_ids else {}
        result: dict[str, SaleState] = {}
        for s in sales:
            mine = sorted((line for line in lines if line["sale"] == s["id"]),
                          key=lambda line: line["sequence"] or 0)
            line_moves = {m for line in mine for m in line["moves"]}
            result[s["web_id"]] = SaleState(
                id=s["id"], web_id=s["web_id"], number=s["number"], state=s["state"],
                shipment_state=s["shipment_state"], party_code=codes.get(s["party"]),
                lines=tuple((line["sequence"], skus.get(line["product"], ""),
                             line["quantity"], line["unit_price"]) for line in mine),
                shipments=tuple((sid, shipments.get(sid, "?")) for sid in s["shipments"]),
                moves=tuple(MoveState(skus.get(m["product"], ""), m["quantity"], m["state"],
                                      _code(m, "from_location"), _code(m, "to_location"))
                            for m in moves if m["id"] in line_moves),
                write_date=s["write_date"], currency=_code(s, "currency"))
        return result


def _code(row: dict[str, Any], field_: str) -> str:
    """A dotted read (``from_location.code``) comes back as ``{'from_location.': {...}}``."""
    nested = row.get(f"{field_}.") or {}
    return str(nested.get("code") or "")

