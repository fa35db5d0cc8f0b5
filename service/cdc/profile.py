"""Source mapping: which CRM tables and columns feed which canonical fields.

A *source profile* is a TOML file (the demo CRM's is ``service/profiles/demo.toml``, the
default; BottleCRM's is ``service/profiles/bottlecrm.toml``; setting
``CRM_ERP_SYNC_SOURCE_PROFILE`` names a shipped profile or a file path). It declares, per
canonical entity, the CRM table, its key columns (any type; composite allowed), the column
holding the customer's key (the partition key), which CRM column feeds which canonical field,
what counts as a delete (a real DELETE, plus an optional flag such as ``is_active = false``)
and an optional tenant row filter (a PostgreSQL 15 publication row filter, also applied to
snapshot reads). The producer compiles it into its publication, snapshot queries and events;
nothing else in the producer names a CRM table.

Entities (table sections)::

    [customer]      the customer; its key is the partition key of every sales event
    [order]         order header; ``customer`` = the column holding the customer's key
    [order_line]    order line; ``order`` = the column holding the order's key; optional
                    ``customer`` where the line carries its customer's key. A line table
                    without it is partitioned through its order (the producer keeps an
                    order -> customer map; see ``service.cdc.events.References``)
    [market_demand] market feedback (optional)
    [product]       reference data (optional): lets a line name its product by reference
                    (``product_code = { ref = "product", column = "product_id" }``); product
                    changes are captured for that and are not published on their own

Keys travel as text: one key column -> its PostgreSQL text form (``42``,
``0b6e…-…``); several -> a JSON array of the text forms (``["42","1"]``).

Errors: ``ConfigError(<file> [<entity>].<key>, problem)`` for anything malformed or unknown.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

from service.errors import ConfigError, ConfigProblems

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# Canonical fields per entity and their value kind in the events ("text" values are the CRM's
# text as typed; numbers travel as their exact decimal text so no scale is ever lost and a
# NaN reaches the consumer, which refuses it with a dead letter).
TEXT, DATE, TIMESTAMP = "text", "date", "timestamp"
CANONICAL_FIELDS: dict[str, dict[str, str]] = {
    "customer": {
        "full_name": TEXT, "family_name": TEXT, "given_name": TEXT, "middle_name": TEXT,
        "name_order": TEXT, "gender": TEXT, "birth_date": DATE, "phone": TEXT, "email": TEXT,
        "address": TEXT, "street": TEXT, "city": TEXT, "region": TEXT, "postcode": TEXT,
        "country": TEXT, "currency": TEXT, "purchase_frequency": TEXT, "purchase_amount": TEXT,
        "product_preference": TEXT, "notes": TEXT,
    },
    "order": {
        "order_no": TEXT, "order_date": DATE, "status": TEXT, "currency": TEXT,
        "total_amount": TEXT,
    },
    "order_line": {
        "product_code": TEXT, "product_name": TEXT, "quantity": TEXT, "unit": TEXT,
        "unit_price": TEXT,
    },
    "market_demand": {
        "kind": TEXT, "product_category": TEXT, "content": TEXT, "observed_at": TIMESTAMP,
    },
    "product": {"code": TEXT, "name": TEXT},
}
REQUIRED_ENTITIES = ("customer", "order", "order_line")
# Which event kind (schemas/<kind>/) each entity's changes are published as.
EVENT_KIND = {"customer": "customer", "order": "order", "order_line": "order",
              "market_demand": "market_demand"}
_SQL_WORDS = {"and", "or", "not", "is", "null", "true", "false", "in", "like", "ilike",
              "between", "any", "all", "distinct", "from", "text", "uuid", "int", "integer",
              "bigint", "boolean", "date", "timestamp", "timestamptz", "varchar", "numeric"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


@dataclass(frozen=True)
class Reference:
    """A canonical field whose value comes from another entity: ``column`` holds that
    entity's key, and the value is that entity's canonical field ``field``."""

    entity: str
    column: str
    field: str


@dataclass(frozen=True)
class Const:
    """A canonical field this CRM does not hold but whose value is the same for every row
    (a CRM without units on its lines: ``unit = { const = "个" }``)."""

    value: str


@dataclass(frozen=True)
class DeleteFlag:
    """A row whose ``column`` equals ``equals`` counts as deleted (a soft delete)."""

    column: str
    equals: Any

    def matches(self, row: Mapping[str, Any]) -> bool:
        return bool(row.get(self.column) == self.equals)


@dataclass(frozen=True)
class EntityMapping:
    entity: str
    table: str  # schema-qualified
    key: tuple[str, ...]
    fields: Mapping[str, str | Reference | Const]  # canonical field -> CRM column, ...
    customer_column: str | None = None  # order: the column holding the customer's key
    order_column: str | None = None  # order_line: the column holding the order's key
    deleted_when: DeleteFlag | None = None
    row_filter: str | None = None

    @property
    def kind(self) -> str | None:
        """The event kind this entity's changes are published as (None: not published)."""
        return EVENT_KIND.get(self.entity)

    @cached_property
    def columns(self) -> tuple[str, ...]:
        """Every CRM column the events need (keys, references, fields, the delete flag)."""
        cols: list[str] = list(self.key)
        for c in (self.customer_column, self.order_column,
                  self.deleted_when.column if self.deleted_when else None):
            if c:
                cols.append(c)
        for source in self.fields.values():
            if isinstance(source, Reference):
                cols.append(source.column)
            elif isinstance(source, str):
                cols.append(source)
        return tuple(dict.fromkeys(cols))

    @property
    def filter_columns(self) -> list[str]:
        """Columns the row filter names (for ``setup --check``): its identifiers outside
        quoted literals, less SQL words and function names. A heuristic, not a SQL parser:
        the filter is the operator's own small boolean expression (org_id = '…')."""
        if self.row_filter is None:
            return []
        bare = re.sub(r"'(?:[^']|'')*'", " ", self.row_filter)
        words = re.findall(r'"([^"]+)"|([A-Za-z_][A-Za-z0-9_$]*)(\s*\()?', bare)
        out = [quoted or word for quoted, word, call in words if not call]
        return list(dict.fromkeys(w for w in out if w.casefold() not in _SQL_WORDS))

    def key_text(self, row: Mapping[str, Any]) -> str:
        """The entity's key as text (see module doc). Raises KeyError for a missing column."""
        key = self.key
        if len(key) == 1:  # most keys: no list, no call for a text value
            value = row[key[0]]
            return value if type(value) is str else text_of(value)
        return key_text([row[c] for c in key])

    def missing(self) -> list[str]:
        """Canonical fields this CRM does not have (published as null)."""
        return [f for f in CANONICAL_FIELDS[self.entity] if f not in self.fields]


def text_of(value: Any) -> str:
    """A Python value converted from PostgreSQL text, back to that text form."""
    if type(value) is int:  # the usual key (bool is an int too, and is not this)
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    if isinstance(value, Decimal):
        return format(value, "f")  # PostgreSQL's numeric text: 0.00000001, never 1E-8
    return str(value)


def key_text(values: list[Any]) -> str:
    """One value's text, or a JSON array of the values' texts (a composite key).

    A composite key whose texts are all ASCII letters and digits (ids, line numbers) is
    written without ``json.dumps``: such a text needs no escaping, so the array is the same
    string, at a tenth of the cost (the capture burst's order lines spent ~3% of the
    producer's time in ``json.dumps``)."""
    if len(values) == 1:
        return text_of(values[0])
    texts = [text_of(v) for v in values]
    if all(t.isascii() and t.isalnum() for t in texts):
        return '["' + '","'.join(texts) + '"]'
    return json.dumps(texts, ensure_ascii=False, separators=(",", ":"))


def key_values(entity: EntityMapping, text: str) -> list[str]:
    """Inverse of key_text: the key columns' text values. Raises ValueError when malformed."""
    if len(entity.key) == 1:
        return [text]
    values = json.loads(text)
    if not (isinstance(values, list) and len(values) == len(entity.key)
            and all(isinstance(v, str) for v in values)):
        raise ValueError(f"a key of {entity.table} is a JSON array of {len(entity.key)} strings")
    return values


@dataclass(frozen=True)
class SourceProfile:
    name: str
    path: Path
    entities: Mapping[str, EntityMapping]
    description: str = ""
    by_table: Mapping[str, EntityMapping] = field(default_factory=dict)

    def entity(self, name: str) -> EntityMapping | None:
        return self.entities.get(name)

    def table(self, table: str) -> EntityMapping | None:
        return self.by_table.get(table)

    @property
    def tables(self) -> list[str]:
        return [e.table for e in self.entities.values()]

    @cached_property
    def lines_need_orders(self) -> bool:
        """Whether a line's event can need its order's customer key from outside its own
        transaction: the line table does not carry the customer (BottleCRM's), so the
        producer remembers each order's customer (``events.References``). The demo's lines
        carry it, and a producer need not hold 50,000 orders' keys it never reads."""
        line = self.entities.get("order_line")
        return line is not None and line.customer_column is None

    @property
    def snapshot_entities(self) -> list[EntityMapping]:
        """In snapshot order: reference data first, then customers, orders (with their lines),
        market demand."""
        order = ("product", "customer", "order", "market_demand")
        return [self.entities[n] for n in order if n in self.entities]


FILTER_PROBLEM = "must be a SQL boolean expression"


def _is_filter(value: Any) -> bool:
    return value is None or (isinstance(value, str) and bool(value.strip()))


def _where(path: Path, entity: str | None, key: str | None = None) -> str:
    spot = f"[{entity}]" if entity else ""
    if key:
        spot = f"{spot}.{key}" if spot else key
    return f"{path} {spot}".strip()


def _table_name(path: Path, entity: str, value: Any) -> str:
    if not isinstance(value, str) or not all(_IDENT.fullmatch(p) for p in value.split(".")) \
            or value.count(".") != 1:
        raise ConfigError(_where(path, entity, "table"),
                          "must be a schema-qualified table name such as public.accounts")
    return value


def _column(path: Path, entity: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise ConfigError(_where(path, entity, key), "must be a column name")
    return value


def _field(path: Path, name: str, canonical: str, source: Any) -> str | Reference | Const:
    """One ``fields.<canonical>`` line of entity ``name``. Raises ConfigError."""
    spot = f"fields.{canonical}"
    known = CANONICAL_FIELDS[name]
    if canonical not in known:
        raise ConfigError(_where(path, name, spot),
                          f"not a canonical {name} field; known: {', '.join(known)}")
    if isinstance(source, dict) and set(source) == {"const"}:
        if known[canonical] != TEXT or not isinstance(source["const"], str):
            raise ConfigError(_where(path, name, spot + ".const"),
                              "a constant is text, for a text field")
        return Const(source["const"])
    if isinstance(source, dict):
        if set(source) != {"ref", "column"} and set(source) != {"ref", "column", "field"}:
            raise ConfigError(_where(path, name, spot),
                              "a reference is { ref = <entity>, column = <column> }")
        ref = source["ref"]
        if ref not in CANONICAL_FIELDS or ref == name:
            raise ConfigError(_where(path, name, spot + ".ref"), f"unknown entity {ref!r}")
        ref_field = source.get("field", "code" if ref == "product" else canonical)
        if ref_field not in CANONICAL_FIELDS[ref]:
            raise ConfigError(_where(path, name, spot + ".field"),
                              f"not a canonical {ref} field")
        return Reference(ref, _column(path, name, spot + ".column", source["column"]),
                         ref_field)
    return _column(path, name, spot, source)


def _key_columns(path: Path, name: str, key: Any) -> tuple[str, ...]:
    if not isinstance(key, list) or not key:
        raise ConfigError(_where(path, name, "key"), "must be a non-empty list of columns")
    return tuple(_column(path, name, "key", c) for c in key)


def _deleted_when(path: Path, name: str, flag: Any) -> DeleteFlag:
    if not isinstance(flag, dict) or set(flag) != {"column", "equals"}:
        raise ConfigError(_where(path, name, "deleted_when"),
                          "must be { column = <column>, equals = <value> }")
    return DeleteFlag(_column(path, name, "deleted_when.column", flag["column"]),
                      flag["equals"])


def _links(path: Path, name: str, raw: dict[str, Any]) -> tuple[str | None, str | None]:
    """(customer column, order column) of entity ``name``. Raises ConfigError."""
    customer_col = order_col = None
    if name == "order":
        if "customer" not in raw:
            raise ConfigError(_where(path, name, "customer"),
                              "required: the column holding the customer's key")
        customer_col = _column(path, name, "customer", raw["customer"])
    elif name == "order_line" and "customer" in raw:
        # A line table that carries its customer: no order lookup needed for line-only changes.
        customer_col = _column(path, name, "customer", raw["customer"])
    elif "customer" in raw:
        raise ConfigError(_where(path, name, "customer"),
                          "only [order] and [order_line] name their customer")
    if name == "order_line":
        if "order" not in raw:
            raise ConfigError(_where(path, name, "order"),
                              "required: the column holding the order's key")
        order_col = _column(path, name, "order", raw["order"])
    elif "order" in raw:
        raise ConfigError(_where(path, name, "order"), "only [order_line] names its order")
    return customer_col, order_col


def _entity(path: Path, name: str, raw: Any, default_filter: str | None,
            problems: ConfigProblems) -> EntityMapping | None:
    """Entity ``name``'s section, or None with every problem found in it added to
    ``problems`` (each setting checked on its own, so that all are named in one go)."""
    if not isinstance(raw, dict):
        problems.add(_where(path, name), "must be a table of settings")
        return None
    mark = len(problems.found)
    allowed = {"table", "key", "fields", "customer", "order", "deleted_when", "row_filter"}
    for unknown in sorted(set(raw) - allowed):
        problems.add(_where(path, name, unknown),
                     f"unknown setting; known: {', '.join(sorted(allowed))}")
    table: str = ""
    key_cols: tuple[str, ...] = ()
    with problems.gather():
        table = _table_name(path, name, raw.get("table"))
    with problems.gather():
        key_cols = _key_columns(path, name, raw.get("key"))
    raw_fields = raw.get("fields", {})
    fields: dict[str, str | Reference | Const] = {}
    if not isinstance(raw_fields, dict):
        problems.add(_where(path, name, "fields"), "must be a table of field = column")
        raw_fields = {}
    for canonical, source in raw_fields.items():
        with problems.gather():
            fields[canonical] = _field(path, name, canonical, source)
    deleted_when = None
    if "deleted_when" in raw:
        with problems.gather():
            deleted_when = _deleted_when(path, name, raw["deleted_when"])
    row_filter = raw.get("row_filter", default_filter)
    # the [source] default is checked (and named) once by the caller
    if "row_filter" in raw and not _is_filter(row_filter):
        problems.add(_where(path, name, "row_filter"), FILTER_PROBLEM)
    customer_col: str | None = None
    order_col: str | None = None
    with problems.gather():
        customer_col, order_col = _links(path, name, raw)
    if not problems.clean_since(mark):
        return None
    return EntityMapping(name, table, key_cols, fields, customer_col, order_col, deleted_when,
                         row_filter)


def load_profile(name_or_path: str | Path) -> SourceProfile:
    """A shipped profile by name (``demo``, ``bottlecrm``) or a TOML file by path.

    Raises ConfigError naming the file and key for anything missing, unknown or malformed.
    """
    text = str(name_or_path)
    path = Path(text)
    if not text.endswith(".toml") and "/" not in text:
        path = PROFILES_DIR / f"{text}.toml"
        if not path.exists():
            shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
            raise ConfigError("CRM_ERP_SYNC_SOURCE_PROFILE",
                              f"no shipped profile {text!r}; shipped: {', '.join(shipped)}, "
                              "or give a path to a .toml file")
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the source profile: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    problems = ConfigProblems()  # every mistake in one go (each section checked on its own)
    source = raw.get("source", {})
    if not isinstance(source, dict):
        problems.add(_where(path, "source"), "must be a table")
        source = {}
    for unknown in sorted(set(raw) - {"source", *CANONICAL_FIELDS}):
        problems.add(_where(path, unknown),
                     f"unknown section; known: source, {', '.join(CANONICAL_FIELDS)}")
    default_filter = source.get("row_filter")
    if "row_filter" in source and not _is_filter(default_filter):
        problems.add(_where(path, "source", "row_filter"), FILTER_PROBLEM)
        default_filter = None  # named once, where it was written, not under each section
    entities: dict[str, EntityMapping] = {}
    broken: set[str] = set()
    for name in CANONICAL_FIELDS:
        if name in raw:
            entity = _entity(path, name, raw[name], default_filter, problems)
            if entity is None:
                broken.add(name)
            else:
                entities[name] = entity
        elif name in REQUIRED_ENTITIES:
            problems.add(_where(path, name), "required section is missing")
    customer, order = entities.get("customer"), entities.get("order")
    if customer is not None and len(customer.key) != 1:
        problems.add(_where(path, "customer", "key"),
                     "one column: orders name their customer by it")
    if order is not None and len(order.key) != 1:
        problems.add(_where(path, "order", "key"), "one column: lines name their order by it")
    for ent in entities.values():
        for canonical, src in ent.fields.items():
            # a reference to a section that is there but broken was reported as that section
            if isinstance(src, Reference) and src.entity not in entities \
                    and src.entity not in broken:
                problems.add(_where(path, ent.entity, f"fields.{canonical}.ref"),
                             f"refers to [{src.entity}], which this profile lacks")
    tables = [e.table for e in entities.values()]
    if len(set(tables)) != len(tables):
        problems.add(_where(path, None, "table"), "each entity needs its own table")
    problems.raise_if_any()
    return SourceProfile(str(source.get("name", path.stem)), path, entities,
                         str(source.get("description", "")),
                         {e.table: e for e in entities.values()})
