"""Reconciliation: does the ERP hold what the CRM holds, on every mapped field?

Entity by entity, in two keyset-paginated passes (each chunk one index range scan, so a
million rows cost a thousand small queries, not a sort of the whole table): the CRM's rows in
the CRM's key order, each chunk compared with the ERP rows of exactly those keys (missing,
differing); then the ERP's live rows in the ERP's key order, each chunk checked for existence
in the CRM (extra). The CRM side is read through the source profile and goes through the
same code as the pipeline: the producer's snapshot read and ``build_events`` and the
consumer's ``to_erp`` with the current mappings, so "expected" means exactly what the sync
would write.

Each key ends in one of: ``missing`` (in the CRM, not live in the ERP), ``extra`` (live in the
ERP, gone from the CRM), ``differing`` (with the fields that differ) or ``unmappable`` (the
CRM row cannot be mapped: its event is a dead letter; fix the mapping or the CRM record).

With orders, stock is recounted from the ERP's own orders (``service.operator.stock``) and
SKUs whose totals drift are reported; ``--repair`` corrects them.

``--repair`` requests an ad-hoc snapshot of the missing and differing keys (the running
producer re-emits them, the consumers apply them: the normal path, with its position guard)
and marks extra rows deleted directly in the ERP, but only if the row still has the position
that was compared (a newer event wins). It then re-checks the drifted keys until they have
converged or the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from service.cdc.capture import (
    TableInfo,
    chunk_query,
    ensure_capture_objects,
    read_chunk,
    read_table_info,
    request_snapshot,
    typed_row,
)
from service.cdc.events import READ, References, RowChange, build_events, canonical
from service.cdc.profile import EntityMapping, SourceProfile, load_profile
from service.erp.apply import apply_stock_delta
from service.erp.changes import to_erp
from service.erp.mappings import Mappings
from service.errors import ConfigError, Permanent, SyncError
from service.operator.common import PgConn, connect
from service.operator.render import Progress
from service.operator.stock import StockRecount, recount
from service.settings import Settings


@dataclass(frozen=True)
class Entity:
    name: str
    source: str  # the canonical entity of the source profile
    erp_table: str
    erp_key: str
    fields: tuple[str, ...]


ENTITIES = {
    e.name: e for e in (
        Entity("customers", "customer", "erp.business_partners", "crm_customer_id",
               ("full_name", "gender_code", "birth_date", "phone_e164", "email", "province",
                "city", "district", "street", "purchase_frequency", "purchase_amount",
                "amount_currency", "product_preference", "notes", "phone_extension",
                "phone_others", "division_code")),
        Entity("orders", "order", "erp.sales_orders", "crm_order_id",
               ("order_no", "crm_customer_id", "order_date", "status_code", "currency")),
        Entity("demand", "market_demand", "erp.demand_signals", "crm_demand_id",
               ("signal_type", "product_category", "content", "observed_at")),
    )
}
ITEM_FIELDS = ("sku", "product_name", "quantity", "unit_code", "unit_price", "base_quantity",
               "base_unit")


@dataclass
class EntityReport:
    entity: str
    crm_rows: int = 0
    erp_rows: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differing: dict[str, list[str]] = field(default_factory=dict)
    unmappable: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def drift(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.differing) + len(self.unmappable)

    def merge(self, other: EntityReport) -> None:
        self.crm_rows += other.crm_rows
        self.erp_rows += other.erp_rows
        self.missing += other.missing
        self.extra += other.extra
        self.differing.update(other.differing)
        self.unmappable.update(other.unmappable)


@dataclass
class RepairReport:
    snapshots: dict[str, int] = field(default_factory=dict)  # entity -> snapshot id
    marked_deleted: dict[str, list[str]] = field(default_factory=dict)
    converged: bool = False
    waited_s: float = 0.0
    remaining: list[EntityReport] = field(default_factory=list)


@dataclass
class ReconcileReport:
    entities: list[EntityReport]
    repair: RepairReport | None = None
    stock: StockRecount | None = None
    """the stock recount, with orders: SKU totals against the ERP's own orders"""

    @property
    def stock_drift(self) -> int:
        """SKUs whose totals drift (0 once repaired), plus line groups that count nowhere."""
        if self.stock is None:
            return 0
        return len(self.stock.unconvertible) + (0 if self.stock.repaired
                                                else len(self.stock.drift))

    @property
    def drift(self) -> int:
        if self.repair is not None:
            return sum(e.drift for e in self.repair.remaining) + self.stock_drift
        return sum(e.drift for e in self.entities) + self.stock_drift


def _expected(entity: Entity, profile: SourceProfile, refs: References,
              crm_rows: list[dict[str, Any]], lines: list[dict[str, Any]], mappings: Mappings,
              report: EntityReport) -> dict[str, dict[str, Any]]:
    """key -> the mapped field values the sync would write for each CRM row."""
    ent = profile.entities[entity.source]
    line_ent = profile.entity("order_line")
    by_order: dict[str, list[dict[str, Any]]] = {}
    if line_ent is not None and line_ent.order_column is not None:
        for line in lines:
            by_order.setdefault(str(line[line_ent.order_column]), []).append(line)
    now = datetime.now(UTC)
    out: dict[str, dict[str, Any]] = {}
    for row in crm_rows:
        key = ent.key_text(row)
        changes = [RowChange(ent.table, READ, None, row)]
        if line_ent is not None:
            changes += [RowChange(line_ent.table, READ, None, li)
                        for li in by_order.get(key, [])]
        try:
            (event,) = build_events(changes, profile=profile, refs=refs, lsn=0, xid=0,
                                    commit_time=now, snapshot=True)
            if event.record["op"] == "DELETE":
                continue  # the profile's soft-delete flag: not expected live in the ERP
            change = to_erp(event.kind, event.record, mappings)
        except Permanent as exc:
            report.unmappable[key] = f"{type(exc).__name__}: {exc.reason}"
            continue
        except SyncError as exc:
            report.unmappable[key] = f"{type(exc).__name__}: {exc}"
            continue
        src = change.partner or change.header or change.demand
        values = {f: getattr(src, f) for f in entity.fields}
        if entity.name == "orders":
            values["items"] = {i.crm_line_id: tuple(getattr(i, f) for f in ITEM_FIELDS)
                               for i in change.items if not i.deleted}
        out[key] = values
    return out


def _actual(conn: PgConn, entity: Entity, where: str, params: list[Any]
            ) -> dict[str, dict[str, Any]]:
    cols = ", ".join((entity.erp_key, *entity.fields, "deleted", "source_lsn", "source_seq"))
    rows = conn.execute(f"SELECT {cols} FROM {entity.erp_table} WHERE {where}",
                        params).fetchall()
    out = {r[0]: dict(zip((*entity.fields, "deleted", "source_lsn", "source_seq"), r[1:],
                          strict=True)) for r in rows}
    for values in out.values():
        if "phone_others" in values:  # text[] (NULL when none) vs the mapped tuple
            values["phone_others"] = tuple(values["phone_others"] or ())
    if entity.name == "orders" and out:
        for values in out.values():
            values["items"] = {}
        for oid, line_id, *rest in conn.execute(
                f"SELECT crm_order_id, crm_line_id, {', '.join(ITEM_FIELDS)} "
                "FROM erp.sales_order_items WHERE crm_order_id = ANY(%s) AND NOT deleted",
                (list(out),)).fetchall():
            out[oid]["items"][line_id] = tuple(rest)
    return out


def _compare(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]],
             report: EntityReport) -> None:
    """Pass 1: every CRM key of a chunk against the ERP's row of that key."""
    for key in expected.keys() | actual.keys():
        if key in report.unmappable:
            continue
        want, have = expected.get(key), actual.get(key)
        if want is None:
            continue  # soft-deleted in the CRM: pass 2 checks the ERP row is not live
        if have is None or have["deleted"]:
            report.missing.append(key)
            continue
        fields = [f for f in want if want[f] != have.get(f)]
        if fields:
            report.differing[key] = fields


class Reconciler:
    def __init__(self, settings: Settings, chunk_size: int = 5000,
                 profile: SourceProfile | None = None) -> None:
        if chunk_size < 1:
            raise ConfigError("--chunk-size", "must be at least 1")
        self.settings = settings
        self.chunk_size = chunk_size
        self.mappings = Mappings.load(settings.mappings_file)
        self.profile = profile if profile is not None else load_profile(settings.source_profile)
        # Positions of extra rows as compared, for the guarded repair.
        self.positions: dict[str, dict[str, tuple[int, int]]] = {}
        self._tables: dict[str, TableInfo] = {}
        self._crm: PgConn | None = None
        self.refs = References(self._load_reference)

    def _load_reference(self, entity: str, key: str) -> dict[str, Any] | None:
        ent = self.profile.entity(entity)
        if ent is None or self._crm is None:
            return None
        info = self._tables[ent.table]
        query, params = chunk_query(info, after=None, keys=[key], limit=1)
        with self._crm.cursor(row_factory=dict_row) as cur:
            found = cur.execute(query, params).fetchone()
        return None if found is None else canonical(ent, typed_row(info, found), self.refs)

    def _open_crm(self, crm: PgConn) -> None:
        self._crm = crm
        if not self._tables:
            self._tables = read_table_info(crm, self.profile)

    def _source(self, entity: Entity) -> EntityMapping | None:
        return self.profile.entity(entity.source)

    def _live_in_crm(self, crm: PgConn, ent: EntityMapping, keys: list[str]) -> set[str]:
        """Which keys the CRM holds as live rows (present and not soft-deleted)."""
        found: set[str] = set()
        for start in range(0, len(keys), self.chunk_size):
            part = keys[start:start + self.chunk_size]
            head, _lines = read_chunk(crm, self._tables, self.profile, ent, after=None,
                                      keys=part, limit=len(part))
            found |= {ent.key_text(r) for r in head
                      if ent.deleted_when is None or not ent.deleted_when.matches(r)}
        return found

    def _extra_pass(self, crm: PgConn, erp: PgConn, entity: Entity, ent: EntityMapping,
                    report: EntityReport, keys: list[str] | None) -> None:
        """Pass 2: live ERP rows (all, or the given keys) whose CRM row is gone."""
        positions = self.positions.setdefault(entity.name, {})
        last: str | None = None
        while True:
            params: list[Any]
            if keys is not None:
                where, params = f"{entity.erp_key} = ANY(%s) AND NOT deleted", [keys]
            elif last is None:
                where, params = "NOT deleted", []
            else:
                where, params = f"NOT deleted AND {entity.erp_key} > %s", [last]
            rows = erp.execute(
                f"SELECT {entity.erp_key}, source_lsn, source_seq FROM {entity.erp_table} "
                f"WHERE {where} ORDER BY {entity.erp_key} LIMIT %s",
                [*params, self.chunk_size if keys is None else len(keys) or 1]).fetchall()
            if not rows:
                break
            live = self._live_in_crm(crm, ent, [r[0] for r in rows])
            for key, lsn, seq in rows:
                if key not in live and key not in report.unmappable:
                    report.extra.append(key)
                    positions[key] = (lsn, seq)
            if keys is not None:
                break
            last = rows[-1][0]

    def check(self, entity: Entity, progress: Callable[[int], None] | None = None
              ) -> EntityReport:
        """The whole entity, chunk by chunk, in key order (both passes)."""
        started = time.monotonic()
        report = EntityReport(entity.name)
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            self._open_crm(crm)
            ent = self._source(entity)
            if ent is None:
                return report  # this CRM has no such entity
            last: str | None = None
            while True:
                rows, lines = read_chunk(crm, self._tables, self.profile, ent, after=last,
                                         keys=None, limit=self.chunk_size)
                if not rows:
                    break
                report.crm_rows += len(rows)
                expected = _expected(entity, self.profile, self.refs, rows, lines,
                                     self.mappings, report)
                actual = _actual(erp, entity, f"{entity.erp_key} = ANY(%s)",
                                 [[ent.key_text(r) for r in rows]])
                _compare(expected, actual, report)
                if progress is not None:
                    progress(len(rows))
                last = ent.key_text(rows[-1])
            count = erp.execute(f"SELECT count(*) FROM {entity.erp_table} WHERE NOT deleted"
                                ).fetchone()
            report.erp_rows = int(count[0]) if count else 0
            self._extra_pass(crm, erp, entity, ent, report, None)
        report.missing.sort()
        report.extra.sort()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def check_keys(self, entity: Entity, keys: list[str]) -> EntityReport:
        report = EntityReport(entity.name)
        if not keys:
            return report
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            self._open_crm(crm)
            ent = self._source(entity)
            if ent is None:
                return report
            rows, lines = read_chunk(crm, self._tables, self.profile, ent, after=None,
                                     keys=keys, limit=len(keys))
            report.crm_rows = len(rows)
            expected = _expected(entity, self.profile, self.refs, rows, lines, self.mappings,
                                 report)
            actual = _actual(erp, entity, f"{entity.erp_key} = ANY(%s)", [keys])
            report.erp_rows = sum(1 for v in actual.values() if not v["deleted"])
            _compare(expected, actual, report)
            self._extra_pass(crm, erp, entity, ent, report, keys)
        return report

    def repair(self, reports: list[EntityReport], *, wait_s: float = 120.0,
               poll_s: float = 1.0) -> RepairReport:
        out = RepairReport()
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            ensure_capture_objects(crm, self.settings, self.profile)
            for report in reports:
                entity = ENTITIES[report.entity]
                keys = sorted(set(report.missing) | set(report.differing))
                if keys:
                    out.snapshots[entity.name] = request_snapshot(
                        crm, self.profile, entity.source, keys, self.chunk_size,
                        reason="reconcile")
                if report.extra:
                    out.marked_deleted[entity.name] = self._mark_deleted(erp, entity,
                                                                         report.extra)
        started = time.monotonic()
        while True:
            out.remaining = [self.check_keys(ENTITIES[r.entity],
                                             sorted({*r.missing, *r.extra, *r.differing,
                                                     *r.unmappable}))
                             for r in reports]
            repairable = sum(len(r.missing) + len(r.extra) + len(r.differing)
                             for r in out.remaining)
            if repairable == 0 or time.monotonic() - started > wait_s:
                break
            time.sleep(poll_s)
        out.waited_s = round(time.monotonic() - started, 1)
        out.converged = sum(r.drift for r in out.remaining) == 0
        return out

    def _mark_deleted(self, erp: PgConn, entity: Entity, keys: list[str]) -> list[str]:
        done: list[str] = []
        positions = self.positions.get(entity.name, {})
        with erp.transaction():
            for key in keys:
                lsn, seq = positions[key]
                row = erp.execute(
                    f"UPDATE {entity.erp_table} SET deleted = true, applied_at = "
                    f"clock_timestamp() WHERE {entity.erp_key} = %s AND NOT deleted "
                    "AND source_lsn = %s AND source_seq = %s RETURNING 1",
                    (key, lsn, seq)).fetchone()
                if row is not None:
                    done.append(key)
            if entity.name == "orders" and done:
                erp.execute("UPDATE erp.sales_order_items SET deleted = true "
                            "WHERE crm_order_id = ANY(%s)", (done,))
                with erp.cursor() as cur:
                    apply_stock_delta(cur, done)
        return done


def reconcile(settings: Settings, entities: list[str] | None = None, *, repair: bool = False,
              chunk_size: int = 5000, wait_s: float = 120.0) -> ReconcileReport:
    names = entities or list(ENTITIES)
    unknown = [n for n in names if n not in ENTITIES]
    if unknown:
        raise ConfigError("--entity", f"unknown entity {', '.join(unknown)}: choose from "
                                      f"{', '.join(ENTITIES)}")
    rec = Reconciler(settings, chunk_size)
    reports: list[EntityReport] = []
    for name in names:
        entity = ENTITIES[name]
        total = _estimate(settings, rec.profile, entity)
        bar = Progress(f"reconcile {name}", total)
        try:
            reports.append(rec.check(entity, bar.advance))
        finally:
            bar.close()
    result = ReconcileReport(reports)
    if repair and any(r.drift for r in reports):
        result.repair = rec.repair([r for r in reports if r.drift], wait_s=wait_s)
    if "orders" in names:
        # After the order repair (if any): totals are recounted from what the ERP now holds.
        with connect(settings, "erp") as erp:
            result.stock = recount(erp, rec.mappings, repair=repair)
    return result


def _estimate(settings: Settings, profile: SourceProfile, entity: Entity) -> int | None:
    ent = profile.entity(entity.source)
    if ent is None:
        return 0
    try:
        with connect(settings, "crm") as crm:
            row = crm.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(*ent.table.split(".")))).fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row else None
