"""China's administrative divisions (GB/T 2260 codes) and a longest-match address parser.

Data: ``service/erp/data/`` holds the National Bureau of Statistics' 2023 "统计用区划代码"
(cut-off 2023-06-30, published 2023-09-11) as published, unchanged, by the
modood/Administrative-divisions-of-China project (``provinces.csv``, ``cities.csv``,
``areas.csv``; WTFPL licence), plus that project's ``HK-MO-TW.json`` (district names of Hong
Kong, Macao and Taiwan, which have no codes below the province level in GB/T 2260). The six-
digit county-level codes of that list are the GB/T 2260 codes; two kinds of row are not
administrative divisions and are left out when loading: county codes 71-80 (development zones
and industrial parks, "经济技术开发区" and the like, numbered by the NBS only) and the NBS
placeholder "省直辖县级行政区划" (its counties, 仙桃市 and the like, take the city's place).
See ``data/SOURCE.md`` for how to refresh the files.

Why the parser is our own (about 150 lines) and not a library: jionlp's ``parse_location``
(evaluated at 1.5.31: data of 2023-04, a 16.5 MB wheel pulling numpy and jiojio, 148 MB
installed, a banner printed on import) guesses where it should refuse - it reads
``北京东路100号`` as 北京市 and returns a bare county for ``朝阳区建国路`` without saying that
two cities have one - and gives no code for an ambiguous match; ``cpca`` carries 2021 data
and pandas. What we need is narrow: match the start of an address against the official names,
longest first, accept an abbreviation (北京, 广东, 深圳) only when the next level confirms it,
and refuse with the candidates when the text fits more than one place.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

DATA_DIR: Final = Path(__file__).resolve().parent / "data"
DATA_VERSION: Final = "NBS 统计用区划代码 2023 (cut-off 2023-06-30)"


@dataclass(frozen=True, slots=True)
class Division:
    code: str                 # six digits (GB/T 2260)
    name: str                 # official full name: 深圳市, 南山区, 海南藏族自治州
    level: int                # 1 province, 2 city, 3 county/district
    province: str
    city: str | None          # the ERP's city: a municipality's own name for its districts
    parent: Division | None
    short: str | None = None  # accepted abbreviation (北京, 广东, 深圳) or None

    def __repr__(self) -> str:  # keeps test output and error messages short
        return f"{self.path} ({self.code})"

    @property
    def path(self) -> str:
        parts = [self.province]
        if self.city and self.city != self.province:
            parts.append(self.city)
        if self.level == 3:
            parts.append(self.name)
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class Match:
    division: Division
    end: int                  # where the street part starts


_SPECIAL = ("香港特别行政区", "澳门特别行政区")
_MUNICIPALITIES = ("北京市", "天津市", "上海市", "重庆市")
_MUNICIPALITY_CITY_TOKENS: Final = ("市辖区", "县")  # NBS names of a municipality's city level
_PROVINCE_SUFFIX = re.compile(r"(?:壮族|回族|维吾尔)?自治区$|特别行政区$|省$|市$")
# An abbreviation drops the type of the division. Autonomous prefectures get none (where the
# place name ends and the nationalities begin is not marked: 海南|藏族, 黔东南|苗族侗族) and
# counties get none (朝阳 alone is a road as often as a district).
_CITY_SUFFIX = re.compile(r"地区$|盟$|市$")
_SEPARATORS = re.compile(r"[\s,，、]*")
_PREFIX = re.compile(r"\s*(?:\d{6}\s*)?(?:中华人民共和国|中国)?[\s,，、]*")


class Divisions:
    """The division tree, indexed by every accepted written form."""

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        self.by_code: dict[str, Division] = {}
        self.all: list[Division] = []
        self.children: dict[tuple[str, str], list[Division]] = {}
        self._load(data_dir)
        self.provinces = [d for d in self.all if d.level == 1]
        self.cities = [d for d in self.all if d.level == 2]
        self.counties = [d for d in self.all if d.level == 3]
        # By first character: an address without its province is matched against these.
        self._cities_by_first = _by_first(self.cities)
        self._counties_by_first = _by_first(self.counties)
        # The same for every list parsing scans (provinces, a division's children, its
        # districts): a customer's address is parsed for each change whose value is not in the
        # parse cache, and scanning every province and every child with startswith was most of
        # it. A bucket keeps its list's order, so the readings come out as from the full list.
        self._provinces_by_first = _by_first(self.provinces)
        self._children_by_first = {k: _by_first(v) for k, v in self.children.items()}
        self._districts_by_first = {k: _by_first([d for d in v if d.level == 3])
                                    for k, v in self.children.items()}

    def _add(self, d: Division) -> Division:
        self.all.append(d)
        if d.parent is not None:
            self.children.setdefault(_key(d.parent), []).append(d)
        if d.code not in self.by_code or d.level < self.by_code[d.code].level:
            self.by_code[d.code] = d
        return d

    def _load(self, data_dir: Path) -> None:
        def rows(name: str) -> list[dict[str, str]]:
            with open(data_dir / name, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))

        provinces: dict[str, Division] = {}
        for r in rows("provinces.csv"):
            name = r["name"]
            p = self._add(Division(r["code"] + "0000", name, 1, name,
                                   name if name in _MUNICIPALITIES else None, None,
                                   _PROVINCE_SUFFIX.sub("", name) or None))
            provinces[r["code"]] = p
        cities: dict[str, Division] = {}
        municipal: dict[str, Division] = {}
        for r in rows("cities.csv"):
            p = provinces[r["provinceCode"]]
            name = r["name"]
            if name in _MUNICIPALITY_CITY_TOKENS:
                municipal[r["code"]] = p        # the districts hang off the province itself
            elif "直辖县级行政区划" in name:
                cities[r["code"]] = p           # its counties act as cities
            else:
                cities[r["code"]] = self._add(Division(
                    r["code"] + "00", name, 2, p.name, name, p,
                    _CITY_SUFFIX.sub("", name) or None))
        for r in rows("areas.csv"):
            code, name = r["code"], r["name"]
            if 71 <= int(code[4:]) <= 80:
                continue  # an NBS-only development-zone code, not a division
            if r["cityCode"] in municipal:
                p = municipal[r["cityCode"]]
                self._add(Division(code, name, 3, p.name, p.name, p))
                continue
            parent = cities[r["cityCode"]]
            if parent.level == 1:               # 省直辖: 仙桃市, 神农架林区, 济源市
                self._add(Division(code, name, 2, parent.name, name, parent,
                                   _CITY_SUFFIX.sub("", name) or None))
            elif code.endswith("00"):
                continue                        # 东莞市 under 东莞市: no district level
            else:
                self._add(Division(code, name, 3, parent.province, parent.name, parent))

        with open(data_dir / "HK-MO-TW.json", encoding="utf-8") as fh:
            extra: dict[str, dict[str, list[str]]] = json.load(fh)
        codes = {"香港特别行政区": "810000", "澳门特别行政区": "820000", "台湾省": "710000"}
        for pname, groups in extra.items():
            p = self._add(Division(codes[pname], pname, 1, pname,
                                   pname if pname in _SPECIAL else None, None,
                                   _PROVINCE_SUFFIX.sub("", pname) or None))
            for group, names in groups.items():
                parent = p
                if pname not in _SPECIAL:      # Taiwan: cities and counties with districts
                    parent = self._add(Division(p.code, group, 2, pname, group, p,
                                                _CITY_SUFFIX.sub("", group) or None))
                for name in names:
                    clean = re.sub(r"（.*?）", "", name)
                    self._add(Division(p.code, clean, 3, pname, parent.city or group, parent))

    # --- parsing --------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[list[Match], int]:
        """All best readings of the start of ``text`` (several when ambiguous), and the
        position after the skipped prefix (中国, a postcode).

        A reading is province, then city, then district, each optional below the first one
        written; levels may be separated by spaces or commas. Readings that consume the most
        text win; the street is what follows.
        """
        start = _PREFIX.match(text)
        pos = start.end() if start else 0
        found: list[Match] = []
        for p, end, short in self._names(text, pos,
                                         self._provinces_by_first.get(text[pos:pos + 1], [])):
            below = self._below_province(text, end, p)
            if below:
                found += below
            elif not short:
                found.append(Match(p, end))
        if not found:
            # No province written: a city or a county named in full, anywhere in the country.
            first = text[pos:pos + 1]
            for c, end, short in self._names(text, pos, self._cities_by_first.get(first, [])):
                below = self._below_city(text, end, c)
                if below:
                    found += below
                elif not short:
                    found.append(Match(c, end))
            for d, end, _ in self._names(text, pos, self._counties_by_first.get(first, []),
                                         abbreviations=False):
                found.append(Match(d, end))
        if not found:
            return [], pos
        best = max(m.end for m in found)
        unique: dict[tuple[str, str], Match] = {}
        for m in found:
            if m.end == best:
                unique.setdefault((m.division.code, m.division.path), m)
        return list(unique.values()), pos

    def _below_province(self, text: str, pos: int, p: Division) -> list[Match]:
        pos = _skip(text, pos)
        if p.city == p.name:  # municipality or SAR: the city level may be written or not
            matches = self._districts(text, pos, p)
            for token in (*_MUNICIPALITY_CITY_TOKENS, p.name, p.short or p.name):
                if text.startswith(token, pos):
                    matches += self._districts(text, _skip(text, pos + len(token)), p)
            return matches
        out: list[Match] = []
        by_first = self._children_by_first.get(_key(p), {})
        for c, end, short in self._names(text, pos, by_first.get(text[pos:pos + 1], [])):
            if c.level != 2:
                continue
            below = self._below_city(text, end, c)
            if below:
                out += below
            elif not short:
                out.append(Match(c, end))
        if not out:  # the city left out: 青海省共和县
            for c in self.children.get(_key(p), []):
                out += self._districts(text, pos, c)
        return out

    def _below_city(self, text: str, pos: int, c: Division) -> list[Match]:
        return self._districts(text, _skip(text, pos), c)

    def _districts(self, text: str, pos: int, parent: Division) -> list[Match]:
        kids = self._districts_by_first.get(_key(parent), {}).get(text[pos:pos + 1], [])
        return [Match(d, end) for d, end, _ in self._names(text, pos, kids, abbreviations=False)]

    @staticmethod
    def _names(text: str, pos: int, candidates: list[Division], abbreviations: bool = True
               ) -> list[tuple[Division, int, bool]]:
        out = []
        for d in candidates:
            if text.startswith(d.name, pos):
                out.append((d, pos + len(d.name), False))
            elif abbreviations and d.short and text.startswith(d.short, pos):
                out.append((d, pos + len(d.short), True))
        return out


def _by_first(divisions: list[Division]) -> dict[str, list[Division]]:
    out: dict[str, list[Division]] = {}
    for d in divisions:
        for form in {d.name[:1], (d.short or d.name)[:1]}:
            out.setdefault(form, []).append(d)
    return out


def _key(d: Division) -> tuple[str, str]:
    return (d.code, d.name)


def _skip(text: str, pos: int) -> int:
    m = _SEPARATORS.match(text, pos)
    return m.end() if m else pos


@cache
def divisions() -> Divisions:
    """The loaded table (about 3,300 divisions; loaded once, on first use)."""
    return Divisions()
