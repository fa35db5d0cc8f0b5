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
from functools import cache, lru_cache
from typing import Final, NoReturn, overload

import opencc
import phonenumbers

from service.erp.divisions import Division, Divisions, divisions
from service.erp.mappings import DEFAULT_NO_NUMBER, Mappings, normalise_word
from service.errors import MappingError

__all__ = [
    "COMPOUND_SURNAMES",
    "Address",
    "Money",
    "Phones",
    "Quantity",
    "age_on",
    "currency_code",
    "demand_kind",
    "full_name",
    "gender_code",
    "normalise_email",
    "order_number",
    "order_status",
    "parse_amount",
    "parse_cn_address",
    "parse_money",
    "parse_phones",
    "parse_quantity",
    "sku_for",
    "split_cjk_name",
]


@dataclass(frozen=True, slots=True)
class Address:
    province: str           # 北京市 / 广东省 / 广西壮族自治区 (full official form)
    city: str | None        # 北京市 for a municipality; 深圳市 / 延边朝鲜族自治州 / 阿里地区;
                            # None when only the province is written
    district: str | None    # 朝阳区 / 涞水县 / 鄂温克族自治旗 / 昆山市; None if not written
    street: str | None      # the rest: 建国路88号; None if nothing follows
    division_code: str      # GB/T 2260, six digits: 110105


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


@cache
def _converter() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")


def _t2s(text: str) -> str:
    """Traditional -> simplified Chinese (OpenCC's t2s profile: 已發貨 -> 已发货, 臺 -> 台)."""
    return text if text.isascii() else str(_converter().convert(text))


def _lookup_word(table: Mapping[str, str], word: str | None) -> str | None:
    """The word as written, else its simplified form (the mappings file is in simplified)."""
    code = Mappings.lookup(table, word)
    if code is None and word:
        code = Mappings.lookup(table, _t2s(word))
    return code


def _lookup(table: Mapping[str, str], word: str | None, field: str, what: str) -> str:
    code = _lookup_word(table, word)
    if code is None:
        raise MappingError(field, word, f"unknown {what} {_shown(word)}")
    return code


# --- names -------------------------------------------------------------------------------

# Han (incl. extensions), kana, Hangul and the middle dots used inside transliterated names.
_CJK_NAME = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    "\U00020000-\U0003134f\u00b7]+"
)
# The separators people type for the middle dot of 阿依古丽·买买提: all become U+00B7.
_NAME_DOTS = re.compile("[\u00b7\u30fb\u2022\u2027\u2219\u22c5\u0387\u16eb\u2e31•・]")

# Two-character Chinese surnames, from the 《百家姓》 list of compound surnames (复姓) as
# commonly printed, limited to the ones still in use; a full name typed into one field is
# split after the compound surname when it starts with one, else after its first character.
COMPOUND_SURNAMES: Final = frozenset({
    "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文",
    "司徒", "夏侯", "令狐", "独孤", "端木", "南宫", "西门", "轩辕", "万俟", "闻人", "呼延",
    "澹台", "公冶", "太史", "申屠", "钟离", "宗政", "濮阳", "淳于", "单于", "仲孙", "赫连",
    "拓跋", "百里", "东郭", "公羊", "司空", "司寇", "左丘", "子车", "第五", "梁丘", "谷梁",
})


def _name_part(value: str | None) -> str:
    """NFKC (Ｊｏｈｎ -> John), one space between words, one kind of middle dot."""
    text = " ".join(_nfkc(value or "").split())
    return _NAME_DOTS.sub("\u00b7", text)


def split_cjk_name(full: str) -> tuple[str, str]:
    """张三 -> (张, 三); 欧阳娜娜 -> (欧阳, 娜娜); 阿依古丽·买买提 -> ("", 阿依古丽·买买提).

    A name with a middle dot is a transliterated name (given·father's name for Uyghur names)
    with no family name to split off: it stays whole, as the given part. A one-character
    name has no family part either.
    """
    if "\u00b7" in full or len(full) < 2:
        return "", full
    if full[:2] in COMPOUND_SURNAMES and len(full) > 2:
        return full[:2], full[2:]
    return full[:1], full[1:]


def full_name(family: str | None, given: str | None, middle: str | None = None,
              name_order: str = "eastern") -> str:
    """The ERP's one full-name field from the CRM's parts (NFKC-normalised, trimmed).

    ``eastern``: family, middle, given - written without spaces when every part is in a CJK
    script (张 + 三 -> 张三), with single spaces otherwise (a romanised eastern-order name:
    Nguyen Van An). ``western``: "Given Middle Family" with single spaces.

    When only one of family/given is filled in, it is taken as the whole name: a single name
    (Madonna, 买买提), a transliterated name kept whole (阿依古丽·买买提), or a full name typed
    into one field - a CJK one is written as typed (its family part is found with
    :data:`COMPOUND_SURNAMES` when it must be compared), a Western one is read with
    ``nameparser`` (``Smith, John`` -> John Smith; honorifics such as Dr. dropped, particles
    and suffixes kept: Juan de la Vega III). A given name that repeats the family name typed
    beside it (张 + 张三) is not doubled. Raises MappingError when no part holds a name, or
    for an unknown ``name_order``.
    """
    family_s, given_s, middle_s = _name_part(family), _name_part(given), _name_part(middle)
    order = (name_order or "").strip().casefold()
    if order not in ("eastern", "western"):
        raise MappingError("name_order", name_order,
                           f"name order must be eastern or western, not {_shown(name_order)}")
    if not family_s and not given_s:
        raise MappingError("given_name" if middle_s else "family_name", family,
                           "name is empty (no family or given name)")
    if not family_s or not given_s:
        whole = " ".join(p for p in (family_s or given_s, middle_s) if p) \
            if order == "western" else (family_s or given_s)
        if not family_s and middle_s and order == "eastern":
            whole = _join_eastern([middle_s, given_s])
        return _one_field_name(whole)
    dot = "\u00b7"
    if dot in family_s + given_s and not middle_s:
        # A transliterated name is written given·family: 阿依古丽· + 买买提, or the whole name
        # in one part with the other part repeated.
        if family_s in given_s:
            return given_s
        if given_s in family_s:
            return family_s
        return f"{given_s.rstrip(dot)}{dot}{family_s.lstrip(dot)}"
    if _CJK_NAME.fullmatch(given_s) and not middle_s:
        fam, rest = split_cjk_name(given_s)
        if fam and fam == family_s and rest:
            return given_s  # 张 + 张三: the full name typed into the given-name field
    if order == "eastern":
        return _join_eastern([family_s, middle_s, given_s])
    return " ".join(p for p in (given_s, middle_s, family_s) if p)


def _join_eastern(parts: list[str]) -> str:
    parts = [p for p in parts if p]
    joiner = "" if all(_CJK_NAME.fullmatch(p) for p in parts) else " "
    return joiner.join(parts)


def _one_field_name(whole: str) -> str:
    compact = whole.replace(" ", "")
    if _CJK_NAME.fullmatch(compact):
        return compact  # 张 三 typed with a space: a CJK name has none
    # imported here: only a one-field non-CJK name needs it, and it costs a consumer ~1.4 MiB
    # of resident memory (issue #13's memory target) when nothing needs it
    from nameparser import HumanName

    parsed = HumanName(whole)
    parts = [parsed.first, parsed.middle, parsed.last, parsed.suffix]
    rebuilt = " ".join(p for p in parts if p)
    return rebuilt or whole


# --- gender and age ----------------------------------------------------------------------

def gender_code(value: str | None, mappings: Mappings) -> str:
    """男/女/未知 (or male/female/M/F, any case) -> the ERP code from ``[gender]``."""
    code = _lookup_word(mappings.gender, value)
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
# Parsing, validity and E.164 come from libphonenumber (``phonenumbers``). What stays ours is
# the CRM-side clean-up the library has no notion of: masked numbers (its vanity-number rule
# would read 138xxxx5678 as keypad letters), notes in brackets (微信同号), several numbers in
# one field, the "/8" shorthand for a neighbouring line, and Chinese extension words (转, 分机).

_MASKED = re.compile(r"[xX*?×]{2,}|[…*?×]")
_NOTE = re.compile(r"\([^()]*[^\d\s()+\-.][^()]*\)|\[[^\]]*\]|【[^】]*】")
_LABEL = re.compile(r"^\s*(?:电话|手机|座机|固话|联系电话|tel|phone|mobile|mob|call)\s*[:.]?\s*",
                    re.IGNORECASE)
_EXTENSION_WORD = re.compile(r"\s*(?:转|分机号?|分|ext\.?|extn\.?|x)\s*(?=\d+\s*$)",
                             re.IGNORECASE)
_CJK_TEXT = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
_SEPARATOR = re.compile(r"\s*(?:[/、,;|]|或|\bor\b)\s*", re.IGNORECASE)
# Digits, spaces, dashes and +, with a digit: one number, nothing to clean up.
_PLAIN_NUMBER = re.compile(r"[\s+\-]*\d[\d\s+\-]*")
_DASH_EXTENSION = re.compile(r"^(?P<number>.*\d)\s*-\s*(?P<ext>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Phones:
    primary: str                   # E.164: +8613812345678
    extension: str | None          # digits only: 123
    others: tuple[str, ...] = ()   # E.164 of the further numbers; ";ext=NNN" if they had one


def _one_phone(text: str, region: str, raw: str, field: str) -> tuple[str, str | None]:
    """One number (no separators left) -> (E.164, extension or None)."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        raise MappingError(field, raw, "not a phone number (libphonenumber: "
                                       f"{_PARSE_ERRORS.get(exc.error_type, 'unreadable')})"
                           ) from None
    if not phonenumbers.is_valid_number(number):
        dash = _DASH_EXTENSION.match(text)
        if dash and number.extension is None:
            head, ext = _one_phone(dash["number"], region, raw, field)
            if ext is None:
                return head, dash["ext"]  # 0755-12345678-8001: a trailing extension
        reason = _POSSIBLE.get(phonenumbers.is_possible_number_with_reason(number),
                               "not a number in use in its region's numbering plan")
        raise MappingError(field, raw, f"invalid phone number: {reason}")
    return (phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
            number.extension or None)


_PARSE_ERRORS: Final = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "no number found",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the 00 prefix",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}
_POSSIBLE: Final = {
    phonenumbers.ValidationResult.TOO_SHORT: "too short for its region",
    phonenumbers.ValidationResult.TOO_LONG: "too long for its region",
    phonenumbers.ValidationResult.INVALID_LENGTH: "wrong length for its region",
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
}


def parse_phones(raw: str | None, mappings: Mappings | None = None, *,
                 field: str = "phone") -> Phones | None:
    """A phone field as typed -> its numbers in E.164, or None for "no number".

    None, blank and the ``[phone] no_number`` words (无, 暂无, -, —) give None. Numbers without
    a country code are read in ``[phone] default_region`` (CN). Several numbers separated by
    / 、 , ; or 或 are split: the first is the primary, the rest ``others``; ``0891-6834567/8``
    is two lines, 6834567 and 6834568 (a short tail replaces the last digits). Notes in
    brackets (（微信同号）) and Chinese words are dropped; 转 / 分机 / ext / x / # and a
    trailing ``-8001`` after a complete landline are extensions. CN 400/800 numbers are kept in
    E.164 although they cannot be dialled from abroad (libphonenumber: SHARED_COST / TOLL_FREE,
    valid). Raises MappingError for masked numbers (138xxxx5678, 138****5678), text that holds
    no number, and numbers libphonenumber finds invalid; the reason never shows the number.
    """
    region = mappings.phone_region if mappings is not None else "CN"
    no_number = mappings.no_number if mappings is not None else _DEFAULT_NO_NUMBER
    if raw is None:
        return None
    return _parse_phones(raw, region, no_number, field)


# A customer event carries the whole row, so a customer's phone and address come back with
# every change of the row, and parsing them (libphonenumber, the division table) was most of
# a customer event's transform. Both parsers are pure functions of their arguments: their
# results (immutable) are kept in a bounded LRU; a value that fails is not kept (its
# MappingError is raised again each time). 1,024 entries each: a few hundred KiB at most.
PARSE_MEMO_SIZE: Final = 1024
_DEFAULT_NO_NUMBER: Final = frozenset(DEFAULT_NO_NUMBER)


@lru_cache(maxsize=PARSE_MEMO_SIZE)
def _parse_phones(raw: str, region: str, no_number: frozenset[str], field: str
                  ) -> Phones | None:
    text = _nfkc(raw).strip()
    if not text or normalise_word(text) in no_number:
        return None
    if _PLAIN_NUMBER.fullmatch(text):
        # Most fields are one number typed with digits, spaces and dashes (a mobile, a
        # landline with its area code): none of the clean-up below would change them, and
        # its dozen regular-expression passes were a quarter of a number's parse.
        primary, extension = _one_phone(text, region, raw, field)
        return Phones(primary, extension)
    if _MASKED.search(text) or _MASKED.search(raw):
        raise MappingError(field, raw, "masked or incomplete number (digits replaced by x or *)")
    text = _LABEL.sub("", _NOTE.sub(" ", text))
    text = _EXTENSION_WORD.sub(" ext. ", text)
    text = _CJK_TEXT.sub(" ", text.replace("或", "/")).strip()
    if not text:
        return None if normalise_word(_nfkc(raw)) in no_number else _no_digits(raw, field)
    parts = [p for p in _SEPARATOR.split(text) if p.strip()]
    numbers: list[tuple[str, str | None]] = []
    previous = ""
    for part in parts:
        digits = re.sub(r"\D", "", part)
        if not digits:
            _no_digits(raw, field)
        if numbers and len(digits) <= 4 and re.fullmatch(r"\d+", part.strip()):
            # 0891-6834567/8: the neighbouring line, written as its last digit(s).
            part = previous[:len(previous) - len(digits)] + digits
        numbers.append(_one_phone(part, region, raw, field))
        previous = part
    (primary, extension), rest = numbers[0], numbers[1:]
    others = tuple(e164 + (f";ext={ext}" if ext else "") for e164, ext in rest
                   if e164 != primary)
    return Phones(primary, extension, tuple(dict.fromkeys(others)))


def _no_digits(raw: str, field: str) -> NoReturn:
    raise MappingError(field, raw, "contains no phone number")


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

def parse_cn_address(raw: str, *, field: str = "address") -> Address:
    """A free-text Chinese address -> province / city / district / street + division code.

    Matched against the official division list (:mod:`service.erp.divisions`, GB/T 2260
    codes): province, city and district in full (广东省深圳市南山区) or abbreviated where the
    next level confirms it (广东深圳南山区) or where nothing but a space, a comma or the end
    follows (北京, 广东, 浙江杭州, 上海浦东, 北京朝阳 建国路88号; 北京东路 is a street, never
    北京市; an abbreviation several places share, 吉林 or 朝阳, is ambiguous); a leading 中国
    or postcode is skipped; a municipality's repeated name or 市辖区 (上海市上海市浦东新区,
    北京市市辖区朝阳区) is its city level; autonomous prefectures, 盟, counties directly under
    a province (仙桃市), Hong Kong, Macao and Taiwan are covered; a province left out is found
    from an unambiguous city or district (深圳市南山区 -> 广东省). Traditional characters are
    read as simplified for matching. ``division_code`` is the most specific level matched
    (district, else city, else province; Hong Kong, Macao and Taiwan have codes at the province
    level only). Towns (镇, 街道) stay in ``street``.

    Raises MappingError when no division starts the text (saying so when an abbreviation runs
    into the street: 北京建国路88号), when it fits several places (the reason names the
    candidates, e.g. 北京市朝阳区 (110105), 长春市朝阳区 (220104)), or when a city or district
    of the list follows a place it is not in (``朝阳区 is not a district of 上海市``: never kept
    as street with the province's code).
    """
    return _parse_cn_address(raw, field)


@lru_cache(maxsize=PARSE_MEMO_SIZE)  # see _parse_phones
def _parse_cn_address(raw: str, field: str) -> Address:
    text = " ".join(_nfkc(raw or "").split())
    if not text:
        raise MappingError(field, raw, "address is empty")
    simplified = _t2s(text)
    matching = simplified if len(simplified) == len(text) else text
    table = divisions()
    found, pos = table.parse(matching)
    if not found:
        reason = ("no Chinese province, city or district at the start of the address "
                  "(read against the NBS 2023 division list)")
        short = table.abbreviation_at(matching, pos)
        if short is not None:
            # 北京东路100号: the refusal must not read as if 北京 were unknown.
            reason = ("no Chinese province, city or district at the start of the address: "
                      f"an abbreviation ({short.short} for {short.name}) is read only when a "
                      "city or district written after it confirms it or a space, a comma or "
                      "nothing follows it, as streets are named after places (北京东路)")
        raise MappingError(field, raw, reason)
    if len(found) > 1:
        names = ", ".join(sorted(repr(m.division) for m in found))
        raise MappingError(field, raw, f"ambiguous: the place fits {names}")
    match = found[0]
    d = match.division
    if d.level < 3:
        # 上海市朝阳区: a district written but not of this place is a typo or a wrong
        # province, never a street (the code would silently drop to 310000).
        other = table.foreign_at(matching, match.end, d)
        if other is not None:
            kind = "city" if other.level == 2 else "district"
            token = _token_after(matching, match.end)
            written = other.name if token.startswith(other.name) else f"{token} ({other.name})"
            raise MappingError(field, raw, f"{written} is not a {kind} of {d.path} "
                                           f"(it is in {_places_named(table, other)})")
    street = text[match.end:].strip(" ,，、") or None
    province = d.province
    city = d.city if d.level >= 2 or d.city else None
    district = d.name if d.level == 3 else None
    return Address(province, city, district, street, d.code)


def _token_after(text: str, pos: int) -> str:
    return re.split(r"[\s,，、]", text[pos:].lstrip(" ,，、"), maxsplit=1)[0]


def _places_named(table: Divisions, d: Division) -> str:
    """Where the divisions of ``d``'s name are: 北京市, 吉林省长春市 and 2 more."""
    same = sorted(table.parents_of(d.name))
    return ", ".join(same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3 else "")


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


def check_cents(amount: Decimal, field: str, value: object) -> Decimal:
    """An amount of money as the ERP keeps it, numeric(14, 2): 12 digits at most before the
    decimal point, two after (order totals, unit prices, purchase amounts alike); returns it
    at that scale (5000 -> 5000.00). Raises
    MappingError naming ``field`` for one too large (the ERP refused the whole row,
    "numeric field overflow", no column named) or with more decimal places (the ERP's column
    rounded it without a word); ``value`` is what the CRM had, for the letter."""
    if abs(amount) >= _MAX_AMOUNT:
        raise MappingError(field, value, "amount is too large for the ERP (12 digits at most "
                                         "before the decimal point)")
    exact = amount.quantize(_CENT)
    if exact != amount:
        raise MappingError(field, value, "amount has more than two decimal places (the ERP "
                                         "keeps cents and would round it)")
    return exact


def parse_money(value: str | Decimal | int, currency_word: str | None, mappings: Mappings, *,
                field: str = "amount", default_currency: str | None = None) -> Money:
    """An amount (``5000元``, ``¥5,000.00``, ``Decimal('5000')``) -> exact ``Money``.

    The currency comes from the text, from ``currency_word`` (the row's currency column),
    or both - when both are given they must map to the same ISO code; when neither gives
    one, ``default_currency`` (an ISO code, e.g. ``[money] default_currency``) is taken,
    and without it the amount is refused. Negative amounts, more than two decimal places
    and floats are refused. Raises MappingError naming ``field`` (or ``currency`` for an
    unknown word of the currency column).
    """
    amount, code = parse_amount(value, currency_word, mappings, field=field)
    if code is None:
        if default_currency is None:
            raise MappingError(field, value, "no currency: none written with the amount "
                                             "or given")
        code = default_currency
    return Money(amount, code)


def parse_amount(value: str | Decimal | int, currency_word: str | None, mappings: Mappings, *,
                 field: str = "amount") -> tuple[Decimal, str | None]:
    """An amount of money and its ISO 4217 code when one is known: written with it
    (``5000元``, ``¥5,000.00``, ``USD 99.90``: a word or sign of ``[currencies]``) or given
    as ``currency_word`` (the row's currency column); both must agree. ``(5000.00, None)``
    when none is: for a caller that knows the currency otherwise (an order line's price is
    in its order's currency). The amount has exactly two decimal places.

    Raises MappingError naming ``field`` for text that is not an amount, a negative or
    non-finite amount, one the ERP cannot keep (``check_cents``), an unknown currency
    written with the amount, or one that differs from ``currency_word``'s; naming
    ``currency`` for an unknown ``currency_word``.
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
        word_in_text = m["pre"] or m["post"].strip() or None
    elif isinstance(value, Decimal | int) and not isinstance(value, bool):
        amount = Decimal(value)
    else:
        raise MappingError(field, value, f"an amount must be text or Decimal, not "
                                         f"{type(value).__name__}")
    if not amount.is_finite():
        raise MappingError(field, value, "amount is not a finite number")
    if amount < 0:
        raise MappingError(field, value, "amount is negative")
    exact = check_cents(amount, field, value)

    written: str | None = None
    if word_in_text is not None:
        written = _lookup_word(mappings.currencies, word_in_text)
        if written is None:
            # the word is part of the amount: the amount's field is what to fix
            raise MappingError(field, value, f"unknown currency {_shown(word_in_text)} written "
                                             "with the amount (not in [currencies])")
    given = (_lookup(mappings.currencies, currency_word, "currency", "currency")
             if currency_word is not None else None)
    if written is not None and given is not None and written != given:
        raise MappingError(field, value, f"currency written with the amount ({written}) "
                                         f"differs from the currency field ({given})")
    return exact, written or given


_CN_NUMERAL = re.compile(r"[零〇一二两三四五六七八九十廿百千万亿壹贰叁肆伍陆柒捌玖拾佰仟点]+")


def parse_quantity(raw: str, mappings: Mappings, *, field: str = "quantity") -> Quantity:
    """``10台`` / ``十台`` / ``2.5kg`` / ``3 箱`` -> Quantity(value, ERP unit code).

    The number is Arabic (thousands separators allowed) or Chinese numerals, read by
    ``cn2an`` in its "normal" mode (十 -> 10, 一百二十 -> 120, 两 -> 2, 三万五 -> 35000,
    十点五 -> 10.5); the unit is looked up in
    ``[units]`` (traditional characters read as simplified: 臺 -> 台). Positive, at most three
    decimals, and whole for a unit ``[unit_kind]`` declares countable (10.5台 is refused,
    2.5kg is not). Raises MappingError naming the problem.
    """
    text = _nfkc(raw or "").strip()
    m = _QUANTITY_TEXT.fullmatch(text)
    if m is not None:
        value = _decimal(m["num"])
        if value is None:
            raise MappingError(field, raw, "not a valid number (expected e.g. 10台 or 2.5kg)")
        unit_word = m["unit"].strip()
    else:
        cn = _CN_NUMERAL.match(text)
        if cn is None:
            raise MappingError(field, raw, "does not start with a number (expected e.g. 10台)")
        # imported here: only a quantity in Chinese numerals needs it, and with its
        # dependencies it costs a consumer ~3 MiB of resident memory (issue #13)
        import cn2an

        try:
            number = cn2an.cn2an(cn.group(), "normal")
        except ValueError:
            raise MappingError(field, raw, "not a valid Chinese numeral") from None
        # cn2an returns int, or float for 点 (十点五): its decimal text is what was written.
        value = Decimal(str(number))
        unit_word = text[cn.end():].strip()
    if not unit_word:
        raise MappingError(field, raw, "no unit after the number (expected e.g. 10台)")
    unit = _lookup_word(mappings.units, unit_word)
    if unit is None:
        raise MappingError(field, raw, f"unknown unit {_shown(unit_word)}")
    if value <= 0:
        raise MappingError(field, raw, "quantity must be greater than zero")
    if value >= _MAX_QUANTITY:
        raise MappingError(field, raw, "quantity is too large for the ERP")
    if value.quantize(_MILLI) != value:
        raise MappingError(field, raw, "quantity has more than three decimal places")
    if mappings.unit_kind.get(unit) == "countable" and value != value.to_integral_value():
        raise MappingError(field, raw, f"{unit} is counted in whole units: a quantity with "
                                       "decimals is not accepted")
    return Quantity(value, unit)


# --- vocabulary look-ups -----------------------------------------------------------------

def order_number(raw: str | None, *, field: str = "order_no") -> str:
    """The CRM's order number, NFKC-normalised (ＳＯ－２０２４ -> SO-2024) and trimmed."""
    text = " ".join(_nfkc(raw or "").split())
    if not text:
        raise MappingError(field, raw, "order number is empty")
    return text


def order_status(word: str, mappings: Mappings) -> str:
    """已发货 -> SHIPPED (``[order_status]``)."""
    return _lookup(mappings.order_status, word, "status", "order status")


def sku_for(product_code: str, mappings: Mappings) -> str:
    """CRM product code -> ERP SKU (``[products]``). Every code must be listed, even one that
    already is the ERP's SKU. Raises MappingError naming ``product_code``, whose reason says
    what to do (the code is a vocabulary word, not personal data: it is quoted)."""
    sku = _lookup_word(mappings.products, product_code)
    if sku is None:
        raise MappingError("product_code", product_code,
                           f"CRM product code {_shown(product_code)} is not in [products] of "
                           "the mappings file (map it to its ERP SKU, even to the same code)")
    return sku


def currency_code(word: str, mappings: Mappings) -> str:
    """元 / 人民币 / RMB -> CNY (``[currencies]``)."""
    return _lookup(mappings.currencies, word, "currency", "currency")


def demand_kind(word: str, mappings: Mappings) -> str:
    """市场趋势 -> MARKET_TREND (``[demand_kind]``)."""
    return _lookup(mappings.demand_kind, word, "kind", "market-demand kind")
