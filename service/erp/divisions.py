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
longest first, accept an abbreviation (北京, 广东, 深圳, 朝阳) only when the next level confirms
it or nothing but a separator follows it (北京东路 is a street), and refuse with the candidates
when the text fits more than one place.

Abbreviations are derived from the list's own names, not typed by hand: the GB/T 2260 name
without its type word (省, 市, 自治区, 特别行政区; 地区, 盟, 市; 区, 新区, 县, 市, 旗) and, for
the autonomous regions, without the nationality before 自治区 (广西壮族自治区 -> 广西,
新疆维吾尔自治区 -> 新疆, 宁夏回族自治区 -> 宁夏), which is how the regions are named in
everyday writing. The one-character 简称 (京, 粤) are not read: 京 starts too many words.
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
# counties get one only where it stands alone (朝阳 alone is a road as often as a district: see
# _COUNTY_SUFFIX).
_CITY_SUFFIX = re.compile(r"地区$|盟$|市$")
# A county's abbreviation (朝阳 for 朝阳区, 浦东 for 浦东新区, 昆山 for 昆山市) is read only where
# nothing but the end of the address or a separator follows it, under a province or city written
# before it, and only when no sibling shares it: 北京市朝阳 is 朝阳区, 北京市朝阳路 is a street.
# Autonomous counties and banners get none (as autonomous prefectures), nor one-character stems
# (城区, 矿区, 古县: the stem alone says nothing).
_COUNTY_SUFFIX = re.compile(r"新区$|区$|县$|市$|旗$")
# Standalone: where an abbreviation may end without the next level confirming it.
_STANDALONE_END = re.compile(r"$|[\s,，、]")
_TOKEN = re.compile(r"[^\s,，、]*")
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
        # Abbreviations read standalone (北京, 广东, 深圳): several places with one (吉林 is a
        # province and a city; 朝阳 a city and, abbreviated, districts) make the address
        # ambiguous, never a guess.
        self.by_short: dict[str, list[Division]] = {}
        for d in self.provinces + self.cities:
            if d.short and d.short != d.name:
                self.by_short.setdefault(d.short, []).append(d)
        # Every county and city by its full name (the check that a written district belongs to
        # the province or city before it) and counties by their stems (朝阳 -> 朝阳区 ...).
        self._named_by_first = _by_first(self.cities + self.counties, shorts=False)
        self.county_stems: dict[str, list[Division]] = {}
        for d in self.counties:
            stem = _county_stem(d.name)
            if stem and d.parent is not None and stem not in (d.parent.name, d.parent.short):
                self.county_stems.setdefault(stem, []).append(d)
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
        # A parent's counties by stem, for the stems no sibling shares.
        self._district_stems: dict[tuple[str, str], dict[str, Division]] = {}
        for k, v in self.children.items():
            stems: dict[str, list[Division]] = {}
            for d in v:
                stem = _county_stem(d.name) if d.level == 3 else None
                if d.parent is not None and stem in (d.parent.name, d.parent.short):
                    stem = None  # 乌鲁木齐 under 乌鲁木齐市 is the city, not 乌鲁木齐县
                if stem:
                    stems.setdefault(stem, []).append(d)
            self._district_stems[k] = {s: ds[0] for s, ds in stems.items() if len(ds) == 1}

    def _add(self, d: Division) -> Division:
        self.all.append(d)
        if d.parent is not None:
            self.children.setdefault(_key(d.parent), []).append(d)
        if d.code not in self.by_code or d.level < self.by_code[d.code].level:
            self.by_code[d.code] = d
        return d

    def parents_of(self, name: str) -> list[str]:
        """Where the divisions named ``name`` are (a refusal's reason: 朝阳区 is in 北京市,
        吉林省长春市), each parent's path once, in table order.

        Computed when asked, not kept: a refused address is rare, and a table of every
        name's parent paths held ~0.7 MiB of each consumer for life."""
        out: list[str] = []
        for d in self.all:
            if d.name == name and d.parent is not None and d.parent.path not in out:
                out.append(d.parent.path)
        return out

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
        text win; the street is what follows. An abbreviation (北京, 广东, 深圳) is a reading
        when the next level confirms it (广东深圳南山区) or when it stands alone: nothing, a
        space or a comma follows (广东, 北京 建国路88号, 浙江杭州); 北京东路 stays unread.
        An abbreviation standing alone that several places share (吉林: the province and the
        city) gives all of them.
        """
        start = _PREFIX.match(text)
        pos = start.end() if start else 0
        found: list[Match] = []
        for p, end, short in self._names(text, pos,
                                         self._provinces_by_first.get(text[pos:pos + 1], [])):
            below = self._below_province(text, end, p)
            if below:
                found += below
            elif not short or self._alone(text, end, p):
                found.append(Match(p, end))
        if not found:
            # No province written: a city or a county named in full, anywhere in the country.
            first = text[pos:pos + 1]
            for c, end, short in self._names(text, pos, self._cities_by_first.get(first, [])):
                below = self._below_city(text, end, c)
                if below:
                    found += below
                elif not short or self._alone(text, end, c):
                    found.append(Match(c, end))
            for d, end, _ in self._names(text, pos, self._counties_by_first.get(first, []),
                                         abbreviations=False):
                found.append(Match(d, end))
        if not found:  # an abbreviation alone that several places share: 吉林, 朝阳
            token = _token(text, pos)
            found = [Match(d, pos + len(token))
                     for d in self.by_short.get(token, []) + self.county_stems.get(token, [])]
        if not found:
            return [], pos
        best = max(m.end for m in found)
        unique: dict[tuple[str, str], Match] = {}
        for m in found:
            if m.end == best:
                unique.setdefault((m.division.code, m.division.path), m)
        return list(unique.values()), pos

    def _alone(self, text: str, end: int, d: Division) -> bool:
        """Whether the abbreviation of ``d`` ending at ``end`` stands alone and is d's only.

        A province's abbreviation is what a bare 海南 or 广东 means (乌海市海南区 is written
        in full or under its city); a city's must not also be a county's (朝阳: 辽宁省朝阳市,
        北京市朝阳区 ...)."""
        return (_STANDALONE_END.match(text, end) is not None
                and len(self.by_short.get(d.short or "", ())) == 1
                and (d.level == 1 or d.short not in self.county_stems))

    def abbreviation_at(self, text: str, pos: int) -> Division | None:
        """A province or city whose abbreviation starts ``text[pos:]`` (for a refusal's
        reason: 北京 in 北京东路100号), or None."""
        for d in self._provinces_by_first.get(text[pos:pos + 1], []) + \
                self._cities_by_first.get(text[pos:pos + 1], []):
            if d.short and text.startswith(d.short, pos):
                return d
        return None

    def foreign_at(self, text: str, pos: int, inside: Division) -> Division | None:
        """A city or district named at ``text[pos:]`` (after separators) that is not below
        ``inside``: 朝阳区 in 上海市朝阳区. Full names of the list, or a county's or city's
        abbreviation standing alone (上海市朝阳, 上海市杭州); None when the text starts with
        neither (朝阳路, 人民路100号).

        Only the text right after a match that stopped above the district level is asked:
        a match that took the division would have consumed it.
        """
        pos = _skip(text, pos)
        for d in self._named_by_first.get(text[pos:pos + 1], []):
            if text.startswith(d.name, pos) and not _generic(d.name) \
                    and not _is_below(d, inside):
                return d
        token = _token(text, pos)
        for d in self.county_stems.get(token, []) + self.by_short.get(token, []):
            if not _is_below(d, inside) and not _is_below(inside, d):
                return d
        return None

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
            elif not short or _STANDALONE_END.match(text, end):  # 浙江杭州: one in 浙江
                out.append(Match(c, end))
        if not out:  # the city left out: 青海省共和县
            for c in self.children.get(_key(p), []):
                out += self._districts(text, pos, c)
        return out

    def _below_city(self, text: str, pos: int, c: Division) -> list[Match]:
        return self._districts(text, _skip(text, pos), c)

    def _districts(self, text: str, pos: int, parent: Division) -> list[Match]:
        kids = self._districts_by_first.get(_key(parent), {}).get(text[pos:pos + 1], [])
        out = [Match(d, end) for d, end, _ in self._names(text, pos, kids, abbreviations=False)]
        if not out:
            token = _token(text, pos)
            d = self._district_stems.get(_key(parent), {}).get(token)
            if d is not None:
                out.append(Match(d, pos + len(token)))
        return out

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


def _by_first(divisions: list[Division], shorts: bool = True) -> dict[str, list[Division]]:
    out: dict[str, list[Division]] = {}
    for d in divisions:
        for form in {d.name[:1], (d.short if shorts and d.short else d.name)[:1]}:
            out.setdefault(form, []).append(d)
    return out


def _county_stem(name: str) -> str | None:
    """朝阳区 -> 朝阳, 浦东新区 -> 浦东, 昆山市 -> 昆山; None for autonomous counties and
    banners and for one-character stems (城区, 古县)."""
    if "自治" in name:
        return None
    stem = _COUNTY_SUFFIX.sub("", name)
    return stem if len(stem) >= 2 and stem != name else None


def _generic(name: str) -> bool:
    """城区, 郊区, 矿区, 东区 (Hong Kong, Taiwan): names too common in street addresses (an
    estate's 东区) to say a district was written."""
    return len(name) == 2 and name.endswith("区")


def _is_below(d: Division, inside: Division) -> bool:
    node: Division | None = d
    while node is not None:
        if _key(node) == _key(inside):
            return True
        node = node.parent
    return False


def _token(text: str, pos: int) -> str:
    """The text from ``pos`` to the next separator or the end."""
    m = _TOKEN.match(text, pos)
    return m.group() if m else ""


def _key(d: Division) -> tuple[str, str]:
    return (d.code, d.name)


def _skip(text: str, pos: int) -> int:
    m = _SEPARATORS.match(text, pos)
    return m.end() if m else pos


@cache
def divisions() -> Divisions:
    """The loaded table (about 3,300 divisions; loaded once, on first use)."""
    return Divisions()
