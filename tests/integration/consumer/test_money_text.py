"""Money a CRM keeps as text (finding N12): a customer's purchase amount and a line's unit
price are read like an order's total (README "How values are read": 5000元, ¥5,000.00),
on the real broker and databases; what is not money, or not the order's currency, is a dead
letter naming the field; a purchase amount without any currency takes
``[money] default_currency`` of the mappings file."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from service.erp.mappings import DEFAULT_PATH
from service.errors import ConfigError
from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up


def _text_money(sync_env: SyncEnv) -> None:
    """The CRM keeps purchase amounts and unit prices as text (the contract accepts it)."""
    with sync_env.crm() as crm:
        crm.execute("ALTER TABLE crm.customers ALTER COLUMN purchase_amount TYPE text")
        crm.execute("ALTER TABLE crm.order_lines ALTER COLUMN unit_price TYPE text")


def _customer(crm: Any, amount: str) -> str:
    row = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                      "purchase_amount) VALUES ('张', '三', '13812345678', %s) "
                      "RETURNING customer_id", (amount,)).fetchone()
    return str(row[0])


def yuan_order(crm: Any, order_id: int, customer: str, price: str) -> None:
    """A shipped yuan order of one line (a phone) at ``price`` as the CRM writes it."""
    crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, "
                "status, currency) VALUES (%s, %s, %s, '2023-01-01', '已发货', '元')",
                (order_id, f"M{order_id}", customer))
    crm.execute("INSERT INTO crm.order_lines (order_id, line_no, customer_id, product_code, "
                "product_name, quantity, unit_price) VALUES (%s, 1, %s, 'P-PHONE-5G', '手机', "
                "'10台', %s)", (order_id, customer, price))


def sync_once(settings: Settings) -> None:
    """Produce, then apply, everything the CRM holds now."""
    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    consume_until_caught_up(ErpConsumer(settings))


def test_text_amounts_are_read_like_an_order_total(sync_env: SyncEnv) -> None:
    _text_money(sync_env)
    with sync_env.crm() as crm:
        ids = {text: _customer(crm, text)
               for text in ("5000元", "¥5,000.00", "USD 99.90", "5000.00", "五千元")}
        yuan_order(crm, 771, ids["5000元"], "5000元")
        yuan_order(crm, 772, ids["¥5,000.00"], "100美元")  # a dollar price on a yuan order
    sync_once(sync_env.settings)

    with sync_env.erp() as erp:
        partners = {r[0]: (r[1], r[2]) for r in erp.execute(
            "SELECT crm_customer_id, purchase_amount, amount_currency "
            "FROM erp.business_partners WHERE NOT deleted").fetchall()}
        prices = dict(erp.execute("SELECT crm_order_id, unit_price FROM "
                                  "erp.sales_order_items WHERE NOT deleted").fetchall())
        letters = [r[0] for r in erp.execute(
            "SELECT error_message FROM sync.dead_letters WHERE error_class = 'MappingError' "
            "ORDER BY dead_letter_id").fetchall()]
    assert partners[ids["5000元"]] == (Decimal("5000.00"), "CNY")
    assert partners[ids["¥5,000.00"]] == (Decimal("5000.00"), "CNY")
    assert partners[ids["USD 99.90"]] == (Decimal("99.90"), "USD")
    assert partners[ids["5000.00"]] == (Decimal("5000.00"), "CNY")  # the default currency
    assert ids["五千元"] not in partners  # a letter, not a guess
    assert prices == {"771": Decimal("5000.00")}
    assert len(letters) == 2, letters
    assert any(m.startswith("purchase_amount: ") and "not an amount" in m for m in letters)
    assert any(m.startswith("lines.unit_price: ")
               and "(USD) differs from the currency field (CNY)" in m for m in letters), letters


def test_the_default_currency_of_a_purchase_amount_is_configured(
        sync_env: SyncEnv, tmp_path: Path) -> None:
    shipped = DEFAULT_PATH.read_text("utf-8")
    assert 'default_currency = "CNY"' in shipped
    usd = tmp_path / "usd.toml"
    usd.write_text(shipped.replace('default_currency = "CNY"', 'default_currency = "USD"'),
                   "utf-8")
    typo = tmp_path / "typo.toml"
    typo.write_text(shipped.replace('default_currency = "CNY"', 'default_currency = "CYN"'),
                    "utf-8")
    with pytest.raises(ConfigError) as info:  # refused at start-up, not stamped on amounts
        ErpConsumer(sync_env.with_(mappings_file=typo))
    assert f"{typo}: money.default_currency" in str(info.value)

    _text_money(sync_env)
    with sync_env.crm() as crm:
        plain, yuan = _customer(crm, "5000"), _customer(crm, "5000元")
    sync_once(sync_env.with_(mappings_file=usd))
    with sync_env.erp() as erp:
        partners = dict(erp.execute("SELECT crm_customer_id, amount_currency "
                                    "FROM erp.business_partners").fetchall())
    assert partners == {plain: "USD", yuan: "CNY"}
