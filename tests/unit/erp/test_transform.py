"""CRM values -> ERP vocabulary, starting from the brief's own examples."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest

from service.erp import transform as tf
from service.erp.mappings import Mappings
from service.erp.transform import Address, Money, Quantity
from service.errors import MappingError, Permanent


@pytest.fixture(scope="module")
def m() -> Mappings:
    return Mappings.load()


def fails(field: str, call: object, *args: object, reason: str = "",
          secret: str | None = None) -> MappingError:
    """Assert the call raises MappingError for ``field``; the message never shows ``secret``."""
    assert callable(call)
    with pytest.raises(MappingError) as info:
        call(*args)
    err = info.value
    assert err.field == field
    assert reason in err.reason
    assert str(err).startswith(f"{field}: ")
    if secret:
        assert secret not in str(err)
    assert isinstance(err, Permanent) and err.stage == "transform"
    return err


# --- the brief's examples ----------------------------------------------------------------

def test_brief_customer_example(m: Mappings) -> None:
    assert tf.full_name("张", "三", None, "eastern") == "张三"
    assert tf.gender_code("男", m) == "M"
    fails("phone", tf.parse_phones, "138xxxx5678", m, reason="masked", secret="5678")
    assert tf.parse_cn_address("北京市朝阳区XX路XX号") == Address("北京市", "北京市", "朝阳区",
                                                               "XX路XX号", "110105")
    assert tf.parse_money("1000元", None, m) == Money(Decimal("1000.00"), "CNY")


def test_brief_order_example(m: Mappings) -> None:
    assert tf.parse_quantity("10台", m) == Quantity(Decimal(10), "UNIT")
    assert tf.parse_money("5000元", None, m) == Money(Decimal("5000.00"), "CNY")
    assert tf.order_status("已发货", m) == "SHIPPED"
    assert m.status_stock_effect[tf.order_status("已发货", m)] == "issue"


def test_brief_market_demand_kinds(m: Mappings) -> None:
    assert [tf.demand_kind(k, m) for k in ["市场趋势", "客户需求反馈", "竞争对手分析"]] == [
        "MARKET_TREND", "CUSTOMER_FEEDBACK", "COMPETITOR"]


# --- names -------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "given", "middle", "order", "expected"), [
    ("张", "三", None, "eastern", "张三"),
    (" 欧阳 ", " 娜娜\u3000", "", "eastern", "欧阳娜娜"),
    ("Smith", "John", None, "western", "John Smith"),
    ("Kennedy", "John", "Fitzgerald", "western", "John Fitzgerald Kennedy"),
    ("Tolkien", "John", "Ronald  Reuel", "western", "John Ronald Reuel Tolkien"),
    ("  van  der Berg ", " Anna ", None, "Western", "Anna van der Berg"),
    ("Nguyen", "An", "Van", "eastern", "Nguyen Van An"),
    ("金", "智秀", None, "eastern", "金智秀"),
    ("김", "민준", None, "eastern", "김민준"),
    ("买买提", "阿依古丽·", None, "eastern", "阿依古丽·买买提"),
    ("", "阿依古丽·买买提", None, "eastern", "阿依古丽·买买提"),
    ("", "Ｊｏｈｎ Ｓｍｉｔｈ", None, "western", "John Smith"),
    ("张", "张三", None, "eastern", "张三"),
    ("", "买买提", None, "eastern", "买买提"),
])
def test_full_name(family: str, given: str, middle: str | None, order: str,
                   expected: str) -> None:
    assert tf.full_name(family, given, middle, order) == expected


def test_full_name_eastern_middle_goes_between_without_space() -> None:
    assert tf.full_name("司马", "光", "君", "eastern") == "司马君光"


@pytest.mark.parametrize(("family", "given"), [("", ""), ("  ", "\u3000"), (None, None)])
def test_full_name_needs_a_name(family: str | None, given: str | None) -> None:
    fails("family_name", tf.full_name, family, given, None, "eastern", reason="empty")


def test_full_name_unknown_order() -> None:
    fails("name_order", tf.full_name, "张", "三", None, "southern", reason="eastern or western")


# --- gender and age ----------------------------------------------------------------------

@pytest.mark.parametrize(("word", "code"), [
    ("男", "M"), ("女", "F"), ("未知", "U"), ("male", "M"), ("Female", "F"), ("M", "M"),
    ("f", "F"), (" 男 ", "M"), ("", "U"), (None, "U"),
])
def test_gender_code(m: Mappings, word: str | None, code: str) -> None:
    assert tf.gender_code(word, m) == code


def test_unknown_gender_word_is_not_echoed(m: Mappings) -> None:
    fails("gender", tf.gender_code, "中性人", m, reason="not a gender word", secret="中性人")


@pytest.mark.parametrize(("born", "on", "age"), [
    (date(1995, 6, 15), date(2023, 6, 14), 27),
    (date(1995, 6, 15), date(2023, 6, 15), 28),
    (date(1995, 6, 15), date(2023, 6, 16), 28),
    (date(1995, 12, 31), date(2024, 1, 1), 28),
    (date(2000, 2, 29), date(2001, 2, 28), 0),
    (date(2000, 2, 29), date(2001, 3, 1), 1),
    (date(2000, 2, 29), date(2004, 2, 28), 3),
    (date(2000, 2, 29), date(2004, 2, 29), 4),
    (date(2023, 1, 1), date(2023, 1, 1), 0),
])
def test_age_on(born: date, on: date, age: int) -> None:
    assert tf.age_on(born, on) == age


def test_age_on_accepts_a_datetime_reference() -> None:
    assert tf.age_on(date(1995, 6, 15), datetime(2023, 6, 15, 0, 0).date()) == 28


def test_age_unknown_birth_date() -> None:
    assert tf.age_on(None, date(2023, 1, 1)) is None


def test_age_birth_in_the_future() -> None:
    fails("birth_date", tf.age_on, date(2030, 1, 1), date(2023, 1, 1), reason="after")


def test_age_implausible() -> None:
    fails("birth_date", tf.age_on, date(1800, 1, 1), date(2023, 1, 1), reason="over 150")


# --- phone (the golden table, tests/data/format_golden.csv, holds the many cases) --------

def test_phone_none_and_no_number_words_give_none(m: Mappings) -> None:
    assert [tf.parse_phones(v, m) for v in (None, "", "  ", "无", "暂无", "-", "—")] == [
        None] * 7


def test_phone_extension_and_others(m: Mappings) -> None:
    assert tf.parse_phones("010-65521234转123", m) == tf.Phones("+861065521234", "123")
    assert tf.parse_phones("0891-6834567/8", m) == tf.Phones("+868916834567", None,
                                                              ("+868916834568",))


def test_phone_default_region_comes_from_the_mappings(m: Mappings) -> None:
    us = Mappings.from_dict({**_raw_mappings(), "phone": {"default_region": "US"}})
    assert tf.parse_phones("(415) 555-2671", us) == tf.Phones("+14155552671", None)
    cn = tf.parse_phones("(415) 555-2671", m)
    assert cn is None or cn.primary != "+14155552671"


def _raw_mappings() -> dict[str, object]:
    import tomllib

    from service.erp.mappings import DEFAULT_PATH
    with open(DEFAULT_PATH, "rb") as fh:
        return tomllib.load(fh)


def test_phone_field_name_can_be_given(m: Mappings) -> None:
    with pytest.raises(MappingError) as info:
        tf.parse_phones("nope", m, field="mobile")
    assert info.value.field == "mobile"


@pytest.mark.parametrize(("raw", "expected"), [
    ("13812345678", tf.Phones("+8613812345678", None)),
    (" 138 1234 5678 ", tf.Phones("+8613812345678", None)),
    ("138-1234-5678", tf.Phones("+8613812345678", None)),
    ("+86 138 1234 5678", tf.Phones("+8613812345678", None)),
    ("１３８１２３４５６７８", tf.Phones("+8613812345678", None)),  # full-width digits
    ("0755-12345678-8001", tf.Phones("+8675512345678", "8001")),  # trailing extension
    ("+44 20 7946 0958", tf.Phones("+442079460958", None)),
])
def test_a_number_typed_plainly_is_read_as_with_the_clean_up(m: Mappings, raw: str,
                                                             expected: tf.Phones) -> None:
    assert tf.parse_phones(raw, m) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("1381234567", "invalid phone number"),   # one digit short: still validated
    ("+ -", "contains no phone number"),       # no digit: the clean-up path refuses it
])
def test_a_plainly_typed_non_number_is_still_refused(m: Mappings, raw: str, reason: str
                                                    ) -> None:
    fails("phone", tf.parse_phones, raw, m, reason=reason)


def test_every_division_is_found_by_its_full_path() -> None:
    """The parser's per-first-character buckets hold every province, city and district."""
    from service.erp.divisions import divisions

    table = divisions()
    for d in table.all:
        found, _ = table.parse(d.path + "中山路1号")
        assert d.path in {m.division.path for m in found}, d


# --- e-mail ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("zhangsan@example.com", "zhangsan@example.com"),
    ("  ZhangSan@Example.COM ", "zhangsan@example.com"),
    ("zhang.san+crm@mail.example.com.cn", "zhang.san+crm@mail.example.com.cn"),
    ("zhangsan＠example．com", "zhangsan@example.com"),
    ("user@xn--fiqs8s.cn", "user@xn--fiqs8s.cn"),
    ("用户@例子.中国", "用户@例子.中国"),
    (None, None),
    ("", None),
    ("   ", None),
])
def test_normalise_email(raw: str | None, expected: str | None) -> None:
    assert tf.normalise_email(raw) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("zhang san@example.com", "spaces"),
    ("zhangsan@exa mple.com", "spaces"),
    ("zhangsan.example.com", "exactly one @"),
    ("zhang@san@example.com", "exactly one @"),
    ("@example.com", "nothing before"),
    (".zhangsan@example.com", "dot"),
    ("zhang..san@example.com", "dot"),
    ("zhangsan@localhost", "no dot"),
    ("zhangsan@example..com", "not a valid domain"),
    ("zhangsan@example,com.cn", "not a valid domain"),
    ("zhangsan@-example.com", "not a valid domain"),
    ("zhangsan@example.c", "too short"),
    ("a" * 65 + "@example.com", "too long"),
])
def test_normalise_email_rejected(raw: str, reason: str) -> None:
    fails("email", tf.normalise_email, raw, reason=reason, secret=raw.split("@")[0] or None)


# --- addresses (the golden table holds the many cases) ----------------------------------

def test_address_names_the_candidates_when_ambiguous() -> None:
    err = fails("address", tf.parse_cn_address, "朝阳区建国路88号", reason="ambiguous",
                secret="建国路")
    assert "110105" in err.reason and "220104" in err.reason


def test_address_road_named_after_a_place_is_not_a_place() -> None:
    fails("address", tf.parse_cn_address, "北京东路100号", reason="no Chinese province",
          secret="100")


def test_address_road_named_after_a_place_says_why_the_place_was_not_read() -> None:
    err = fails("address", tf.parse_cn_address, "北京东路100号", secret="100")
    assert "an abbreviation (北京 for 北京市) is read only when" in err.reason
    err = fails("address", tf.parse_cn_address, "襄樊市人民路1号", secret="人民路")
    assert "NBS 2023" in err.reason  # the former name is not in the list: said, not implied


@pytest.mark.parametrize(("raw", "expected"), [
    # province-level abbreviations alone, as most CRM users type them (N8)
    ("北京", Address("北京市", "北京市", None, None, "110000")),
    ("上海", Address("上海市", "上海市", None, None, "310000")),
    ("广东", Address("广东省", None, None, None, "440000")),
    ("浙江", Address("浙江省", None, None, None, "330000")),
    ("新疆", Address("新疆维吾尔自治区", None, None, None, "650000")),
    ("内蒙古", Address("内蒙古自治区", None, None, None, "150000")),
    ("广西", Address("广西壮族自治区", None, None, None, "450000")),
    ("宁夏", Address("宁夏回族自治区", None, None, None, "640000")),
    ("西藏", Address("西藏自治区", None, None, None, "540000")),
    ("海南", Address("海南省", None, None, None, "460000")),
    ("香港", Address("香港特别行政区", "香港特别行政区", None, None, "810000")),
    ("澳门", Address("澳门特别行政区", "澳门特别行政区", None, None, "820000")),
    ("台湾", Address("台湾省", None, None, None, "710000")),
    ("北京 建国路88号", Address("北京市", "北京市", None, "建国路88号", "110000")),
    ("北京，建国路88号", Address("北京市", "北京市", None, "建国路88号", "110000")),
    # and a city's abbreviation: alone, under its province's, over its district
    ("深圳", Address("广东省", "深圳市", None, None, "440300")),
    ("广东深圳", Address("广东省", "深圳市", None, None, "440300")),
    ("浙江杭州", Address("浙江省", "杭州市", None, None, "330100")),
    ("新疆乌鲁木齐", Address("新疆维吾尔自治区", "乌鲁木齐市", None, None, "650100")),
    ("吉林吉林", Address("吉林省", "吉林市", None, None, "220200")),
    ("广东 深圳 南山区", Address("广东省", "深圳市", "南山区", None, "440305")),
    # a district's abbreviation where nothing but a separator or the end follows it
    ("北京朝阳", Address("北京市", "北京市", "朝阳区", None, "110105")),
    ("北京市朝阳", Address("北京市", "北京市", "朝阳区", None, "110105")),
    ("上海浦东", Address("上海市", "上海市", "浦东新区", None, "310115")),
    ("上海浦东 张江路1号", Address("上海市", "上海市", "浦东新区", "张江路1号", "310115")),
    ("江苏苏州昆山", Address("江苏省", "苏州市", "昆山市", None, "320583")),
    # the brief's example and street names that start like a place stay streets
    ("北京市朝阳区", Address("北京市", "北京市", "朝阳区", None, "110105")),
    ("北京市朝阳路1号", Address("北京市", "北京市", None, "朝阳路1号", "110000")),
    ("广东省深圳市中山大道1号", Address("广东省", "深圳市", None, "中山大道1号", "440300")),
    ("上海市人民路100号", Address("上海市", "上海市", None, "人民路100号", "310000")),
    ("上海市城区路", Address("上海市", "上海市", None, "城区路", "310000")),
])
def test_address_abbreviations_map_to_the_full_names_code(raw: str, expected: Address) -> None:
    assert tf.parse_cn_address(raw) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("上海市朝阳区", "朝阳区 is not a district of 上海市 (it is in 北京市, 吉林省长春市)"),
    ("上海市朝阳区建国路88号", "朝阳区 is not a district of 上海市"),
    ("上海市朝阳", "朝阳 (朝阳区) is not a district of 上海市"),
    ("广东省深圳市朝阳区", "朝阳区 is not a district of 广东省深圳市"),
    ("北京市滑县", "滑县 is not a district of 北京市 (it is in 河南省安阳市)"),
    ("广东省杭州市西湖区", "杭州市 is not a city of 广东省 (it is in 浙江省)"),
    ("上海市 杭州", "杭州 (杭州市) is not a city of 上海市"),
])
def test_address_district_not_of_the_place_written_is_refused_not_kept_as_street(
        raw: str, reason: str) -> None:
    fails("address", tf.parse_cn_address, raw, reason=reason, secret="建国路")


@pytest.mark.parametrize(("raw", "candidates"), [
    ("吉林", ["220000", "220200"]),                      # the province and the city
    ("朝阳", ["110105", "220104", "211300"]),            # a city and two districts
])
def test_address_abbreviation_several_places_share_is_ambiguous(
        raw: str, candidates: list[str]) -> None:
    err = fails("address", tf.parse_cn_address, raw, reason="ambiguous")
    assert all(code in err.reason for code in candidates)


@pytest.mark.parametrize(("raw", "street"), [
    ("北京建国路88号", "建国路"), ("上海浦东张江路1号", "张江路"), ("南京路100号", "100"),
    ("江苏苏州工业园区星湖街", "星湖街"),
])
def test_address_abbreviation_run_into_the_street_is_refused_with_a_true_reason(
        raw: str, street: str) -> None:
    short = raw[:2]
    err = fails("address", tf.parse_cn_address, raw, secret=street)
    assert f"an abbreviation ({short} for {short}" in err.reason
    assert "confirms it or a space, a comma or nothing follows it" in err.reason


# --- money -------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "word", "expected"), [
    ("5000元", None, Money(Decimal("5000.00"), "CNY")),
    ("5000 元", "元", Money(Decimal("5000.00"), "CNY")),
    ("5,000.00", "元", Money(Decimal("5000.00"), "CNY")),
    ("1,234,567.5", "人民币", Money(Decimal("1234567.50"), "CNY")),
    ("¥5000", None, Money(Decimal("5000.00"), "CNY")),
    ("￥5,000.00", None, Money(Decimal("5000.00"), "CNY")),
    ("５０００元", None, Money(Decimal("5000.00"), "CNY")),
    ("USD 99.90", None, Money(Decimal("99.90"), "USD")),
    ("99.9美元", "USD", Money(Decimal("99.90"), "USD")),
    ("0", "RMB", Money(Decimal("0.00"), "CNY")),
    (Decimal("5000"), "元", Money(Decimal("5000.00"), "CNY")),
    (Decimal("5000.000"), "元", Money(Decimal("5000.00"), "CNY")),
    (5000, "CNY", Money(Decimal("5000.00"), "CNY")),
])
def test_parse_money(m: Mappings, value: str | Decimal | int, word: str | None,
                     expected: Money) -> None:
    money = tf.parse_money(value, word, m)
    assert money == expected
    assert str(money.amount) == str(expected.amount)  # exactly two places, not just equal


@pytest.mark.parametrize(("value", "word", "field", "reason"), [
    ("-5000元", None, "amount", "negative"),
    (Decimal("-0.01"), "元", "amount", "negative"),
    ("5000.001元", None, "amount", "more than two decimal places"),
    (Decimal("0.001"), "元", "amount", "more than two decimal places"),
    ("5,00", "元", "amount", "not an amount"),
    ("50,00.00", "元", "amount", "not an amount"),
    ("5.000.00", "元", "amount", "not an amount"),
    ("五千元", None, "amount", "not an amount"),
    ("", "元", "amount", "not an amount"),
    ("5000", None, "amount", "no currency"),
    (Decimal("5000"), None, "amount", "no currency"),
    # the word is part of the amount: the amount's field is what to fix
    ("5000日元", None, "amount", "unknown currency 日元 written with the amount"),
    ("€5000", "元", "amount", "unknown currency € written with the amount"),
    ("5000", "日元", "currency", "unknown currency 日元"),
    ("5000美元", "元", "amount", "(USD) differs from the currency field (CNY)"),
    ("¥5000元", None, "amount", "both before and after"),
    (Decimal("NaN"), "元", "amount", "not a finite number"),
    (Decimal("Infinity"), "元", "amount", "not a finite number"),
    (Decimal("1000000000000"), "元", "amount", "too large"),
])
def test_parse_money_rejected(m: Mappings, value: str | Decimal, word: str | None, field: str,
                              reason: str) -> None:
    fails(field, tf.parse_money, value, word, m, reason=reason)


def test_parse_money_takes_the_default_only_when_nothing_names_a_currency(m: Mappings) -> None:
    assert tf.parse_money("5000", None, m, default_currency="USD") == Money(
        Decimal("5000.00"), "USD")
    # written or given, the currency wins over the default
    assert tf.parse_money("5000元", None, m, default_currency="USD").currency == "CNY"
    assert tf.parse_money("5000", "人民币", m, default_currency="USD").currency == "CNY"
    with pytest.raises(MappingError) as info:
        tf.parse_money("5000美元", "元", m, field="purchase_amount", default_currency="USD")
    assert info.value.field == "purchase_amount"
    assert "(USD) differs from the currency field (CNY)" in str(info.value)


@pytest.mark.parametrize(("value", "word", "expected"), [
    ("5000元", None, (Decimal("5000.00"), "CNY")),
    ("5000", None, (Decimal("5000.00"), None)),   # the caller knows the currency otherwise
    ("5000.00", "元", (Decimal("5000.00"), "CNY")),
    ("¥ 5,000", "CNY", (Decimal("5000.00"), "CNY")),
])
def test_parse_amount_gives_the_currency_when_one_is_known(
        m: Mappings, value: str, word: str | None, expected: tuple[Decimal, str | None]) -> None:
    assert tf.parse_amount(value, word, m, field="lines.unit_price") == expected


def test_parse_money_refuses_floats(m: Mappings) -> None:
    fails("amount", tf.parse_money, 5000.0, "元", m, reason="floating-point")
    fails("amount", tf.parse_money, True, "元", m, reason="text or Decimal")


def test_parse_money_does_not_echo_the_amount(m: Mappings) -> None:
    fails("amount", tf.parse_money, "-98765元", None, m, secret="98765")


# --- quantities --------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("10台", Quantity(Decimal(10), "UNIT")),
    ("2.5kg", Quantity(Decimal("2.5"), "KGM")),
    (" 3 箱 ", Quantity(Decimal(3), "BOX")),
    ("1个", Quantity(Decimal(1), "PCE")),
    ("4件", Quantity(Decimal(4), "PCE")),
    ("2套", Quantity(Decimal(2), "SET")),
    ("0.125 KG", Quantity(Decimal("0.125"), "KGM")),
    ("1,000台", Quantity(Decimal(1000), "UNIT")),
    ("１０台", Quantity(Decimal(10), "UNIT")),
    ("3公斤", Quantity(Decimal(3), "KGM")),
])
def test_parse_quantity(m: Mappings, raw: str, expected: Quantity) -> None:
    assert tf.parse_quantity(raw, m) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("10桶", "unknown unit 桶"),
    ("10.5台", "whole units"),
    ("0台", "greater than zero"),
    ("-3箱", "greater than zero"),
    ("0.0kg", "greater than zero"),
    ("1.2345kg", "more than three decimal places"),
    ("10", "no unit"),
    ("台", "does not start with a number"),
    ("", "does not start with a number"),
    ("1.2.3台", "not a valid number"),
    ("100000000000台", "too large"),
])
def test_parse_quantity_rejected(m: Mappings, raw: str, reason: str) -> None:
    fails("quantity", tf.parse_quantity, raw, m, reason=reason)


def test_unknown_unit_reason_is_shortened(m: Mappings) -> None:
    err = fails("quantity", tf.parse_quantity, "1" + "很长的单位" * 20, m, reason="unknown unit")
    assert len(err.reason) < 60 and err.reason.endswith("…")


# --- vocabulary look-ups -----------------------------------------------------------------

@pytest.mark.parametrize(("word", "code"), [
    ("待付款", "PENDING_PAYMENT"), ("已付款", "PAID"), ("已发货", "SHIPPED"),
    ("已完成", "COMPLETED"), ("已取消", "CANCELLED"), (" 已发货 ", "SHIPPED"),
])
def test_order_status(m: Mappings, word: str, code: str) -> None:
    assert tf.order_status(word, m) == code


@pytest.mark.parametrize(("word", "code"), [
    ("元", "CNY"), ("人民币", "CNY"), ("RMB", "CNY"), ("rmb", "CNY"), ("CNY", "CNY"),
    ("USD", "USD"), ("美元", "USD"),
])
def test_currency_code(m: Mappings, word: str, code: str) -> None:
    assert tf.currency_code(word, m) == code


def test_sku_for(m: Mappings) -> None:
    assert tf.sku_for("P-PHONE-5G", m) == "SKU-100001"
    assert tf.sku_for(" p-phone-5g ", m) == "SKU-100001"


@pytest.mark.parametrize(("call", "word", "field", "reason"), [
    (tf.order_status, "已退款", "status", "unknown order status 已退款"),
    (tf.order_status, "", "status", "unknown order status (empty)"),
    (tf.sku_for, "P-HOVERBOARD", "product_code",
     "CRM product code P-HOVERBOARD is not in [products] of the mappings file (map it to its "
     "ERP SKU, even to the same code)"),
    # the ERP's own SKU, used as the CRM's code: still a code to list, and said so
    (tf.sku_for, "SKU-100001", "product_code",
     "CRM product code SKU-100001 is not in [products] of the mappings file"),
    (tf.currency_code, "日元", "currency", "unknown currency 日元"),
    (tf.demand_kind, "供应商评价", "kind", "unknown market-demand kind 供应商评价"),
])
def test_unmapped_words_name_the_field(m: Mappings, call: object, word: str, field: str,
                                       reason: str) -> None:
    fails(field, call, word, m, reason=reason)


def test_parsed_phones_and_addresses_are_remembered_but_a_refusal_is_raised_every_time(
) -> None:
    tf._parse_phones.cache_clear()
    tf._parse_cn_address.cache_clear()
    first = tf.parse_phones("138 1234 5678")
    assert tf.parse_phones("138 1234 5678") == first == tf.Phones("+8613812345678", None)
    assert tf._parse_phones.cache_info().hits == 1
    address = "北京市朝阳区建国路88号"
    assert tf.parse_cn_address(address) is tf.parse_cn_address(address)
    for _ in range(2):
        with pytest.raises(MappingError, match="masked"):
            tf.parse_phones("138xxxx5678")
    # the field named in a refusal is the caller's, also for a remembered value
    with pytest.raises(MappingError) as refused:
        tf.parse_cn_address("朝阳区", field="ship_to")
    assert refused.value.field == "ship_to"
    assert tf._parse_phones.cache_info().maxsize == tf.PARSE_MEMO_SIZE
