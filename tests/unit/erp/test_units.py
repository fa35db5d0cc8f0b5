"""Quantities in each SKU's base unit: declared per-SKU factors, pint for measures, and the
errors that keep different units from ever being added up."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.erp import units
from service.erp.changes import order_change
from service.erp.mappings import DEFAULT_PATH, Mappings
from service.errors import ConfigError, MappingError

D = Decimal


@pytest.fixture(scope="module")
def m() -> Mappings:
    return Mappings.load(DEFAULT_PATH)


@pytest.mark.parametrize(("sku", "qty", "unit", "base"), [
    ("SKU-100011", "2", "BOX", "24"),          # 1 箱 = 12 PCE for chargers
    ("SKU-100011", "5", "PCE", "5"),
    ("SKU-100012", "2", "BOX", "40"),          # the same word, another SKU, another factor
    ("SKU-100011", "0.5", "BOX", "6"),
    ("SKU-100013", "2.5", "TNE", "2500"),      # pint: tonnes -> kilograms
    ("SKU-100013", "1", "GRM", "0.001"),
    ("SKU-100013", "1.5", "KGM", "1.5"),
    ("SKU-100009", "3", "SET", "3"),           # a camera kit is one camera
])
def test_to_base(m: Mappings, sku: str, qty: str, unit: str, base: str) -> None:
    assert units.to_base(sku, D(qty), unit, m) == D(base)


def test_the_factor_of_a_measure_is_exact(m: Mappings) -> None:
    assert m.sku_units["SKU-100013"].factors["TNE"] == 1000
    assert m.sku_units["SKU-100013"].factors["GRM"] == D("0.001")
    assert m.sku_units["SKU-100013"].base == "KGM"


@pytest.mark.parametrize(("sku", "qty", "unit", "reason"), [
    # a counted base unit and a measure: nobody declared how many pieces a kilogram is
    ("SKU-100011", "3", "KGM", "KGM cannot be converted to PCE, the base unit of SKU-100011"),
    ("SKU-100013", "3", "PCE", "PCE cannot be converted to KGM, the base unit of SKU-100013"),
    # a box of laptops has no declared size
    ("SKU-100003", "1", "BOX", "BOX cannot be converted to UNIT, the base unit of SKU-100003"),
    ("SKU-100011", "0.1", "BOX", "1.2 PCE of SKU-100011: not a whole number"),
    ("SKU-100013", "0.4", "GRM", "0.0004 KGM, finer than the ERP's 0.001 KGM"),
    ("SKU-999999", "1", "PCE", "SKU-999999 has no base unit"),
])
def test_unconvertible_names_both_units(m: Mappings, sku: str, qty: str, unit: str,
                                        reason: str) -> None:
    with pytest.raises(MappingError) as info:
        units.to_base(sku, D(qty), unit, m, raw=f"{qty}{unit}")
    assert info.value.field == "quantity"
    assert reason in info.value.reason


def test_declare_a_measure_for_a_counted_sku_and_pint_does_the_rest() -> None:
    table = units.sku_units("PCE", {"KGM": D(8)}, {"KGM": "kilogram", "TNE": "metric_ton",
                                                   "MTR": "meter"})
    assert table.factors["KGM"] == 8
    assert table.factors["TNE"] == 8000          # through the declared kilogram
    assert "MTR" not in table.factors            # a length is not a mass


def test_measures_of_different_kinds_do_not_convert() -> None:
    table = units.sku_units("KGM", {}, {"KGM": "kilogram", "LTR": "liter"})
    assert "LTR" not in table.factors


def test_a_declared_factor_may_not_contradict_pint() -> None:
    with pytest.raises(units.UnitProblem, match="pint converts them"):
        units.sku_units("KGM", {"TNE": D(900)}, {"KGM": "kilogram", "TNE": "metric_ton"})


@pytest.mark.parametrize(("value", "expected"), [(12, D(12)), ("0.5", D("0.5")),
                                                 (0.1, D("0.1"))])
def test_decimal_factor(value: Any, expected: Decimal) -> None:
    assert units.decimal_factor(value) == expected


@pytest.mark.parametrize("value", [0, -1, "x", True, "NaN", [1]])
def test_bad_factor(value: Any) -> None:
    with pytest.raises(units.UnitProblem):
        units.decimal_factor(value)


@pytest.mark.parametrize(("name", "problem"), [("degC", "offset"), ("percent", "dimensionless"),
                                               ("furlongs_per_fortnightx", "does not know")])
def test_measure_unit_refuses(name: str, problem: str) -> None:
    with pytest.raises(units.UnitProblem, match=problem):
        units.measure_unit(name)


# --- the mappings file's sections ----------------------------------------------------------

def broken(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "mappings.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize(("old", "new", "where", "problem"), [
    ('SKU-100013 = { base = "KGM" }\n', "", "sku_units.SKU-100013", "needs a base unit"),
    ('SKU-100013 = { base = "KGM" }', 'SKU-100013 = { base = "KG" }',
     "sku_units.SKU-100013.base", "not an ERP unit code"),
    ('SKU-100011 = { base = "PCE", BOX = 12 }', 'SKU-100011 = { base = "PCE", CASE = 12 }',
     "sku_units.SKU-100011.CASE", "not an ERP unit code"),
    ('SKU-100011 = { base = "PCE", BOX = 12 }', 'SKU-100011 = { base = "PCE", BOX = 0 }',
     "sku_units.SKU-100011.BOX", "positive"),
    ('SKU-100011 = { base = "PCE", BOX = 12 }', 'SKU-100011 = { base = "PCE", PCE = 2 }',
     "sku_units.SKU-100011", "1 by definition"),
    ('SKU-100013 = { base = "KGM" }', 'SKU-100013 = { base = "KGM", TNE = 999 }',
     "sku_units.SKU-100013", "pint converts them"),
    ('SKU-100013 = { base = "KGM" }', 'SKU-100013 = { base = "KGM" }\nSKU-1 = { base = "PCE" }',
     "sku_units.SKU-1", "not an ERP SKU"),
    ('TNE = "metric_ton"', 'TNE = "metric_tonne_x"', "measures.TNE", "does not know"),
    ('GRM = "gram"', 'GRM = "gram"\nBOX = "percent"', "measures.BOX", "dimensionless"),
    ('GRM = "gram"', 'GRM = "gram"\nLBR = "pound"', "measures.LBR", "not an ERP unit code"),
])
def test_broken_unit_sections_name_the_key(tmp_path: Path, old: str, new: str, where: str,
                                           problem: str) -> None:
    path = broken(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        Mappings.load(path)
    assert info.value.variable.endswith(where), info.value.variable
    assert problem in info.value.problem


def test_every_mistake_in_one_sku_entry_is_named_at_once(tmp_path: Path) -> None:
    """newcomer9 nit: `{ base = "UNIT", PCE = -1, SET = "one" }` named only PCE; SET came
    after fixing it. Every unit of every entry is checked on its own."""
    path = broken(tmp_path, 'SKU-100009 = { base = "UNIT", PCE = 1, SET = 1 }',
                  'SKU-100009 = { base = "UNIT", PCE = -1, SET = "one", CASE = 2 }')
    text = path.read_text(encoding="utf-8").replace(
        'SKU-100011 = { base = "PCE", BOX = 12 }', 'SKU-100011 = { base = "PCE", BOX = 0 }', 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Mappings.load(path)
    spots = [where.rsplit(" ", 1)[-1] for where, _ in info.value.problems]
    assert [s for s in spots if "sku_units" in s] == [
        "sku_units.SKU-100009.PCE", "sku_units.SKU-100009.SET",
        "sku_units.SKU-100009.CASE", "sku_units.SKU-100011.BOX"], info.value.problems


# --- an order event: each line as typed and in its SKU's base unit -------------------------

def _order(lines: list[tuple[int, str, str]]) -> dict[str, Any]:
    from tests.unit.erp.test_changes import header, line, order_event

    return order_event([{"op": "CREATE", "before": None,
                         "after": line(n, product_code=code, quantity=qty)}
                        for n, code, qty in lines], after=header())


def test_order_lines_carry_typed_and_base_quantities(m: Mappings) -> None:
    change = order_change(_order([(1, "P-CHARGER", "2箱"), (2, "P-CHARGER", "5个"),
                                  (3, "P-SOLDER", "0.5吨")]), m)
    assert [(i.quantity, i.unit_code, i.base_quantity, i.base_unit) for i in change.items] == [
        (D(2), "BOX", D(24), "PCE"), (D(5), "PCE", D(5), "PCE"),
        (D("0.5"), "TNE", D(500), "KGM")]


def test_an_unconvertible_line_fails_the_order_naming_both_units(m: Mappings) -> None:
    with pytest.raises(MappingError) as info:
        order_change(_order([(1, "P-CHARGER", "2箱"), (2, "P-CHARGER", "3kg")]), m)
    assert "KGM" in info.value.reason and "PCE" in info.value.reason


def test_every_unit_the_demo_crm_types_converts_for_its_sku(m: Mappings) -> None:
    from service.demo.generator import PRODUCTS
    from service.erp import transform as tf

    for product in PRODUCTS:
        sku = tf.sku_for(product.code, m)
        for word in product.units:
            qty = tf.parse_quantity(f"3{word}", m)
            assert units.to_base(sku, qty.value, qty.unit, m) == 3, (product.code, word)


def test_answers_are_kept_when_the_registry_is_released() -> None:
    measures = {"KGM": "kilogram", "TNE": "metric_ton", "GRM": "gram"}
    first = units.sku_units("PCE", {"KGM": D(8)}, measures)
    with pytest.raises(units.UnitProblem) as refused:
        units.check_measure("degC")
    units.release_registry()
    again = units.sku_units("PCE", {"KGM": D(8)}, measures)
    with pytest.raises(units.UnitProblem) as refused_again:
        units.check_measure("degC")
    assert again == first and again.factors["GRM"] == D("0.008")
    assert str(refused_again.value) == str(refused.value)
    assert units._registry.cache_info().currsize == 0  # answered without loading pint again
