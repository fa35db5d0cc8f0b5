"""The mappings file: the shipped one is valid and complete, broken ones name file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.erp.mappings import DEFAULT_PATH, STOCK_EFFECTS, Mappings, normalise_word
from service.errors import ConfigError

DEMO_PRODUCTS = ["P-PHONE-5G", "P-PHONE-STD", "P-LAPTOP", "P-TABLET", "P-EARBUDS", "P-WATCH",
                 "P-TV-55", "P-ROUTER", "P-CAMERA", "P-SPEAKER"]


@pytest.fixture(scope="module")
def shipped() -> Mappings:
    return Mappings.load(DEFAULT_PATH)


def broken(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "mappings.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Mappings.load(path)
    assert str(path) in info.value.variable
    return info.value


# --- the shipped file --------------------------------------------------------------------

def test_settings_default_points_at_the_shipped_file() -> None:
    from service.settings import Settings

    assert Path(Settings.mappings_file) == DEFAULT_PATH


def test_order_statuses_of_the_crm(shipped: Mappings) -> None:
    assert {w: Mappings.lookup(shipped.order_status, w)
            for w in ["待付款", "已付款", "已发货", "已完成", "已取消"]} == {
        "待付款": "PENDING_PAYMENT", "已付款": "PAID", "已发货": "SHIPPED",
        "已完成": "COMPLETED", "已取消": "CANCELLED"}


def test_stock_effects_cover_exactly_the_erp_statuses(shipped: Mappings) -> None:
    assert set(shipped.status_stock_effect) == set(shipped.order_status.values())
    assert set(shipped.status_stock_effect.values()) <= STOCK_EFFECTS
    assert shipped.status_stock_effect == {"PENDING_PAYMENT": "none", "PAID": "reserve",
                                           "SHIPPED": "issue", "COMPLETED": "issue",
                                           "CANCELLED": "none"}


def test_demo_products_have_distinct_skus(shipped: Mappings) -> None:
    skus = [Mappings.lookup(shipped.products, code) for code in DEMO_PRODUCTS]
    assert None not in skus
    assert len(set(skus)) == len(skus)
    assert Mappings.lookup(shipped.products, "P-PHONE-5G") == "SKU-100001"
    # the demo data's deliberately unmapped product must stay unmapped
    assert Mappings.lookup(shipped.products, "P-HOVERBOARD") is None


def test_the_other_tables(shipped: Mappings) -> None:
    assert Mappings.lookup(shipped.gender, "男") == "M"
    assert Mappings.lookup(shipped.gender, "女") == "F"
    assert Mappings.lookup(shipped.gender, "未知") == "U"
    assert Mappings.lookup(shipped.units, "台") == "UNIT"
    assert Mappings.lookup(shipped.units, "kg") == "KGM"
    assert Mappings.lookup(shipped.currencies, "元") == "CNY"
    assert Mappings.lookup(shipped.currencies, "美元") == "USD"
    assert Mappings.lookup(shipped.demand_kind, "竞争对手分析") == "COMPETITOR"


@pytest.mark.parametrize("word", ["KG", " kg ", "ｋｇ", "Kg"])
def test_words_match_ignoring_case_spaces_and_width(shipped: Mappings, word: str) -> None:
    assert Mappings.lookup(shipped.units, word) == "KGM"


def test_normalise_word() -> None:
    assert normalise_word("  Hello\u3000 World ") == "hello world"
    assert normalise_word("ＲＭＢ") == "rmb"


def test_none_reads_as_the_empty_word(shipped: Mappings) -> None:
    assert Mappings.lookup(shipped.gender, None) == "U"
    assert Mappings.lookup(shipped.order_status, None) is None


def test_mappings_are_read_only(shipped: Mappings) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        shipped.units = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        shipped.units["吨"] = "TNE"  # type: ignore[index]


# --- broken files name the file and the key ----------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.toml")
    assert "cannot read" in err.problem


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'PAID = "reserve"', 'PAID = "reserve'))
    assert "not valid TOML" in err.problem
    assert "line" in err.problem


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, '"个" = "PCE"', '"个" = "PCE"\n"个" = "EA"'))
    assert "not valid TOML" in err.problem


def test_unknown_stock_effect(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'PAID = "reserve"', 'PAID = "reserved"'))
    assert err.variable.endswith("status_stock_effect.PAID")
    assert "reserve" in err.problem and "release" in err.problem


def test_status_without_stock_effect(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, '"已取消" = "CANCELLED"',
                            '"已取消" = "CANCELLED"\n"已退款" = "REFUNDED"'))
    assert err.variable.endswith("status_stock_effect.REFUNDED")
    assert "missing" in err.problem


def test_stock_effect_for_a_status_nobody_produces(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'CANCELLED = "none"',
                            'CANCELLED = "none"\nCANCELED = "release"'))
    assert err.variable.endswith("status_stock_effect.CANCELED")
    assert "typo" in err.problem


def test_lower_case_erp_code_names_the_quoted_key(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, '"箱" = "BOX"', '"箱" = "box"'))
    assert err.variable.endswith('units."箱"')
    assert "UPPER_CASE" in err.problem


def test_currency_must_be_iso_4217(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, '"美元" = "USD"', '"美元" = "US$"'))
    assert err.variable.endswith('currencies."美元"')
    assert "ISO 4217" in err.problem


def test_value_must_be_a_string(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'P-LAPTOP = "SKU-100003"', "P-LAPTOP = 100003"))
    assert err.variable.endswith("products.P-LAPTOP")
    assert "int" in err.problem


def test_words_equal_after_normalisation_must_agree(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'kg = "KGM"', 'kg = "KGM"\nKG = "KG"'))
    assert err.variable.endswith("units.KG")
    assert "different ERP code" in err.problem


def test_missing_section(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, "[demand_kind]", "[demand_kinds]"))
    assert err.variable.endswith("[demand_kinds]")
    assert "unknown section" in err.problem


def test_section_absent(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    path.write_text(text[:text.index("[demand_kind]")], encoding="utf-8")
    err = load_error(path)
    assert err.variable.endswith("[demand_kind]")
    assert "missing" in err.problem


def test_empty_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Mappings.from_dict({**_as_dict(), "units": {}}, source="x.toml")
    assert info.value.variable == "x.toml: [units]"
    assert "empty" in info.value.problem


def test_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        Mappings.from_dict({**_as_dict(), "units": "台=UNIT"}, source="x.toml")
    assert info.value.variable == "x.toml: [units]"


def test_config_error_message_names_file_and_key(tmp_path: Path) -> None:
    path = broken(tmp_path, 'SHIPPED = "issue"', 'SHIPPED = "ship"')
    with pytest.raises(ConfigError, match=r"mappings\.toml: status_stock_effect\.SHIPPED: "
                                          r"must be one of"):
        Mappings.load(path)


def _as_dict() -> dict[str, dict[str, str]]:
    import tomllib

    with open(DEFAULT_PATH, "rb") as fh:
        return tomllib.load(fh)


# --- [unit_kind] and [phone] -------------------------------------------------------------

def test_shipped_unit_kinds(shipped: Mappings) -> None:
    assert set(shipped.unit_kind) == set(shipped.units.values())
    assert {u for u, k in shipped.unit_kind.items() if k == "countable"} == {
        "UNIT", "PCE", "BOX", "SET"}


def test_unknown_unit_kind(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'KGM = "measured"', 'KGM = "weighed"'))
    assert "unit_kind.KGM" in err.variable and "countable, measured" in err.problem


def test_unit_without_kind(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'MTR = "measured"\n', ""))
    assert "unit_kind.MTR" in err.variable and "missing" in err.problem


def test_shipped_phone_settings(shipped: Mappings) -> None:
    assert shipped.phone_region == "CN"
    assert {"无", "-", "暂无"} <= shipped.no_number


def test_phone_region_must_be_iso_3166(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'default_region = "CN"', 'default_region = "China"'))
    assert "phone.default_region" in err.variable and "ISO 3166" in err.problem


def test_phone_section_unknown_key(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'default_region = "CN"', 'region = "CN"'))
    assert "phone.region" in err.variable


def test_every_mistake_is_named_in_one_go(tmp_path: Path) -> None:
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    for old, new in [('SHIPPED = "issue"', 'SHIPPED = "ship it"'),
                     ('"人民币" = "CNY"', '"人民币" = "yuan"'),
                     ('default_region = "CN"', 'default_region = "China"')]:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "mappings.toml"
    path.write_text(text, encoding="utf-8")
    err = load_error(path)
    assert {where for where, _ in err.problems} == {
        f"{path}: status_stock_effect.SHIPPED", f'{path}: currencies."人民币"',
        f"{path}: phone.default_region"}
    assert str(err).splitlines() == [f"{where}: {problem}" for where, problem in err.problems]
    assert (err.variable, err.problem) == err.problems[0]


def test_a_broken_section_is_not_reported_again_as_its_consequences(tmp_path: Path) -> None:
    # [units] without its UNIT line: [unit_kind], [measures] and [sku_units] name UNIT too,
    # but only the broken line itself is a mistake
    err = load_error(broken(tmp_path, '"台" = "UNIT"', '"台" = "unit"'))
    assert [where for where, _ in err.problems] == [f'{tmp_path / "mappings.toml"}: units."台"']


def test_default_currency_is_cny_unless_configured(tmp_path: Path, shipped: Mappings) -> None:
    assert shipped.default_currency == "CNY"
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    start = text.index("[money]")
    end = text.index("\n[", start)
    without = tmp_path / "without.toml"
    without.write_text(text[:start] + text[end + 1:], encoding="utf-8")
    assert Mappings.load(without).default_currency == "CNY"  # a file from before [money]
    usd = Mappings.load(broken(tmp_path, 'default_currency = "CNY"', 'default_currency = "USD"'))
    assert usd.default_currency == "USD"


@pytest.mark.parametrize(("value", "problem"), [
    ('"yuan"', "three-letter ISO 4217 code"),
    ("156", "three-letter ISO 4217 code"),
    ('"CYN"', "CYN is not an ISO code produced by [currencies]"),
])
def test_default_currency_is_checked_naming_file_and_key(tmp_path: Path, value: str,
                                                         problem: str) -> None:
    path = broken(tmp_path, 'default_currency = "CNY"', f"default_currency = {value}")
    err = load_error(path)
    assert err.variable == f"{path}: money.default_currency"
    assert problem in err.problem


def test_money_section_unknown_key(tmp_path: Path) -> None:
    err = load_error(broken(tmp_path, 'default_currency = "CNY"', 'currency = "CNY"'))
    assert "money.currency" in err.variable and "default_currency" in err.problem
