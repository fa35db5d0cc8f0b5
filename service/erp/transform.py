"""CRM values -> the ERP's vocabulary: pure, typed functions ("数据格式不一致").

Every failure raises ``MappingError(field, value, reason)``: ``field`` is the CRM column, the
reason says what is wrong in words an operator understands. A reason never repeats the value
itself when the value may be personal data (names, phones, e-mails, addresses, amounts);
for vocabulary words (a unit, a status, a product code) it names the word, shortened.

Money and quantities are ``Decimal`` from end to end: a binary float is refused, never
converted. Text input is NFKC-normalised first, so full-width digits and signs typed with a
Chinese input method (``１３８``, ``＋８６``, ``５０００元``) read as their ASCII forms.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Final, overload

from service.erp.mappings import Mappings
from service.errors import MappingError

__all__ = [
    "Address",
    "Money",
    "Quantity",
    "age_on",
    "currency_code",
    "demand_kind",
    "full_name",
    "gender_code",
    "normalise_email",
    "order_status",
    "parse_cn_address",
    "parse_money",
    "parse_quantity",
    "phone_e164",
    "sku_for",
]


@dataclass(frozen=True, slots=True)
class Address:
    province: str           # 北京市 / 广东省 / 广西壮族自治区 (full official form)
    city: str               # 北京市 for a municipality; 深圳市 / 延边朝鲜族自治州 / 阿里地区
    district: str | None    # 朝阳区 / 涞水县 / 鄂温克族自治旗 / 昆山市; None if not written
    street: str | None      # the rest: 建国路88号; None if nothing follows


@dataclass(frozen=True, slots=True)
class Money:
    amount: Decimal         # exactly two decimal places
    currency: str           # ISO 4217


@dataclass(frozen=True, slots=True)
class Quantity:
    value: Decimal          # > 0, at most three decimal places
    unit: str               # ERP unit code


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _shown(word: str | None, limit: int = 24) -> str:
    """A vocabulary word for an error reason: normalised, shortened, never free text."""
    text = " ".join(_nfkc(word or "").split())
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[:limit] + "…"


def _lookup(table: Mapping[str, str], word: str | None, field: str, what: str) -> str:
    code = Mappings.lookup(table, word)
    if code is None:
        raise MappingError(field, word, f"unknown {what} {_shown(word)}")
    return code


# --- names -------------------------------------------------------------------------------

# Han (incl. extensions), kana, Hangul and the middle dots used inside transliterated names.
_CJK_NAME = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    "\U00020000-\U0003134f\u00b7\u30fb]+"
)


def full_name(family: str | None, given: str | None, middle: str | None = None,
              name_order: str = "eastern") -> str:
    """The ERP's one full-name field from the CRM's parts.

    ``eastern``: family, middle, given - written without spaces when every part is in a CJK
    script (张 + 三 -> 张三), with single spaces otherwise (a romanised eastern-order name:
    Nguyen Van An). ``western``: "Given Middle Family" with single spaces. Runs of white
    space inside a part (including the ideographic space) become one space.
    """
    family_s = " ".join((family or "").split())
    given_s = " ".join((given or "").split())
    middle_s = " ".join((middle or "").split())
    if not family_s:
        raise MappingError("family_name", family, "family name is empty")
    if not given_s:
        raise MappingError("given_name", given, "given name is empty")
    order = (name_order or "").strip().casefold()
    if order == "eastern":
        parts = [p for p in (family_s, middle_s, given_s) if p]
        joiner = "" if all(_CJK_NAME.fullmatch(p) for p in parts) else " "
        return joiner.join(parts)
    if order == "western":
        return " ".join(p for p in (given_s, middle_s, family_s) if p)
    raise MappingError("name_order", name_order,
                       f"name order must be eastern or western, not {_shown(name_order)}")


# --- gender and age ----------------------------------------------------------------------

def gender_code(value: str | None, mappings: Mappings) -> str:
    """男/女/未知 (or male/female/M/F, any case) -> the ERP code from ``[gender]``."""
    code = Mappings.lookup(mappings.gender, value)
    if code is None:
        # The word itself is left out: a person's gender is personal data.
        raise MappingError("gender", value, "not a gender word listed in the mappings file")
    return code


def age_on(birth_date: date | None, on_date: date) -> int | None:
    """Completed years on ``on_date``; None when the birth date is unknown.

    The birthday counts once the day is reached; someone born on 29 February turns a year
    older on 1 March in common years (still the previous age on 28 February).
    """
    if birth_date is None:
        return None
    if birth_date > on_date:
        raise MappingError("birth_date", birth_date, "birth date is after the reference date")
    age = on_date.year - birth_date.year - (
        (on_date.month, on_date.day) < (birth_date.month, birth_date.day))
    if age > 150:
        raise MappingError("birth_date", birth_date, "birth date gives an age over 150 years")
    return age


# --- phone -------------------------------------------------------------------------------
#
# Hand-written rules, not the `phonenumbers` library: the CRM holds Chinese numbers (mobiles,
# landlines with an area code) and a few already-international ones, and what we must catch
# is what libphonenumber does not: a masked number such as 138xxxx5678 (its vanity-number
# rule reads letters as keypad digits). Foreign numbers are only checked for E.164 shape
# (country code + number, 7..15 digits), not per country; add the library if that changes.

_MASKED = re.compile(r"[xX*?×…]")
_EXTENSION = re.compile(r"(转|分机|ext\.?)\s*\d+\s*$", re.IGNORECASE)
_PHONE_TEXT = re.compile(r"[0-9+\s().\-/]+")
_PHONE_SEPARATORS = re.compile(r"[\s().\-/]")
_CN_MOBILE = re.compile(r"1[3-9]\d{9}")


def _cn_number(digits: str) -> str | None:
    """E.164 for a Chinese number written without the trunk 0, or None."""
    if _CN_MOBILE.fullmatch(digits):
        return "+86" + digits
    # Landline: area code + subscriber number. 10 and 2X are two-digit area codes with
    # eight-digit numbers; the others (3XX..9XX) are three digits with seven or eight.
    if len(digits) == 10 and (digits.startswith("10") or digits.startswith("2")):
        return "+86" + digits
    if len(digits) in (10, 11) and digits[0] in "3456789":
        return "+86" + digits
    return None


@overload
def phone_e164(raw: str, default_region: str = "CN", *, field: str = "phone") -> str: ...
@overload
def phone_e164(raw: None, default_region: str = "CN", *, field: str = "phone") -> None: ...
def phone_e164(raw: str | None, default_region: str = "CN", *,
               field: str = "phone") -> str | None:
    """A phone number as typed -> E.164 (``+8613812345678``); None stays None.

    Accepts spaces, dashes, dots, brackets, ``+86``/``0086``/``(+86)`` prefixes, a trunk 0
    (``010-12345678``, ``+86 (0)10 12345678``) and full-width digits. Rejects masked numbers
    (``138xxxx5678``), extensions, letters, and lengths no Chinese number has.
    """
    if default_region != "CN":
        raise ValueError(f"unsupported default_region {default_region!r}: only CN is")
    if raw is None:
        return None
    text = _nfkc(raw).strip()
    if not text:
        raise MappingError(field, raw, "phone number is empty")
    if _EXTENSION.search(text):
        raise MappingError(field, raw, "has an extension, which E.164 cannot hold")
    if _MASKED.search(text) or _MASKED.search(raw):
        raise MappingError(field, raw, "masked or incomplete number (digits replaced by x or *)")
    if not _PHONE_TEXT.fullmatch(text):
        raise MappingError(field, raw, "contains characters that are not part of a phone number")
    compact = _PHONE_SEPARATORS.sub("", text)
    if "+" in compact[1:]:
        raise MappingError(field, raw, "'+' may only start the number")
    if compact.startswith("+") or compact.startswith("00"):
        international = compact[1:] if compact.startswith("+") else compact[2:]
        if international.startswith("86"):
            national = international[2:]
            national = national[1:] if national.startswith("0") else national
            e164 = _cn_number(national)
            if e164 is None:
                raise MappingError(field, raw, "not a valid Chinese mobile or landline number "
                                               "after the +86 country code")
            return e164
        if not international or international[0] == "0" or not 7 <= len(international) <= 15:
            raise MappingError(field, raw, "international number must be a country code and "
                                           "number of 7 to 15 digits in all")
        return "+" + international
    digits = compact
    if _CN_MOBILE.fullmatch(digits):
        return "+86" + digits
    if len(digits) == 13 and digits.startswith("86") and _CN_MOBILE.fullmatch(digits[2:]):
        return "+" + digits  # 86 typed without + or 00
    if digits.startswith("0"):
        e164 = _cn_number(digits[1:])
        if e164 is None:
            raise MappingError(field, raw, "landline number has the wrong length for its "
                                           "area code")
        return e164
    if len(digits) in (7, 8):
        raise MappingError(field, raw, "landline number without its area code")
    raise MappingError(field, raw, "not a Chinese mobile number (11 digits starting 13-19) or "
                                   "landline (0, area code, number)")


# --- e-mail ------------------------------------------------------------------------------

_DOMAIN_LABEL = re.compile(r"[^\W_](?:[\w-]*[^\W_])?")


@overload
def normalise_email(raw: str, *, field: str = "email") -> str | None: ...
@overload
def normalise_email(raw: None, *, field: str = "email") -> None: ...
def normalise_email(raw: str | None, *, field: str = "email") -> str | None:
    """Trimmed, NFKC (full-width ＠ -> @), lower-cased - local part included.

    Lower-casing the local part is a deliberate choice: RFC 5321 lets a server treat it as
    case-sensitive, but no mainstream provider does, and the ERP deduplicates partners by
    e-mail. None and blank (only spaces) both mean "no e-mail" and give None.
    """
    if raw is None:
        return None
    text = _nfkc(raw).strip()
    if not text:
        return None
    if any(ch.isspace() for ch in text):
        raise MappingError(field, raw, "e-mail address contains spaces")
    if text.count("@") != 1:
        raise MappingError(field, raw, "e-mail address must contain exactly one @")
    local, domain = text.lower().split("@")
    if not local:
        raise MappingError(field, raw, "nothing before the @")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise MappingError(field, raw, "misplaced dot in the part before the @")
    if "." not in domain:
        raise MappingError(field, raw, "domain after the @ has no dot")
    labels = domain.split(".")
    if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise MappingError(field, raw, "domain after the @ is not a valid domain name")
    if len(labels[-1]) < 2:
        raise MappingError(field, raw, "top-level domain is too short")
    if len(local) > 64 or len(text) > 254:
        raise MappingError(field, raw, "e-mail address is too long")
    return f"{local}@{domain}"


# --- Chinese addresses -------------------------------------------------------------------

_MUNICIPALITIES: Final = ("北京", "天津", "上海", "重庆")
_PROVINCES: Final = ("河北", "山西", "辽宁", "吉林", "黑龙江", "江苏", "浙江", "安徽", "福建",
                     "江西", "山东", "河南", "湖北", "湖南", "广东", "海南", "四川", "贵州",
                     "云南", "陕西", "甘肃", "青海", "台湾")
_AUTONOMOUS: Final = {"内蒙古": "内蒙古自治区", "广西": "广西壮族自治区", "西藏": "西藏自治区",
                      "宁夏": "宁夏回族自治区", "新疆": "新疆维吾尔自治区"}


def _region_forms() -> dict[str, tuple[str, bool]]:
    """Written form -> (official name, is a municipality)."""
    forms: dict[str, tuple[str, bool]] = {}
    for name in _MUNICIPALITIES:
        forms[name + "市"] = forms[name] = (name + "市", True)
    for name in _PROVINCES:
        forms[name + "省"] = forms[name] = (name + "省", False)
    for short, official in _AUTONOMOUS.items():
        forms[official] = forms[short + "自治区"] = forms[short] = (official, False)
    return forms


_REGION_FORMS: Final = _region_forms()
# Longest form first; a bare short name must not be the start of a city (吉林市 is a city).
_REGION = re.compile(
    r"(?:\d{6}\s*)?(?:中华人民共和国|中国)?\s*(?P<region>"
    + "|".join(re.escape(f) + ("(?!市)" if f.isalpha() and f in _PROVINCES + tuple(_AUTONOMOUS)
                               else "")
               for f in sorted(_REGION_FORMS, key=len, reverse=True))
    + r")\s*"
)
# Administrative names hold no digits, Latin letters or street words (路 街 号 巷 弄 村).
_NAME_CHARS = r"[^\s\dA-Za-z路街号巷弄村]"
# 林区: 神农架林区 sits directly under 湖北省, in the city's place.
_CITY = re.compile(_NAME_CHARS + r"{1,15}?(?:自治州|地区|林区|盟|市)\s*")
_DISTRICT = re.compile(_NAME_CHARS + r"{1,15}?(?:自治县|自治旗|林区|特区|区|县|旗|市)")


def parse_cn_address(raw: str, *, field: str = "address") -> Address:
    """A free-text mainland Chinese address -> province / city / district / street.

    Province-level: the 23 provinces, 5 autonomous regions and 4 municipalities, written in
    full (广东省, 广西壮族自治区, 北京市) or short (广东, 广西, 北京); a leading 中国 or six-digit
    postcode is skipped. A municipality is its own city. The city level ends in 市/自治州/
    地区/盟; the district level (optional: 东莞市 has none) in 区/县/旗/市/自治县/自治旗/林区/特区.
    Whatever follows is the street. Hong Kong and Macao addresses are not supported.
    """
    text = " ".join(_nfkc(raw or "").split())
    if not text:
        raise MappingError(field, raw, "address is empty")
    m = _REGION.match(text)
    if m is None:
        raise MappingError(field, raw, "does not start with a Chinese province, autonomous "
                                       "region or municipality")
    province, municipality = _REGION_FORMS[m["region"]]
    pos = m.end()
    if municipality:
        city = province
    else:
        c = _CITY.match(text, pos)
        if c is None:
            raise MappingError(field, raw, "no city (…市, …自治州, …地区 or …盟) after the "
                                           "province")
        city = c.group().strip()
        pos = c.end()
    district: str | None = None
    d = _DISTRICT.match(text, pos)
    if d is not None:
        end = d.end()
        if text.endswith("市", pos, end) and text.startswith("区", end):
            end += 1  # 新市区, not the county-level city 新市
        district = text[pos:end]
        pos = end
    street = text[pos:].strip() or None
    return Address(province, city, district, street)


# --- numbers: money and quantities -------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CENT: Final = Decimal("0.01")
_MILLI: Final = Decimal("0.001")
_MAX_AMOUNT: Final = Decimal(10) ** 12    # erp numeric(14, 2)
_MAX_QUANTITY: Final = Decimal(10) ** 11  # erp numeric(14, 3)
_MONEY_TEXT = re.compile(r"(?P<pre>[^\d\s+\-.,]*)\s*(?P<num>[+-]?[\d.,]+)\s*(?P<post>.*)")
_QUANTITY_TEXT = re.compile(r"(?P<num>[+-]?[\d.,]+)\s*(?P<unit>.*)")


def _decimal(text: str) -> Decimal | None:
    """A decimal number, optionally with correct thousands separators (5,000.00)."""
    if not _NUMBER.fullmatch(text):
        return None
    return Decimal(text.replace(",", ""))


def parse_money(value: str | Decimal | int, currency_word: str | None, mappings: Mappings, *,
                field: str = "amount") -> Money:
    """An amount (``5000元``, ``¥5,000.00``, ``Decimal('5000')``) -> exact ``Money``.

    The currency comes from the text, from ``currency_word`` (the order's currency column),
    or both - when both are given they must map to the same ISO code. Negative amounts,
    more than two decimal places and floats are refused.
    """
    word_in_text: str | None = None
    if isinstance(value, float):
        raise MappingError(field, value, "binary floating-point amounts are not accepted; "
                                         "pass a string or Decimal")
    if isinstance(value, str):
        text = _nfkc(value).strip()
        m = _MONEY_TEXT.fullmatch(text)
        amount = _decimal(m["num"]) if m else None
        if m is None or amount is None:
            raise MappingError(field, value, "not an amount (expected e.g. 5000元 or 5,000.00)")
        if m["pre"] and m["post"]:
            raise MappingError(field, value, "currency written both before and after the amount")
        word_in_text = m["pre"] or m["post"] or None
    elif isinstance(value, Decimal | int) and not isinstance(value, bool):
        amount = Decimal(value)
    else:
        raise MappingError(field, value, f"an amount must be text or Decimal, not "
                                         f"{type(value).__name__}")
    if not amount.is_finite():
        raise MappingError(field, value, "amount is not a finite number")
    if amount < 0:
        raise MappingError(field, value, "amount is negative")
    if amount >= _MAX_AMOUNT:
        raise MappingError(field, value, "amount is too large for the ERP (12 digits at most "
                                         "before the decimal point)")
    exact = amount.quantize(_CENT)
    if exact != amount:
        raise MappingError(field, value, "amount has more than two decimal places")

    codes = [_lookup(mappings.currencies, w, "currency", "currency")
             for w in (word_in_text, currency_word) if w is not None]
    if not codes:
        raise MappingError(field, value, "no currency: none written with the amount or given")
    if len(codes) == 2 and codes[0] != codes[1]:
        raise MappingError(field, value, f"currency written with the amount ({codes[0]}) "
                                         f"differs from the currency field ({codes[1]})")
    return Money(exact, codes[0])


def parse_quantity(raw: str, mappings: Mappings, *, field: str = "quantity") -> Quantity:
    """``10台`` -> Quantity(10, UNIT); ``2.5kg``, `` 3 箱 ``; positive, <= 3 decimals."""
    text = _nfkc(raw or "").strip()
    m = _QUANTITY_TEXT.fullmatch(text)
    if m is None:
        raise MappingError(field, raw, "does not start with a number (expected e.g. 10台)")
    value = _decimal(m["num"])
    if value is None:
        raise MappingError(field, raw, "not a valid number (expected e.g. 10台 or 2.5kg)")
    unit_word = m["unit"].strip()
    if not unit_word:
        raise MappingError(field, raw, "no unit after the number (expected e.g. 10台)")
    unit = Mappings.lookup(mappings.units, unit_word)
    if unit is None:
        raise MappingError(field, raw, f"unknown unit {_shown(unit_word)}")
    if value <= 0:
        raise MappingError(field, raw, "quantity must be greater than zero")
    if value >= _MAX_QUANTITY:
        raise MappingError(field, raw, "quantity is too large for the ERP")
    if value.quantize(_MILLI) != value:
        raise MappingError(field, raw, "quantity has more than three decimal places")
    return Quantity(value, unit)


# --- vocabulary look-ups -----------------------------------------------------------------

def order_status(word: str, mappings: Mappings) -> str:
    """已发货 -> SHIPPED (``[order_status]``)."""
    return _lookup(mappings.order_status, word, "status", "order status")


def sku_for(product_code: str, mappings: Mappings) -> str:
    """CRM product code -> ERP SKU (``[products]``)."""
    return _lookup(mappings.products, product_code, "product_code", "product code (no ERP SKU)")


def currency_code(word: str, mappings: Mappings) -> str:
    """元 / 人民币 / RMB -> CNY (``[currencies]``)."""
    return _lookup(mappings.currencies, word, "currency", "currency")


def demand_kind(word: str, mappings: Mappings) -> str:
    """市场趋势 -> MARKET_TREND (``[demand_kind]``)."""
    return _lookup(mappings.demand_kind, word, "kind", "market-demand kind")
