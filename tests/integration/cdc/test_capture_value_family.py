"""The rest of the special-value family (issue #11, "What it must show"), with the pipeline
running: NaN in the other numeric column (an order line's unit price), infinite, BC and
past-9999 values in the other date column (an order's date) and in a timestamp column
(-infinity, BC, year 12000). Each bad change is in `dlq list` with its reason (stage
capture); every later good change of other keys reaches the ERP.
(test_capture_dead_letters.py has NaN in a customer's amount, infinity in a timestamp, and
BC, past-9999 and -infinity birth dates.)"""

from __future__ import annotations

from typing import Any

from service.operator import dlq as operator_dlq
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.cdc.test_capture_dead_letters import (
    _demands,
    _insert,
    _letters,
    _partners,
    pipeline,
)


def _order(crm: Any, customer: int, order_no: str, order_date: str,
           unit_price: str = "5000.00") -> int:
    row = crm.execute(
        "INSERT INTO crm.sales_orders (order_no, customer_id, order_date, status) "
        "VALUES (%s, %s, %s, '已付款') RETURNING order_id",
        (order_no, customer, order_date)).fetchone()
    crm.execute("INSERT INTO crm.order_lines (order_id, line_no, customer_id, product_code, "
                "product_name, quantity, unit_price) VALUES (%s, 1, %s, 'P-100011', '手机', "
                "'10台', %s)", (row[0], customer, unit_price))
    return int(row[0])


def test_the_rest_of_the_special_value_family_is_dead_lettered_and_later_changes_flow(
        sync_env: SyncEnv) -> None:
    cases: dict[str, tuple[str, str]] = {}  # letter key -> (column, start of the reason)
    with pipeline(sync_env), sync_env.crm() as crm:
        for given, order_date, unit_price, column, reason in [
            ("一", "2026-11-28", "NaN", "unit_price", "numeric NaN is not a finite number"),
            ("二", "infinity", "5000.00", "order_date", "infinity date"),
            ("三", "0044-03-15 BC", "5000.00", "order_date", "BC date"),
            ("四", "12000-01-01", "5000.00", "order_date", "date past year 9999"),
        ]:
            # one transaction per customer: the customer is good, its order is not
            with crm.transaction():
                customer = _insert(crm, "crm.customers", family_name="王", given_name=given)
                _order(crm, customer, f"2026{given}", order_date, unit_price)
            cases[f"c{customer}"] = (column, reason)
        for observed_at, reason in [("-infinity", "-infinity timestamp"),
                                    ("0001-01-01 00:00:00+00 BC", "BC timestamp"),
                                    ("12000-01-01 00:00:00+00", "timestamp past year 9999")]:
            demand = _insert(crm, "crm.market_demand", kind="竞争对手分析",
                             product_category="电子产品", content="x", observed_at=observed_at)
            cases[f"d{demand}"] = ("observed_at", reason)
        good = _insert(crm, "crm.customers", family_name="张", given_name="三",
                       notes="10台 已发货")
        good_demand = _insert(crm, "crm.market_demand", kind="市场趋势",
                              product_category="手机", content="5G手机市场增长迅速",
                              observed_at="2026-11-28T09:00:00Z")
        crm.execute("UPDATE crm.customers SET notes = '5000元' WHERE customer_id = %s", (good,))
        wait_until(lambda: _partners(sync_env).get(good) == "5000元"
                   and good_demand in _demands(sync_env), timeout=180,
                   message="the later good changes in the ERP")
        wait_until(lambda: set(cases) <= set(_letters(sync_env)), timeout=60,
                   message="every bad change in sync.dead_letters")

    letters = _letters(sync_env)
    for key, (column, reason) in cases.items():
        stage, error_class, message, *_ = letters[key]
        assert (stage, error_class) == ("capture", "UnrepresentableValue"), key
        assert message.startswith(f"{column}: "), (key, message)
        assert reason in message, (key, message)
    listed = {("d" if d.topic == sync_env.settings.market_topic else "c") + d.key_text
              for d in operator_dlq.list_letters(sync_env.settings, error_type="capture")}
    assert set(cases) <= listed
    # the customers themselves (good rows, earlier in their transactions) were applied
    assert {int(k[1:]) for k in cases if k.startswith("c")} | {good} <= set(_partners(sync_env))
    assert good_demand in _demands(sync_env)
