"""The `tryton` target against a real Tryton 8.2 server (deploy/tryton/server.sh) on a database
cloned from the template, everything read back over JSON-RPC.

One Tryton database serves the module; each test uses its own CRM keys and its own
sync-state database (positions), so the tests do not see each other's changes.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from service.erp.changes import OrderHeaderRow, OrderItemRow, PartnerRow, Position
from service.erp.tryton import Outcome, PositionStore, Status, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.errors import TargetRefused, TargetUnavailable
from tests.conftest import Stack, TrytonServer

_keys = itertools.count(1)


def pos(lsn: int, seq: int = 0) -> Position:
    return Position(lsn, seq, f"{lsn:X}/{seq}", datetime(2026, 11, 29, 8, 0, tzinfo=UTC))


def customer(cid: int, lsn: int, **changes: Any) -> PartnerRow:
    row = PartnerRow(
        crm_customer_id=str(cid), deleted=False, full_name="张三", gender_code="M",
        birth_date=None, age=None, phone_e164="+8613800005678", email="zhangsan@example.cn",
        province="北京市", city="北京市", district="朝阳区", street="建国路88号",
        purchase_frequency=None, purchase_amount=None, amount_currency=None,
        product_preference=None, notes=None, pos=pos(lsn))
    return replace(row, **changes)


def order(oid: int, cid: int, lsn: int, status: str = "PAID",
          lines: tuple[tuple[int, str, int, int], ...] = ((1, "SKU-100001", 10, 5000),
                                                           (2, "SKU-100005", 2, 300)),
          ) -> tuple[OrderHeaderRow, list[OrderItemRow]]:
    header = OrderHeaderRow(str(oid), f"SO-{oid}", str(cid), date(2026, 11, 29), status,
                            "CNY", False, pos(lsn))
    items = [OrderItemRow(str(oid), f'["{oid}","{n}"]', sku, "商品", Decimal(q), "UNIT",
                          Decimal(p), False, pos(lsn))
             for n, sku, q, p in lines]
    return header, items


@dataclass
class World:
    target: TrytonTarget
    rpc: TrytonRPC

    def key(self) -> int:
        """A CRM id no other test in this module uses."""
        return 70_000 + next(_keys)

    def counts(self) -> dict[str, int]:
        ctx = {"active_test": False}
        return {model: self.rpc.execute(model, "search_count", [], context=ctx)
                for model in ("party.party", "party.address", "party.contact_mechanism",
                              "sale.sale", "sale.line", "stock.move", "stock.shipment.out")}

    def write_dates(self, model: str, ids: list[int]) -> dict[int, Any]:
        rows = self.rpc.execute(model, "read", ids, ["write_date"])
        return {r["id"]: r["write_date"] for r in rows}


@pytest.fixture
def world(stack: Stack, tryton_server: TrytonServer) -> Iterator[World]:
    state_db = f"sync_state_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        # template0: nobody connects to it, so concurrent CREATE DATABASEs elsewhere on the
        # shared stack cannot make this one fail ("source database is being accessed").
        conn.execute(f'CREATE DATABASE "{state_db}" TEMPLATE template0')
    rpc = TrytonRPC(tryton_server.url, tryton_server.database, tryton_server.login,
                    tryton_server.password)
    target = TrytonTarget(rpc, PositionStore(stack.dsn_for(state_db)))
    try:
        yield World(target, rpc)
    finally:
        target.close()
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{state_db}" WITH (FORCE)')


def statuses(outcomes: list[Outcome]) -> list[Status]:
    """The statuses; a refusal or hold shows its reasons in the assertion message."""
    return [o.status if o.status in (Status.APPLIED, Status.STALE) else (o.status, o.reason)
            for o in outcomes]  # type: ignore[misc]


def test_customer_becomes_a_party_read_back_by_code(world: World) -> None:
    cid = world.key()
    assert statuses(world.target.apply_customers([customer(cid, 100)])) == [Status.APPLIED]

    raw = world.rpc.execute("party.party", "search_read", [("code", "=", f"CRM-{cid}")], 0,
                            None, None, ["name", "active"])
    assert [(r["name"], r["active"]) for r in raw] == [("张三", True)]
    party = world.target.read_parties([str(cid)])[str(cid)]
    assert (party.street, party.city, party.subdivision, party.country) == \
        ("朝阳区 建国路88号", "北京市", "CN-BJ", "CN")
    assert (party.phone, party.email) == ("+8613800005678", "zhangsan@example.cn")

    # A newer event changes the phone only; a delete deactivates (parties with sales stay).
    outcome = world.target.apply_customers([customer(cid, 110, phone_e164="+8613900001111")])
    assert statuses(outcome) == [Status.APPLIED]
    assert world.target.read_parties([str(cid)])[str(cid)].phone == "+8613900001111"
    world.target.apply_customers([customer(cid, 120, deleted=True)])
    assert world.target.read_parties([str(cid)])[str(cid)].active is False


def test_paid_order_with_two_lines_becomes_a_processing_sale_with_one_move_per_line(
        world: World) -> None:
    cid, oid = world.key(), world.key()
    world.target.apply_customers([customer(cid, 100)])
    header, items = order(oid, cid, 200)

    assert statuses(world.target.apply_orders([header], items)) == [Status.APPLIED]

    sale = world.target.read_sales([str(oid)])[str(oid)]
    assert (sale.state, sale.shipment_state, sale.party_code) == \
        ("processing", "waiting", f"CRM-{cid}")
    assert sale.lines == ((1, "SKU-100001", 10.0, Decimal(5000)),
                          (2, "SKU-100005", 2.0, Decimal(300)))
    assert [state for _, state in sale.shipments] == ["waiting"]
    assert sorted((m.sku, m.quantity, m.from_location, m.to_location) for m in sale.moves) == \
        [("SKU-100001", 10.0, "OUT", "CUS"), ("SKU-100005", 2.0, "OUT", "CUS")]


def test_reapplied_and_older_events_change_nothing(world: World, stack: Stack) -> None:
    cid, oid = world.key(), world.key()
    cust = customer(cid, 100)
    header, items = order(oid, cid, 200, status="PENDING_PAYMENT")
    world.target.apply_customers([cust])
    world.target.apply_orders([header], items)
    paid, paid_items = order(oid, cid, 210)
    world.target.apply_orders([paid], paid_items)
    party = world.target.read_parties([str(cid)])[str(cid)]
    sale = world.target.read_sales([str(oid)])[str(oid)]
    assert sale.state == "processing"
    before = (world.counts(), party, sale)

    # The same events again, and older ones (a replay from an earlier offset).
    assert statuses(world.target.apply_customers([cust])) == [Status.STALE]
    assert statuses(world.target.apply_orders([paid], paid_items)) == [Status.STALE]
    older = customer(cid, 90, full_name="李四", phone_e164="+8613711112222")
    assert statuses(world.target.apply_customers([older])) == [Status.STALE]
    assert statuses(world.target.apply_orders([header], items)) == [Status.STALE]
    after = (world.counts(), world.target.read_parties([str(cid)])[str(cid)],
             world.target.read_sales([str(oid)])[str(oid)])
    assert after == before  # counts, values and write dates

    # A crash after Tryton committed but before the positions did: the same events are
    # applied again with no positions at all, and still change nothing in Tryton.
    with psycopg.connect(world.target.positions.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM tryton_positions")
    assert statuses(world.target.apply_customers([cust])) == [Status.APPLIED]
    assert statuses(world.target.apply_orders([paid], paid_items)) == [Status.APPLIED]
    again = (world.counts(), world.target.read_parties([str(cid)])[str(cid)],
             world.target.read_sales([str(oid)])[str(oid)])
    assert again == before


def test_order_before_its_customer_is_held_then_applied(world: World) -> None:
    cid, oid = world.key(), world.key()
    header, items = order(oid, cid, 200)

    outcome, = world.target.apply_orders([header], items)
    assert outcome.status is Status.HELD
    assert outcome.reason == f"customer {cid} is not in Tryton yet"
    assert world.target.read_sales([str(oid)]) == {}

    world.target.apply_customers([customer(cid, 100)])
    assert statuses(world.target.apply_orders([header], items)) == [Status.APPLIED]
    assert world.target.read_sales([str(oid)])[str(oid)].state == "processing"


def test_cancel_or_edit_after_confirmation_is_refused_naming_the_tryton_action(
        world: World) -> None:
    cid, oid = world.key(), world.key()
    world.target.apply_customers([customer(cid, 100)])
    header, items = order(oid, cid, 200)
    world.target.apply_orders([header], items)

    cancelled = replace(header, status_code="CANCELLED", pos=pos(300))
    outcome, = world.target.apply_orders([cancelled], [])
    assert outcome.status is Status.REFUSED
    assert outcome.reason is not None
    assert "Tryton sale is processing" in outcome.reason
    assert "Customer Shipments" in outcome.reason
    assert "Handle Shipment Exception" in outcome.reason

    edited = [replace(items[0], quantity=Decimal(12), pos=pos(310))]
    outcome, = world.target.apply_orders([], edited)
    assert outcome.status is Status.REFUSED
    assert outcome.reason is not None and "sale_amendment" in outcome.reason

    sale = world.target.read_sales([str(oid)])[str(oid)]
    assert (sale.state, sale.lines[0][2]) == ("processing", 10.0)


def test_quotation_is_edited_then_cancelled_while_the_crm_owns_it(world: World) -> None:
    cid, oid = world.key(), world.key()
    world.target.apply_customers([customer(cid, 100)])
    header, items = order(oid, cid, 200, status="PENDING_PAYMENT")
    world.target.apply_orders([header], items)
    assert world.target.read_sales([str(oid)])[str(oid)].state == "quotation"

    edited = [replace(items[0], quantity=Decimal(12), pos=pos(210)),
              replace(items[1], deleted=True, pos=pos(210))]
    assert statuses(world.target.apply_orders([], edited)) == [Status.APPLIED]
    sale = world.target.read_sales([str(oid)])[str(oid)]
    assert (sale.state, sale.lines) == ("quotation", ((1, "SKU-100001", 12.0, Decimal(5000)),))

    cancelled = replace(header, status_code="CANCELLED", pos=pos(220))
    assert statuses(world.target.apply_orders([cancelled], [])) == [Status.APPLIED]
    assert world.target.read_sales([str(oid)])[str(oid)].state == "cancelled"


def test_a_batch_of_orders_is_applied_with_one_call_per_step(world: World) -> None:
    cids = [world.key() for _ in range(5)]
    world.target.apply_customers([customer(c, 100) for c in cids])
    headers: list[OrderHeaderRow] = []
    items: list[OrderItemRow] = []
    for c in cids:
        h, its = order(world.key(), c, 200)
        headers.append(h)
        items.extend(its)
    calls = world.rpc.calls

    outcomes = world.target.apply_orders(headers, items)

    assert statuses(outcomes) == [Status.APPLIED] * 5
    # sales, lines, parties (+ addresses, mechanisms), products; create, quote, confirm
    assert world.rpc.calls - calls <= 9
    sales = world.target.read_sales([o.key for o in outcomes])
    assert {s.state for s in sales.values()} == {"processing"}


def test_trytons_own_refusal_arrives_as_a_typed_error_with_its_message(world: World) -> None:
    cid = world.key()
    world.target.apply_customers([customer(cid, 100)])

    with pytest.raises(TargetRefused) as caught:
        world.rpc.execute("party.party", "create", [{"code": f"CRM-{cid}", "name": "重复"}])

    assert caught.value.error_class == "UserError"
    assert "unique" in caught.value.detail  # Tryton's own words, for the dead letter
    assert "重复" not in str(caught.value)


def test_an_expired_session_is_renewed_without_failing_the_call(world: World) -> None:
    cid = world.key()
    world.target.apply_customers([customer(cid, 100)])
    world.rpc.call("common.db.logout")  # the server forgets the session token

    assert world.target.read_parties([str(cid)])[str(cid)].name == "张三"


CHILD = """
import sys
from tests.integration.erp.test_tryton import order
from service.erp.tryton import PositionStore, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
url, db, login, password, state_dsn, first, count, cid = sys.argv[1:]
target = TrytonTarget(TrytonRPC(url, db, login, password), PositionStore(state_dsn))
for start in range(int(first), int(first) + int(count), 5):
    rows = [order(oid, int(cid), 500) for oid in range(start, start + 5)]
    target.apply_orders([h for h, _ in rows], [i for _, its in rows for i in its])
"""


def test_a_consumer_killed_mid_batch_converges_with_no_duplicate_on_restart(
        world: World, tryton_server: TrytonServer) -> None:
    import subprocess
    import sys
    import time

    from service.settings import REPO_ROOT

    cid = world.key()
    world.target.apply_customers([customer(cid, 100)])
    first = 80_000 + 100 * next(_keys)
    keys = [str(k) for k in range(first, first + 20)]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, tryton_server.url, tryton_server.database,
         tryton_server.login, tryton_server.password, world.target.positions.dsn,
         str(first), "20", str(cid)], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not world.target.read_sales(keys):  # the first batch's sales exist (draft)
            assert child.poll() is None, "the child ended before creating a sale"
            assert time.monotonic() < deadline, "no sale within 120 s"
            time.sleep(0.05)
        child.kill()  # SIGKILL: no cleanup, positions not written for the batch
    finally:
        child.wait(30)
    at_kill = world.target.read_sales(keys)
    assert len(at_kill) < 20 or {s.state for s in at_kill.values()} != {"processing"}

    # The restarted consumer re-applies the batch, retrying transient errors as the
    # pipeline does (the killed child's last call may still be running on the server).
    rows = [order(int(k), cid, 500) for k in keys]
    deadline = time.monotonic() + 120
    while True:
        try:
            outcomes = world.target.apply_orders([h for h, _ in rows],
                                                 [i for _, its in rows for i in its])
            break
        except TargetUnavailable:
            assert time.monotonic() < deadline, "still transient after 120 s"
            time.sleep(0.5)

    assert statuses(outcomes) == [Status.APPLIED] * 20, [o.detail for o in outcomes]
    web_ids = world.rpc.execute("sale.sale", "search_read", [("web_id", "in", keys)], 0, None,
                                None, ["web_id", "state"])
    assert sorted(s["web_id"] for s in web_ids) == sorted(keys)  # one sale per order
    assert {s["state"] for s in web_ids} == {"processing"}
    sales = world.target.read_sales(keys)
    assert all(len(s.moves) == 2 for s in sales.values())
