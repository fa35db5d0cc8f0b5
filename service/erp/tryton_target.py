"""The ``tryton`` ERP target behind ``ErpTarget``: an adapter over :class:`TrytonTarget`.

Per batch: customers first (one ``apply_customers``), then orders (one ``apply_orders``), so
an order whose customer arrives in the same batch finds its party. Market-demand signals have
no Tryton counterpart: they are reported applied and not kept (``kinds`` leaves them out of
``reconcile``).

What replaces the ``sql`` target's atomic apply + sync state: Tryton commits each call on its
own. Positions (lsn, seq) per key are kept in ``tryton_positions`` in the sync-state database
(``CRM_ERP_SYNC_ERP_DSN``) and advanced only after Tryton accepted the change; every Tryton
step is keyed (party code, web shop + web id) and monotonic (create if absent, write what
differs, workflow forward only), so a batch re-applied after a crash or a rolled-back
sync-state transaction converges: its changes are ``stale`` or find nothing to do.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from service.erp.changes import ErpChange, OrderCurrency
from service.erp.mappings import Mappings
from service.erp.target import ABSENT_OK, LastApplied, Outcome, Status
from service.erp.tryton import (
    STATUS_TARGET,
    PositionStore,
    SaleState,
    TrytonTarget,
    line_sequence,
)
from service.erp.tryton_rpc import TrytonRPC
from service.errors import ErpNotSetUp
from service.pg import PgConn
from service.settings import Settings

_PAGE = 5000  # records per search_read when listing keys

# Tryton sale states past confirmation read as what the CRM asked for: "confirmed".
_CONFIRMED = ("confirmed", "processing", "done")


def _sale_state(state: str) -> str:
    return "confirmed" if state in _CONFIRMED else state


# Why a truncate is a dead letter here: Tryton has no position-guarded bulk soft delete over
# JSON-RPC (every party and sale would be read, compared and deactivated one call at a time,
# outside the sync-state transaction, so a late older event could not be refused atomically).
TRUNCATE_REFUSED = ("the tryton target does not apply a CRM TRUNCATE: deactivate the parties/"
                    "sales by hand or run `crm-erp-sync reconcile --repair`, then discard this "
                    "letter")


class TrytonErpTarget:
    """``ErpTarget`` over a Tryton server. Raises TargetUnavailable (transient: the batch is
    retried) and TargetError (configuration: no CRM web shop, login refused)."""

    name: str = "tryton"
    kinds: tuple[str, ...] = ("customer", "order")
    stock_unavailable: str | None = (
        "Tryton keeps stock itself (its moves and shipments of confirmed sales; the sync "
        "never writes stock there): look at stock in Tryton")

    def __init__(self, target: TrytonTarget) -> None:
        self.target = target
        self._live: dict[str, list[str]] = {}  # kind -> live keys, sorted (live_keys pages)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrytonErpTarget:
        rpc = TrytonRPC(settings.tryton_url, settings.tryton_database, settings.tryton_user,
                        settings.tryton_password)
        return cls(TrytonTarget(rpc, PositionStore(settings.erp_dsn)))

    def attach(self, conn: PgConn) -> None:
        """Nothing to do: Tryton is not written through the sync-state connection."""

    def use_mappings(self, mappings: Mappings) -> None:
        """Nothing to keep: the changes arrive already mapped (units by UNIT_SYMBOLS)."""

    def not_set_up(self, conn: PgConn) -> ErpNotSetUp | None:
        """None: nothing of Tryton's is set up by `setup` (the consumer creates
        ``tryton_positions`` itself)."""
        return None

    def close(self) -> None:
        self.target.close()

    # ---- apply ------------------------------------------------------------------------------
    def apply(self, changes: Sequence[ErpChange]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(changes)
        customers = [(i, c.partner) for i, c in enumerate(changes) if c.partner is not None]
        if customers:
            results = self.target.apply_customers([p for _, p in customers])
            for (i, _), outcome in zip(customers, results, strict=True):
                out[i] = outcome
        orders = [(i, c) for i, c in enumerate(changes) if c.header is not None or c.items]
        if orders:
            by_key = {o.key: o for o in self._apply_orders([c for _, c in orders])}
            per_key: dict[str, list[int]] = defaultdict(list)
            for i, c in orders:
                per_key[str(c.order_id)].append(i)
            for key, idx in per_key.items():
                outcome = by_key[key]
                if outcome.status is Status.REFUSED and len(idx) > 1:
                    # Several events of one order were merged: find which one Tryton refuses
                    # (each alone, in order; the accepted ones advance the position).
                    for i in idx:
                        out[i] = self._apply_orders([changes[i]])[0]
                else:
                    for i in idx:
                        out[i] = outcome
        for i, c in enumerate(changes):
            if c.truncate is not None and c.truncate.entity != "market_demand":
                out[i] = Outcome(c.kind, c.truncate.table, Status.REFUSED, TRUNCATE_REFUSED)
            elif out[i] is None:
                out[i] = Outcome(c.kind, str(c.demand.crm_demand_id if c.demand else ""),
                                 Status.APPLIED, "not kept by the tryton target")
        return [o for o in out if o is not None]

    def _apply_orders(self, changes: Sequence[ErpChange]) -> list[Outcome]:
        return self.target.apply_orders([c.header for c in changes if c.header is not None],
                                        [i for c in changes for i in c.items])

    def present_customers(self, keys: Iterable[str]) -> set[str]:
        wanted = sorted({str(k) for k in keys})
        if not wanted:
            return set()
        prefix = self.target.code_prefix
        rows = self.target.rpc.execute(
            "party.party", "search_read", [("code", "in", [prefix + k for k in wanted])], 0,
            None, None, ["code"], context={"active_test": False})
        return {str(r["code"])[len(prefix):] for r in rows}

    def order_currencies(self, keys: Iterable[str]) -> dict[str, OrderCurrency]:
        """The currency of each sale of the CRM web shop (one ``search_read``) with the
        order's position from ``tryton_positions`` (one query of the sync-state database;
        None for a sale the sync has no position of)."""
        wanted = sorted({str(k) for k in keys})
        codes = self.target.sale_currencies(wanted)
        if not codes:
            return {}
        positions = self.target.positions.get("order", sorted(codes))
        return {k: OrderCurrency(code, positions.get(k)) for k, code in codes.items()}

    # ---- reconcile ----------------------------------------------------------------------------
    def view(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """What Tryton keeps of the mapped values: for a customer the name, the address
        (district and street in one line, city, province as its ISO subdivision) and the
        phone and e-mail; for an order its customer, the sale state the CRM status asks for,
        its currency (ISO code), and its lines by sequence (SKU, quantity, unit price)."""
        t = self.target
        if kind == "customer":
            t._load_reference()
            sub = t._subdivisions.get(values.get("province") or "")
            return {
                "full_name": values["full_name"],
                "street": " ".join(x for x in (values.get("district"), values.get("street"))
                                   if x) or None,
                "city": values.get("city"),
                "subdivision": t._subdivision_codes.get(sub) if sub is not None else None,
                "phone_e164": values.get("phone_e164"),
                "email": values.get("email"),
            }
        if kind == "order":
            status = values["status_code"]
            state = STATUS_TARGET.get(status, f"(no Tryton state for {status})")
            return {
                ABSENT_OK: state == "cancelled",  # the target creates no cancelled sale
                "crm_customer_id": values["crm_customer_id"],
                "state": state,
                "currency": values.get("currency"),
                "items": {line_sequence(line_id): (item[0], float(item[2]), item[4])
                          for line_id, item in values.get("items", {}).items()},
            }
        raise KeyError(kind)

    def read(self, kind: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        if kind == "customer":
            return {key: {"full_name": p.name, "street": p.street, "city": p.city,
                          "subdivision": p.subdivision, "phone_e164": p.phone,
                          "email": p.email, "deleted": not p.active, "position": None}
                    for key, p in self.target.read_parties(keys).items()}
        if kind == "order":
            prefix = self.target.code_prefix
            return {key: {"crm_customer_id": (s.party_code or "")[len(prefix):],
                          "state": _sale_state(s.state), "currency": s.currency,
                          "items": {seq: (sku, qty, price) for seq, sku, qty, price in s.lines},
                          "deleted": False, "position": None}
                    for key, s in self.target.read_sales(keys).items()}
        return {}

    def live_keys(self, kind: str, after: str | None, limit: int) -> list[str]:
        """Active parties with the CRM code prefix; sales of the CRM web shop not cancelled.

        Tryton orders party codes naturally (by length, then text) while its ``>`` compares
        text, so keys cannot be paged by a Tryton query: the first page (``after`` None)
        reads every live key, paged by id, and later pages are cut from that sorted list."""
        if after is None or kind not in self._live:
            self._live[kind] = sorted(self._read_live(kind))
        keys = self._live[kind]
        start = 0 if after is None else bisect.bisect_right(keys, after)
        return keys[start:start + limit]

    def _read_live(self, kind: str) -> list[str]:
        t = self.target
        if kind == "customer":
            model, field_ = "party.party", "code"
            domain: list[Any] = [("code", "like", t.code_prefix + "%")]
        elif kind == "order":
            model, field_ = "sale.sale", "web_id"
            domain = [("web_shop", "=", t.shop_id), ("state", "!=", "cancelled")]
        else:
            return []
        out: list[str] = []
        last_id = 0
        while True:
            rows = t.rpc.execute(model, "search_read", [*domain, ("id", ">", last_id)], 0,
                                 _PAGE, [("id", "ASC")], [field_])
            out += [str(r[field_]) for r in rows]
            if len(rows) < _PAGE:
                break
            last_id = rows[-1]["id"]
        if kind == "customer":
            return [k[len(t.code_prefix):] for k in out]
        return out

    def mark_deleted(self, kind: str, positions: dict[str, tuple[int, int] | None]
                     ) -> list[str]:
        """Not done for Tryton: an extra party or sale is Tryton's record to retire (a sale
        past quotation cannot be cancelled by the sync); reconcile reports it instead."""
        return []

    def unretired_extra(self, kind: str) -> str | None:
        what = {"customer": "deactivate the party in Tryton",
                "order": "cancel the sale in Tryton"}.get(kind, "retire it in Tryton")
        return f"extra in Tryton, not retired by design ({what})"

    # ---- operator reads -------------------------------------------------------------------
    def last_applied(self, conn: PgConn) -> LastApplied:
        """From ``tryton_positions`` (a position is stored once Tryton accepted the change);
        all None before the first change (the table does not exist until then)."""
        try:
            last = conn.execute(
                "SELECT max(applied_at), max(crm_commit_time), "
                "extract(epoch FROM clock_timestamp() - max(applied_at)) "
                "FROM tryton_positions").fetchone()
            delay = conn.execute(
                "SELECT extract(epoch FROM applied_at - crm_commit_time) FROM tryton_positions "
                "WHERE event_id NOT LIKE 'snap/%' ORDER BY applied_at DESC LIMIT 1").fetchone()
        except psycopg.errors.UndefinedTable:  # no consumer has applied to Tryton yet
            return LastApplied()
        return LastApplied.from_rows(last, delay)

    def key_records(self, conn: PgConn, key: str, orders: Sequence[str]
                    ) -> list[dict[str, Any]]:
        """The party whose code is the key's, the sale of the CRM web shop whose web id is
        the key, the sales of that party; for ``orders`` their sales and the sale line whose
        sequence is the line ``key``'s. Positions from ``tryton_positions``."""
        t = self.target
        out: list[dict[str, Any]] = []
        positions = _positions(conn, [key, *orders])
        for party_key, p in t.read_parties([key]).items():
            out.append({"table": "party.party", "as": "customer", "row": {
                "record": f"id {p.id}, code {p.code}" + ("" if p.active else ", inactive"),
                "id": p.id, "code": p.code, "name": p.name, "active": p.active,
                "deleted": not p.active, **positions.get(("customer", party_key), _NO_POS)}})
        own = t.read_sales([key])
        party_sales = [str(r["web_id"]) for r in t.rpc.execute(
            "sale.sale", "search_read", [("web_shop", "=", t.shop_id),
                                         ("party.code", "=", t.party_code(key))],
            0, None, [("id", "ASC")], ["web_id"])]
        by_customer = t.read_sales([k for k in party_sales if k != key])
        positions.update(_positions(conn, list(by_customer), kinds=("order",)))
        for what, sales in (("order", own), ("order of the customer", by_customer),
                            ("order of the line", t.read_sales(orders) if orders else {})):
            for web_id, sale in sales.items():
                row = _sale_row(sale, positions.get(("order", web_id), _NO_POS))
                out.append({"table": "sale.sale", "as": what, "row": row})
                if what == "order of the line":
                    seq = line_sequence(key)
                    out += [{"table": "sale.line", "as": "order line", "row": {
                        "record": f"sequence {s} of sale id {sale.id}: {sku} x {qty:g}",
                        "sale": sale.id, "sequence": s, "sku": sku, "quantity": qty,
                        "unit_price": price, "deleted": False,
                        **positions.get(("order", web_id), _NO_POS)}}
                        for s, sku, qty, price in sale.lines if s == seq]
        return out


# A key without a stored position (nothing applied by this sync, or an older table).
_NO_POS: dict[str, Any] = {"source_lsn": None, "source_seq": None, "event_id": None,
                           "applied_at": None}


def _positions(conn: PgConn, keys: Sequence[str], kinds: tuple[str, ...] = ("customer", "order")
               ) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, key) -> its stored position, as `trace` shows ERP rows' positions."""
    try:
        rows = conn.execute(
            "SELECT kind, crm_key, lsn, seq, event_id, applied_at FROM tryton_positions "
            "WHERE kind = ANY(%s) AND crm_key = ANY(%s)", (list(kinds), list(keys))).fetchall()
    except psycopg.errors.UndefinedTable:  # no consumer has applied to Tryton yet
        return {}
    return {(kind, key): {"source_lsn": lsn, "source_seq": seq, "event_id": event_id,
                          "applied_at": applied_at}
            for kind, key, lsn, seq, event_id, applied_at in rows}


def _sale_row(sale: SaleState, position: dict[str, Any]) -> dict[str, Any]:
    return {"record": f"id {sale.id}, number {sale.number or '-'}, state {sale.state}, "
                      f"shipment {sale.shipment_state}",
            "id": sale.id, "number": sale.number, "web_id": sale.web_id, "state": sale.state,
            "shipment_state": sale.shipment_state, "party_code": sale.party_code,
            "lines": len(sale.lines), "deleted": False, **position}
