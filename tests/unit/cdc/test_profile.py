"""service.cdc.profile: loading and validating source profiles; keys as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.cdc.profile import (
    CANONICAL_FIELDS,
    PROFILES_DIR,
    Const,
    DeleteFlag,
    EntityMapping,
    Reference,
    key_text,
    key_values,
    load_profile,
)
from service.errors import ConfigError
from service.settings import Settings

MINIMAL = """\
[source]
name = "mini"

[customer]
table = "app.clients"
key = ["client_id"]

[customer.fields]
full_name = "name"
phone = "tel"

[order]
table = "app.orders"
key = ["order_id"]
customer = "client_id"

[order.fields]
order_no = "number"
order_date = "placed_on"

[order_line]
table = "app.order_items"
key = ["order_id", "pos"]
order = "order_id"

[order_line.fields]
product_code = "sku"
quantity = "qty"
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def refused(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    return path, info.value


# ---- the shipped profiles ------------------------------------------------------------------

def test_shipped_profiles_are_demo_and_bottlecrm() -> None:
    assert sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) == ["bottlecrm", "demo"]


def test_demo_profile_loads() -> None:
    demo = load_profile("demo")
    assert demo.name == "demo"
    assert demo.path == PROFILES_DIR / "demo.toml"
    assert set(demo.entities) == {"customer", "order", "order_line", "market_demand"}
    assert demo.tables == ["crm.customers", "crm.sales_orders", "crm.order_lines",
                           "crm.market_demand"]
    assert demo.entities["customer"].key == ("customer_id",)
    assert demo.entities["order"].customer_column == "customer_id"
    line = demo.entities["order_line"]
    assert (line.key, line.order_column) == (("order_id", "line_no"), "order_id")
    assert line.kind == "order" and demo.entities["market_demand"].kind == "market_demand"
    assert all(e.row_filter is None and e.deleted_when is None
               for e in demo.entities.values())
    assert demo.table("crm.order_lines") is line and demo.table("crm.nothing") is None
    assert [e.entity for e in demo.snapshot_entities] == ["customer", "order", "market_demand"]
    # Every demo column that fed a v1 event still feeds its canonical field.
    assert demo.entities["customer"].fields["purchase_amount"] == "purchase_amount"
    assert "full_name" in demo.entities["customer"].missing()
    assert demo.entities["order_line"].missing() == ["unit"]


def test_bottlecrm_profile_loads() -> None:
    bottle = load_profile("bottlecrm")
    assert bottle.name == "bottlecrm"
    assert set(bottle.entities) == {"customer", "order", "order_line", "product"}
    assert bottle.tables == ["public.accounts", "public.orders", "public.order_line_item",
                             "public.product"]
    assert all(e.row_filter is not None and "org_id" in e.row_filter
               for e in bottle.entities.values())
    customer = bottle.entities["customer"]
    assert customer.key == ("id",)
    assert customer.deleted_when == DeleteFlag("is_active", False)
    assert customer.fields["full_name"] == "name"
    assert bottle.entities["order"].customer_column == "account_id"
    line = bottle.entities["order_line"]
    assert line.order_column == "order_id"
    assert line.customer_column is None  # partitioned through its order
    assert line.fields["product_code"] == Reference("product", "product_id", "code")
    assert line.fields["unit"] == Const("个")
    assert line.columns == ("id", "order_id", "product_id", "name", "quantity", "unit_price")
    product = bottle.entities["product"]
    assert product.kind is None  # reference data, not published
    assert product.fields == {"code": "sku", "name": "name"}
    assert [e.entity for e in bottle.snapshot_entities] == ["product", "customer", "order"]


def test_a_profile_by_path_and_its_defaults(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, MINIMAL.replace('name = "mini"\n', "")))
    assert profile.name == "mine"  # the file's stem when [source].name is absent
    assert profile.entity("market_demand") is None and profile.entity("product") is None
    assert profile.entities["customer"].columns == ("client_id", "name", "tel")


def test_a_default_row_filter_applies_where_a_table_has_none(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "mini"', 'name = "mini"\nrow_filter = "tenant = 7"')
    text = text.replace('key = ["order_id"]\n', 'key = ["order_id"]\nrow_filter = "tenant = 8"\n')
    profile = load_profile(write(tmp_path, text))
    assert profile.entities["customer"].row_filter == "tenant = 7"
    assert profile.entities["order"].row_filter == "tenant = 8"
    assert profile.entities["order_line"].row_filter == "tenant = 7"


def test_the_setting_names_the_profile(tmp_path: Path) -> None:
    assert load_profile(Settings().source_profile).name == "demo"  # the default
    chosen = Settings.from_env({"CRM_ERP_SYNC_SOURCE_PROFILE": "bottlecrm"})
    assert load_profile(chosen.source_profile).name == "bottlecrm"
    path = write(tmp_path, MINIMAL)
    own = Settings.from_env({"CRM_ERP_SYNC_SOURCE_PROFILE": str(path)})
    assert load_profile(own.source_profile).path == path


def test_unknown_shipped_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_SOURCE_PROFILE") as info:
        load_profile("salesforce")
    assert "bottlecrm" in info.value.problem and "demo" in info.value.problem


# ---- validation: every error names the file and the key -------------------------------------

@pytest.mark.parametrize(("edit", "spot", "says"), [
    pytest.param(lambda t: t.replace('key = ["client_id"]\n', ""), "[customer].key",
                 "non-empty list", id="customer-key-missing"),
    pytest.param(lambda t: t.replace('key = ["client_id"]', "key = []"), "[customer].key",
                 "non-empty list", id="customer-key-empty"),
    pytest.param(lambda t: t + '\n[invoice]\ntable = "app.invoices"\nkey = ["id"]\n',
                 "[invoice]", "unknown section", id="unknown-section"),
    pytest.param(lambda t: t.replace('phone = "tel"', 'vip_level = "vip"'),
                 "[customer].fields.vip_level", "not a canonical customer field",
                 id="unknown-canonical-field"),
    pytest.param(lambda t: t.replace('qty"', 'qty"\nsurcharge = "extra"'),
                 "[order_line].fields.surcharge", "not a canonical order_line field",
                 id="unknown-canonical-line-field"),
    pytest.param(lambda t: t.replace('"app.clients"', '"clients"'), "[customer].table",
                 "schema-qualified", id="table-without-schema"),
    pytest.param(lambda t: t.replace('"app.clients"', '"app.clients; DROP TABLE x"'),
                 "[customer].table", "schema-qualified", id="table-not-an-identifier"),
    pytest.param(lambda t: t.replace('"app.clients"', '"db.app.clients"'),
                 "[customer].table", "schema-qualified", id="table-three-parts"),
    pytest.param(lambda t: t.replace('quantity = "qty"',
                                     'quantity = "qty"\n'
                                     'product_name = { ref = "product", column = "sku_id" }'),
                 "[order_line].fields.product_name.ref", "[product]",
                 id="reference-to-missing-entity"),
    pytest.param(lambda t: t.replace('quantity = "qty"',
                                     'quantity = "qty"\n'
                                     'unit = { ref = "warehouse", column = "wh" }'),
                 "[order_line].fields.unit.ref", "unknown entity",
                 id="reference-to-unknown-entity"),
    pytest.param(lambda t: t.replace('order_date = "placed_on"',
                                     'order_date = { const = "2024-01-01" }'),
                 "[order].fields.order_date.const", "text field", id="const-on-a-date-field"),
    pytest.param(lambda t: t.replace('phone = "tel"', "phone = { const = 5 }"),
                 "[customer].fields.phone.const", "text", id="const-not-text"),
    pytest.param(lambda t: t.replace('key = ["client_id"]', 'key = ["client_id", "branch"]'),
                 "[customer].key", "one column", id="composite-customer-key"),
    pytest.param(lambda t: t.replace('key = ["order_id"]\n', 'key = ["order_id", "rev"]\n'),
                 "[order].key", "one column", id="composite-order-key"),
    pytest.param(lambda t: t.replace('customer = "client_id"\n', ""), "[order].customer",
                 "required", id="order-without-customer"),
    pytest.param(lambda t: t.replace('order = "order_id"\n', ""), "[order_line].order",
                 "required", id="line-without-order"),
    pytest.param(lambda t: t.replace('key = ["client_id"]',
                                     'key = ["client_id"]\norder = "x"'),
                 "[customer].order", "only [order_line]", id="order-on-a-customer"),
    pytest.param(lambda t: t.replace('key = ["client_id"]', 'key = ["client_id"]\nwhere = "x"'),
                 "[customer].where", "unknown setting", id="unknown-setting"),
    pytest.param(lambda t: t.replace('phone = "tel"', 'phone = "tel phone"'),
                 "[customer].fields.phone", "column name", id="bad-column-name"),
    pytest.param(lambda t: t.replace('key = ["client_id"]',
                                     'key = ["client_id"]\ndeleted_when = "active = false"'),
                 "[customer].deleted_when", "column", id="deleted-when-not-a-table"),
    pytest.param(lambda t: t.replace('key = ["client_id"]', 'key = ["client_id"]\nrow_filter = ""'),
                 "[customer].row_filter", "SQL", id="empty-row-filter"),
    pytest.param(lambda t: t.split("[order_line]")[0], "[order_line]", "required",
                 id="line-section-missing"),
    pytest.param(lambda t: t.replace('"app.orders"', '"app.clients"'), "table",
                 "its own table", id="shared-table"),
])
def test_validation_errors_name_file_and_key(tmp_path: Path, edit: Any, spot: str,
                                             says: str) -> None:
    text = edit(MINIMAL)
    assert text != MINIMAL  # the edit did change the profile
    path, error = refused(tmp_path, text)
    assert error.variable.startswith(str(path)), error.variable
    assert error.variable.endswith(spot), error.variable
    assert says in error.problem, error.problem
    assert str(path) in str(error) and spot in str(error)


def test_every_mistake_is_named_in_one_go(tmp_path: Path) -> None:
    text = (MINIMAL.replace('"app.clients"', '"clients"')
            .replace('key = ["client_id"]', 'key = ["client_id"]\nwhere = "x"')
            .replace('qty"', 'qty"\nsurcharge = "extra"') + '\n[invoice]\ntable = "app.i"\n')
    path, error = refused(tmp_path, text)
    assert sorted(where for where, _ in error.problems) == sorted(
        f"{path} {spot}" for spot in ("[invoice]", "[customer].where", "[customer].table",
                                      "[order_line].fields.surcharge"))
    assert str(error).splitlines() == [f"{w}: {p}" for w, p in error.problems]


def test_a_broken_section_is_not_reported_again_as_a_missing_reference(
        tmp_path: Path) -> None:
    text = MINIMAL.replace('quantity = "qty"', 'quantity = "qty"\n'
                           'product_name = { ref = "product", column = "sku_id" }')
    text += '\n[product]\ntable = "app.products"\nkey = []\n'
    path, error = refused(tmp_path, text)
    assert [where for where, _ in error.problems] == [f"{path} [product].key"]


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path, error = refused(tmp_path, MINIMAL + "\n[customer\n")
    assert error.variable == str(path) and "not valid TOML" in error.problem


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_profile(missing)
    assert info.value.variable == str(missing)


def test_every_canonical_field_of_every_entity_can_be_mapped(tmp_path: Path) -> None:
    sections = []
    for entity in ("customer", "order", "order_line", "market_demand", "product"):
        extra = {"order": 'customer = "c"\n', "order_line": 'order = "o"\n'}.get(entity, "")
        key = '["o", "n"]' if entity == "order_line" else '["k"]'
        fields = "\n".join(f'{name} = "col_{name}"' for name in CANONICAL_FIELDS[entity])
        sections.append(f'[{entity}]\ntable = "s.{entity}"\nkey = {key}\n{extra}'
                        f"[{entity}.fields]\n{fields}\n")
    profile = load_profile(write(tmp_path, "\n".join(sections)))
    for name, ent in profile.entities.items():
        assert ent.missing() == []
        assert set(ent.fields) == set(CANONICAL_FIELDS[name])


# ---- keys as text ----------------------------------------------------------------------------

def _mapping(*key: str) -> EntityMapping:
    return EntityMapping("order_line", "s.t", key, {})


@pytest.mark.parametrize(("key", "row", "text"), [
    (("id",), {"id": 42}, "42"),
    (("id",), {"id": "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a"},
     "0b6e9f5c-8c1e-4e8a-9a3b-1f2e3d4c5b6a"),
    (("id",), {"id": "客户-张三"}, "客户-张三"),
    (("order_id", "line_no"), {"order_id": 9001, "line_no": 1}, '["9001","1"]'),
    (("region", "code"), {"region": "北京", "code": "A,\"1\""}, '["北京","A,\\"1\\""]'),
    (("flag", "n"), {"flag": True, "n": -7}, '["true","-7"]'),
])
def test_key_text_and_key_values_round_trip(key: tuple[str, ...], row: dict[str, Any],
                                            text: str) -> None:
    ent = _mapping(*key)
    assert ent.key_text(row) == text
    assert key_values(ent, text) == [str(row[c]).lower() if isinstance(row[c], bool)
                                     else str(row[c]) for c in key]
    assert key_text(key_values(ent, text)) == text  # the text round-trips unchanged


def test_composite_key_text_is_compact_json_and_keeps_non_ascii() -> None:
    text = _mapping("a", "b").key_text({"a": "张三", "b": 5})
    assert text == '["张三","5"]'
    assert " " not in text and "\\u" not in text
    assert json.loads(text) == ["张三", "5"]


def test_key_text_of_a_missing_key_column_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        _mapping("a", "b").key_text({"a": 1})


@pytest.mark.parametrize("text", ['["9001"]', '["9001","1","2"]', '[9001, 1]', '{"a": 1}',
                                  "not json"])
def test_malformed_composite_key_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        key_values(_mapping("order_id", "line_no"), text)


def test_single_column_key_text_is_taken_as_it_is() -> None:
    assert key_values(_mapping("id"), '["not","json array"]') == ['["not","json array"]']


def test_delete_flag_matches_only_its_value() -> None:
    flag = DeleteFlag("is_active", False)
    assert flag.matches({"is_active": False})
    assert not flag.matches({"is_active": True})
    assert not flag.matches({"is_active": None})
    assert not flag.matches({})


@pytest.mark.parametrize("values", [
    ["9001", "1"], ["A1", "b2", "C3"], ["", "1"], ["1 2", "3"], ["x\"y", "1"], ["a\\b", "c"],
    ["tab\there", "1"], ["²", "1"], ["北京", "1"], ["-7", "1.5"], ["\u2028", "z"],
])
def test_composite_key_text_is_always_what_json_dumps_writes(values: list[str]) -> None:
    # the plain-text fast path and json.dumps must never disagree: the text is the key
    assert key_text(values) == json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(key_text(values)) == values


def test_a_bad_default_row_filter_is_named_once_where_it_was_written(tmp_path: Path) -> None:
    """newcomer9 nit: `[source] row_filter = 5` was reported as `[customer].row_filter` and
    `[order].row_filter`, keys the user never wrote."""
    text = MINIMAL.replace('name = "mini"', 'name = "mini"\nrow_filter = 5')
    path, error = refused(tmp_path, text)
    assert [where for where, _ in error.problems] == [f"{path} [source].row_filter"]
    assert "SQL boolean expression" in error.problems[0][1]
