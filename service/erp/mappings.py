"""The CRM -> ERP vocabulary, loaded from ``mappings.toml`` (operators edit that file).

Everything is checked at load time, so a typo stops the service at start-up with a
``ConfigError`` naming the file and the key instead of dead-lettering events later.

CRM words are matched after :func:`normalise_word` (NFKC, surrounding spaces stripped, inner
runs of spaces collapsed, case-folded), so ``"KG"``, ``" kg "`` and ``"ｋｇ"`` are one word.
The tables held by :class:`Mappings` are keyed by the normalised word; look words up with
:meth:`Mappings.lookup`. ERP codes (the values) are used exactly as written.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from service.erp.units import SkuUnits, UnitProblem, check_measure, decimal_factor, sku_units
from service.errors import ConfigError, ConfigProblems

DEFAULT_PATH: Final = Path(__file__).resolve().parent / "mappings.toml"

STOCK_EFFECTS: Final = frozenset({"none", "reserve", "issue", "release"})
UNIT_KINDS: Final = frozenset({"countable", "measured"})
DEFAULT_PHONE_REGION: Final = "CN"
DEFAULT_CURRENCY: Final = "CNY"
DEFAULT_NO_NUMBER: Final = ("无", "暂无", "没有", "-", "—", "/", "n/a", "none")

_CODE = re.compile(r"[A-Z][A-Z0-9_]*")
_CURRENCY = re.compile(r"[A-Z]{3}")
_SKU = re.compile(r"\S+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# section -> (what the values must look like, description used in error messages)
_SECTIONS: Final[dict[str, tuple[re.Pattern[str], str]]] = {
    "order_status": (_CODE, "an ERP status code (UPPER_CASE letters, digits, _)"),
    "status_stock_effect": (_CODE, "a stock effect"),  # values checked against STOCK_EFFECTS
    "gender": (_CODE, "an ERP gender code (UPPER_CASE letters, digits, _)"),
    "units": (_CODE, "an ERP unit code (UPPER_CASE letters, digits, _)"),
    "currencies": (_CURRENCY, "a three-letter ISO 4217 code such as CNY"),
    "products": (_SKU, "an ERP SKU (text without spaces)"),
    "demand_kind": (_CODE, "an ERP demand-signal type (UPPER_CASE letters, digits, _)"),
    "measures": (re.compile(r"\S.*"), "a unit name pint knows (kilogram, metric_ton, ...)"),
}
# Sections whose values are tables, not words: checked by _sku_units.
_TABLE_SECTIONS: Final = ("sku_units",)
# Optional sections with their own shapes (checked in _phone, _unit_kinds and _money).
_OTHER_SECTIONS: Final = ("phone", "unit_kind", "money")
_REGION = re.compile(r"[A-Z]{2}")


def normalise_word(word: str) -> str:
    """The form a CRM word is matched in: NFKC, trimmed, single-spaced, case-folded."""
    return " ".join(unicodedata.normalize("NFKC", word).split()).casefold()


@dataclass(frozen=True, slots=True)
class Mappings:
    """The validated vocabulary. Read-only; build it with :meth:`load` or :meth:`from_dict`."""

    source: str
    order_status: Mapping[str, str]
    """normalised CRM status word -> ERP status code"""
    status_stock_effect: Mapping[str, str]
    """ERP status code (exact) -> one of ``STOCK_EFFECTS``"""
    gender: Mapping[str, str]
    units: Mapping[str, str]
    currencies: Mapping[str, str]
    products: Mapping[str, str]
    demand_kind: Mapping[str, str]
    measures: Mapping[str, str]
    """ERP unit code (exact) of a physical measure -> its name in pint's registry"""
    sku_units: Mapping[str, SkuUnits]
    """ERP SKU (exact) -> its base unit and conversions (see ``service.erp.units``)"""
    unit_kind: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """ERP unit code (exact) -> "countable" (whole numbers only) or "measured"; a unit not
    listed (only possible when the section is absent) accepts decimals"""
    phone_region: str = DEFAULT_PHONE_REGION
    """ISO 3166 region a number without a country code is read in (``[phone]``)"""
    no_number: frozenset[str] = frozenset(DEFAULT_NO_NUMBER)
    """normalised words that mean "no phone number" (``[phone] no_number``)"""
    default_currency: str = DEFAULT_CURRENCY
    """ISO 4217 code of a customer's purchase amount when neither the amount's text nor the
    customer's currency column names one (``[money] default_currency``)"""

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> Mappings:
        """Read and validate a mappings file; any problem raises ``ConfigError``."""
        source = str(path)
        try:
            with open(path, "rb") as fh:
                content = fh.read()
        except OSError as exc:
            raise ConfigError(source, f"cannot read the mappings file: "
                                      f"{exc.strerror or exc}") from exc
        return cls.parse(content, source)

    @classmethod
    def parse(cls, content: bytes, source: str) -> Mappings:
        """Validate a mappings file's bytes (UTF-8 TOML) as read, so that a caller can hash
        exactly what it loaded (the reload watcher does); ``source`` names the file in
        errors. Any problem raises ``ConfigError``."""
        try:
            data = tomllib.loads(content.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(source, f"not UTF-8 text (byte {exc.start})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, f"not valid TOML: {exc}") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<mappings>") -> Mappings:
        """Validate already-parsed TOML content (``source`` names it in errors). Raises one
        ConfigError listing every problem found (each naming the file and key); a check
        that compares sections runs only when the sections it reads are valid, so one
        mistake is not reported again as its consequences."""
        problems = ConfigProblems()
        for name in data:
            if name not in (*_SECTIONS, *_TABLE_SECTIONS, *_OTHER_SECTIONS):
                problems.add(f"{source}: [{name}]", "unknown section; expected " + ", ".join(
                    f"[{s}]" for s in (*_SECTIONS, *_TABLE_SECTIONS, *_OTHER_SECTIONS)))
        tables: dict[str, dict[str, str]] = {}
        valid: set[str] = set()  # the sections without a problem
        for name in _SECTIONS:
            mark = len(problems.found)
            tables[name] = _section(source, name, data, problems)
            if problems.clean_since(mark):
                valid.add(name)

        effects = tables["status_stock_effect"]
        for status, effect in effects.items():
            if effect not in STOCK_EFFECTS:
                problems.add(_where(source, "status_stock_effect", status),
                             f"must be one of {', '.join(sorted(STOCK_EFFECTS))}")
        if {"order_status", "status_stock_effect"} <= valid:
            produced = set(tables["order_status"].values())
            for status in sorted(produced - effects.keys()):
                problems.add(_where(source, "status_stock_effect", status),
                             "missing: every ERP status in [order_status] needs a stock effect")
            for status in sorted(effects.keys() - produced):
                problems.add(_where(source, "status_stock_effect", status),
                             "not an ERP status produced by [order_status] (a typo?)")

        normalised = {
            name: _normalised_keys(source, name, table, problems)
            for name, table in tables.items() if name not in ("status_stock_effect", "measures")
        }
        units = set(tables["units"].values())
        measures = tables["measures"]
        for code, name in measures.items():
            if "units" in valid and code not in units:
                problems.add(_where(source, "measures", code),
                             "not an ERP unit code produced by [units]")
                continue
            try:
                check_measure(name)
            except UnitProblem as exc:
                problems.add(_where(source, "measures", code), str(exc))
        per_sku: Mapping[str, SkuUnits] = MappingProxyType({})
        if {"units", "products", "measures"} <= valid:
            with problems.gather():
                per_sku = _sku_units(source, data, units, set(tables["products"].values()),
                                     measures, problems)
        unit_kind: Mapping[str, str] = MappingProxyType({})
        if "units" in valid:
            with problems.gather():
                unit_kind = _unit_kinds(source, data, units)
        phone: dict[str, Any] = {}
        with problems.gather():
            phone = _phone(source, data)
        money: dict[str, Any] = {}
        with problems.gather():
            money = _money(source, data, set(tables["currencies"].values())
                           if "currencies" in valid else None)
        problems.raise_if_any()
        return cls(
            source=source,
            order_status=normalised["order_status"],
            status_stock_effect=MappingProxyType(dict(effects)),
            gender=normalised["gender"],
            units=normalised["units"],
            currencies=normalised["currencies"],
            products=normalised["products"],
            demand_kind=normalised["demand_kind"],
            measures=MappingProxyType(dict(measures)),
            sku_units=per_sku,
            unit_kind=unit_kind,
            **phone,
            **money,
        )

    @staticmethod
    def lookup(table: Mapping[str, str], word: str | None) -> str | None:
        """The ERP code for a CRM word in one of the tables, or None (``None`` reads as "")."""
        return table.get(normalise_word(word or ""))


def _where(source: str, section: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{source}: {section}.{shown}"


def _section(source: str, name: str, data: Mapping[str, Any],
             problems: ConfigProblems) -> dict[str, str]:
    """A ``word = "CODE"`` section's valid lines; each invalid one added to ``problems``."""
    if name not in data:
        problems.add(f"{source}: [{name}]", "section is missing")
        return {}
    table = data[name]
    if not isinstance(table, dict):
        problems.add(f"{source}: [{name}]", 'must be a table of  word = "CODE"  lines')
        return {}
    if not table:
        problems.add(f"{source}: [{name}]", "section is empty")
        return {}
    pattern, what = _SECTIONS[name]
    out: dict[str, str] = {}
    for key, value in table.items():
        if not isinstance(value, str):
            problems.add(_where(source, name, key),
                         f"must be a quoted string ({what}), not {type(value).__name__}")
        elif name != "status_stock_effect" and not pattern.fullmatch(value):
            problems.add(_where(source, name, key), f"must be {what}")
        else:
            out[key] = value
    return out


def _sku_units(source: str, data: Mapping[str, Any], units: set[str], skus: set[str],
               measures: Mapping[str, str],
               problems: ConfigProblems | None = None) -> Mapping[str, SkuUnits]:
    """``[sku_units]``: every SKU of ``[products]`` has ``{ base = "CODE", OTHER = factor }``.
    Every mistake is added to ``problems`` (each unit of each SKU on its own: all named in
    one go, newcomer9); without ``problems`` the first raises ConfigError."""
    found = problems if problems is not None else ConfigProblems()
    mark = len(found.found)
    if "sku_units" not in data:
        raise ConfigError(f"{source}: [sku_units]", "section is missing")
    table = data["sku_units"]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [sku_units]",
                          'must be a table of  SKU = { base = "UNIT", BOX = 12 }  lines')
    out: dict[str, SkuUnits] = {}
    for sku, entry in table.items():
        where = _where(source, "sku_units", sku)
        if sku not in skus:
            found.add(where, "not an ERP SKU produced by [products] (a typo?)")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("base"), str):
            found.add(where, 'must be { base = "UNIT", OTHER = factor, ... }')
            continue
        entry_mark = len(found.found)
        base = entry["base"]
        if base not in units:
            found.add(f"{where}.base", f"{base!r} is not an ERP unit code produced by [units]")
        declared: dict[str, Decimal] = {}
        for code, value in entry.items():
            if code == "base":
                continue
            if code not in units:
                found.add(f"{where}.{code}", "not an ERP unit code produced by [units]")
                continue
            try:
                declared[code] = decimal_factor(value)
            except UnitProblem as exc:
                found.add(f"{where}.{code}", str(exc))
        if not found.clean_since(entry_mark):
            continue
        try:
            out[sku] = sku_units(base, declared, measures)
        except UnitProblem as exc:
            found.add(where, str(exc))
    for missing in sorted(skus - out.keys() - set(table)):
        found.add(_where(source, "sku_units", missing),
                  "missing: every SKU in [products] needs a base unit")
    if problems is None:
        found.raise_if_any()
    elif not found.clean_since(mark):
        return MappingProxyType({})
    return MappingProxyType(out)


def _normalised_keys(source: str, name: str, table: dict[str, str],
                     problems: ConfigProblems) -> Mapping[str, str]:
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for key, value in table.items():
        word = normalise_word(key)
        if word in out and out[word] != value:
            problems.add(_where(source, name, key),
                         f"same word as {first[word]!r} (matching ignores case and "
                         f"spaces) but a different ERP code")
            continue
        out[word] = value
        first.setdefault(word, key)
    return MappingProxyType(out)


def _phone(source: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``[phone]``: ``default_region = "CN"``, ``no_number = ["无", "-", ...]`` (optional)."""
    table = data.get("phone", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [phone]", "must be a table")
    for key in table:
        if key not in ("default_region", "no_number"):
            raise ConfigError(_where(source, "phone", key),
                              "unknown key; expected default_region, no_number")
    region = table.get("default_region", DEFAULT_PHONE_REGION)
    if not isinstance(region, str) or not _REGION.fullmatch(region):
        raise ConfigError(_where(source, "phone", "default_region"),
                          'must be a two-letter ISO 3166 region code such as "CN"')
    words = table.get("no_number", list(DEFAULT_NO_NUMBER))
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ConfigError(_where(source, "phone", "no_number"),
                          "must be a list of non-empty quoted words")
    return {"phone_region": region, "no_number": frozenset(normalise_word(w) for w in words)}


def _money(source: str, data: Mapping[str, Any], codes: set[str] | None) -> dict[str, Any]:
    """``[money]``: ``default_currency = "CNY"`` (optional; CNY when absent). ``codes`` are
    the ISO codes ``[currencies]`` produces (None when that section is invalid: not
    compared), so a typo (CYN) is caught here rather than stamped on every amount; the
    default when absent is not compared (a file written before the key existed loads as
    it did)."""
    table = data.get("money", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [money]", "must be a table")
    for key in table:
        if key != "default_currency":
            raise ConfigError(_where(source, "money", key),
                              "unknown key; expected default_currency")
    code = table.get("default_currency", DEFAULT_CURRENCY)
    where = _where(source, "money", "default_currency")
    if not isinstance(code, str) or not _CURRENCY.fullmatch(code):
        raise ConfigError(where, 'must be a three-letter ISO 4217 code such as "CNY"')
    if "default_currency" in table and codes is not None and code not in codes:
        raise ConfigError(where, f"{code} is not an ISO code produced by [currencies] "
                                 "(a typo?)")
    return {"default_currency": code}


def _unit_kinds(source: str, data: Mapping[str, Any], units: set[str]) -> Mapping[str, str]:
    """``[unit_kind]``: every ERP unit code of ``[units]`` -> countable | measured."""
    if "unit_kind" not in data:
        return MappingProxyType({})
    table = data["unit_kind"]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [unit_kind]", 'must be a table of  UNIT = "countable"')
    for unit, kind in table.items():
        if kind not in UNIT_KINDS:
            raise ConfigError(_where(source, "unit_kind", unit),
                              f"must be one of {', '.join(sorted(UNIT_KINDS))}")
        if unit not in units:
            raise ConfigError(_where(source, "unit_kind", unit),
                              "not an ERP unit produced by [units] (a typo?)")
    missing = sorted(units - table.keys())
    if missing:
        raise ConfigError(_where(source, "unit_kind", missing[0]),
                          "missing: every ERP unit in [units] needs a kind")
    return MappingProxyType(dict(table))
