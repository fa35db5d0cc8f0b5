"""A lines-only order event's prices against its order's currency in the ERP (finding N12):
``changes.line_currency_lookups`` / ``line_currency_errors`` decide, the targets only read
(``order_currencies``: the sql target's one query is tested on the real database in
tests/integration/consumer/test_line_currency.py; the tryton target's one call here, on a
fake RPC)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from service.erp.changes import (
    ErpChange,
    OrderCurrency,
    line_currency_errors,
    line_currency_lookups,
    to_erp,
)
from service.erp.mappings import Mappings
from service.erp.tryton import PositionStore, TrytonTarget
from service.erp.tryton_rpc import TrytonRPC
from service.erp.tryton_target import TrytonErpTarget

COMMIT = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def erp_has(code: str, position: tuple[int, int] | None = (0, 0)) -> OrderCurrency:
    return OrderCurrency(code, position)


@pytest.fixture(scope="module")
def mappings() -> Mappings:
    return Mappings.load()


def _line(order: str, n: int, price: str) -> dict[str, Any]:
    return {"op": "UPDATE", "before": None, "after": {
        "key": f'["{order}","{n}"]', "order_key": order, "product_code": "P-PHONE-5G",
        "product_name": "手机", "quantity": "10台", "unit": None, "unit_price": price}}


def _event(m: Mappings, order: str, lsn: int, prices: list[str],
           currency: str | None = None, op: str = "UPDATE") -> ErpChange:
    """An order event: lines-only unless ``currency`` (the header's currency word) is given;
    ``op`` DELETE with no currency: the header's delete."""
    after = None if currency is None else {
        "key": order, "customer_key": "42", "order_no": f"SO{order}",
        "order_date": date(2023, 1, 1), "status": "已发货", "currency": currency,
        "total_amount": None}
    before = {"order_no": f"SO{order}"} if op == "DELETE" else None
    record = {"event_id": f"{lsn}/0", "op": op, "key": order, "customer_key": "42",
              "source": {"lsn": lsn, "seq": 0, "txid": 9, "commit_time": COMMIT,
                         "table": "crm.sales_orders", "snapshot": False, "profile": "demo"},
              "before": before, "after": after,
              "lines": [_line(order, n, p) for n, p in enumerate(prices, 1)]}
    return to_erp("order", record, m)


def test_a_dollar_line_under_a_yuan_order_in_the_erp_is_refused(mappings: Mappings) -> None:
    changes: list[ErpChange | None] = [_event(mappings, "9001", 1, ["5000元", "100美元"])]
    assert line_currency_lookups(changes) == ["9001"]

    errors = line_currency_errors(changes, {"9001": erp_has("CNY")})

    error = errors[0]
    assert (error.field, error.line) == ("lines.unit_price", '["9001","2"]')
    assert str(error) == ('lines.unit_price: line ["9001","2"]: currency written with the '
                          "amount (USD) differs from the order's currency in the ERP (CNY)")
    assert "100" not in str(error).replace('["9001","2"]', "")  # no price in the reason
    # The same line under a dollar order is fine; the yuan line then is not.
    again = line_currency_errors(changes, {"9001": erp_has("USD")})
    assert [(e.line, "(CNY)" in str(e)) for e in again.values()] == [('["9001","1"]', True)]


def test_prices_without_a_written_currency_need_no_lookup(mappings: Mappings) -> None:
    changes: list[ErpChange | None] = [_event(mappings, "9001", 1, ["5000.00", "5000"])]
    assert line_currency_lookups(changes) == []
    assert line_currency_errors(changes, {"9001": erp_has("USD")}) == {}  # the order's currency


def test_an_order_the_erp_does_not_hold_is_not_checked(mappings: Mappings) -> None:
    changes: list[ErpChange | None] = [_event(mappings, "9001", 1, ["100美元"])]
    assert line_currency_lookups(changes) == ["9001"]
    assert line_currency_errors(changes, {}) == {}  # applied or held as before the check
    assert line_currency_errors(changes, {"9001": erp_has("")}) == {}  # a delete stored no currency


def test_a_header_earlier_in_the_batch_gives_the_currency(mappings: Mappings) -> None:
    before = _event(mappings, "9001", 1, ["100美元"])  # before the header: the ERP's currency
    header = _event(mappings, "9001", 2, [], currency="美元")
    after = _event(mappings, "9001", 3, ["200美元"])
    other = _event(mappings, "9002", 4, ["5000元"])
    changes: list[ErpChange | None] = [before, header, after, None, other]

    assert line_currency_lookups(changes) == ["9001", "9002"]
    assert line_currency_lookups(changes[1:]) == ["9002"]  # 9001's header is in the batch
    errors = line_currency_errors(changes, {"9001": erp_has("CNY"), "9002": erp_has("CNY")})
    assert list(errors) == [0]
    assert "(USD) differs from the order's currency in the ERP (CNY)" in str(errors[0])


def test_an_event_older_than_what_the_erp_holds_is_not_checked(mappings: Mappings) -> None:
    """A replay: the order's currency may have changed since the event (USD now, CNY then)."""
    changes: list[ErpChange | None] = [_event(mappings, "9001", 5, ["100元"])]
    assert list(line_currency_errors(changes, {"9001": erp_has("USD", (5, 0))})) == []
    assert list(line_currency_errors(changes, {"9001": erp_has("USD", (6, 0))})) == []
    assert list(line_currency_errors(changes, {"9001": erp_has("USD", (4, 9))})) == [0]
    assert list(line_currency_errors(changes, {"9001": erp_has("USD", None)})) == [0]


def test_a_deleted_header_keeps_the_currency_the_erp_keeps(mappings: Mappings) -> None:
    deleted = _event(mappings, "9001", 1, [], op="DELETE")
    lines = _event(mappings, "9001", 2, ["100美元"])
    assert deleted.header is not None and deleted.header.deleted
    changes: list[ErpChange | None] = [deleted, lines]
    assert line_currency_lookups(changes) == ["9001"]
    assert list(line_currency_errors(changes, {"9001": erp_has("CNY")})) == [1]


def test_a_deleted_line_is_not_checked(mappings: Mappings) -> None:
    change = _event(mappings, "9001", 1, [])
    change.items.append(_event(mappings, "9001", 1, ["100美元"]).items[0])
    object.__setattr__(change.items[0], "deleted", True)
    assert line_currency_lookups([change]) == []


class _Rpc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def execute(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(args)
        return [{"id": 1, "web_id": "9001", "currency.": {"id": 2, "code": "CNY"}},
                {"id": 2, "web_id": "9002", "currency.": None}]


def test_tryton_reads_the_sales_currencies_in_one_call() -> None:
    t = TrytonTarget(TrytonRPC("http://127.0.0.1:9", "db", "u", "p"), PositionStore("unused"))
    rpc = _Rpc()
    t.rpc = rpc  # type: ignore[assignment]
    t._shop = {"id": 3}

    assert t.sale_currencies(["9002", "9001", "9001"]) == {"9001": "CNY"}
    assert rpc.calls == [("sale.sale", "search_read",
                          [("web_shop", "=", 3), ("web_id", "in", ["9001", "9002"])],
                          0, None, [("id", "ASC")], ["web_id", "currency.code"])]
    assert t.sale_currencies([]) == {} and len(rpc.calls) == 1


class _Positions:
    def get(self, kind: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        assert (kind, keys) == ("order", ["9001"])
        return {"9001": (7, 2)}


def test_the_tryton_target_adds_the_orders_positions() -> None:
    t = TrytonTarget(TrytonRPC("http://127.0.0.1:9", "db", "u", "p"), PositionStore("unused"))
    t.rpc = _Rpc()  # type: ignore[assignment]
    t.positions = _Positions()  # type: ignore[assignment]
    t._shop = {"id": 3}

    assert TrytonErpTarget(t).order_currencies(["9001", "9002"]) == {
        "9001": OrderCurrency("CNY", (7, 2))}
