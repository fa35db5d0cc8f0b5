"""Reconciliation: does the ERP hold what the CRM holds, on every mapped field?

Entity by entity, in primary-key order, in chunks (keyset pagination on both sides: each
chunk is one index range scan, so a million rows cost a thousand small queries, not a sort of
the whole table). The CRM side goes through the same code as the pipeline: the producer's
``build_events`` (as for a snapshot row) and the consumer's ``to_erp`` with the current
mappings, so "expected" means exactly what the sync would write.

Each key ends in one of: ``missing`` (in the CRM, not live in the ERP), ``extra`` (live in the
ERP, gone from the CRM), ``differing`` (with the fields that differ) or ``unmappable`` (the
CRM row cannot be mapped: its event is a dead letter; fix the mapping or the CRM record).

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
from psycopg.rows import dict_row

from service.cdc.capture import ensure_capture_objects, request_snapshot
from service.cdc.events import READ, RowChange, build_events
from service.erp.apply import recompute_stock
from service.erp.changes import to_erp
from service.erp.mappings import Mappings
from service.errors import ConfigError, Permanent
from service.operator.common import PgConn, connect
from service.operator.render import Progress
from service.settings import Settings


@dataclass(frozen=True)
class Entity:
    name: str
    crm_table: str
    crm_key: str
    erp_table: str
    erp_key: str
    fields: tuple[str, ...]


ENTITIES = {
    e.name: e for e in (
        Entity("customers", "crm.customers", "customer_id", "erp.business_partners",
               "crm_customer_id",
               ("full_name", "gender_code", "birth_date", "phone_e164", "email", "province",
                "city", "district", "street", "purchase_frequency", "purchase_amount",
                "amount_currency", "product_preference", "notes", "phone_extension",
                "phone_others", "division_code")),
        Entity("orders", "crm.sales_orders", "order_id", "erp.sales_orders", "crm_order_id",
               ("order_no", "crm_customer_id", "order_date", "status_code", "currency")),
        Entity("demand", "crm.market_demand", "demand_id", "erp.demand_signals",
               "crm_demand_id",
               ("signal_type", "product_category", "content", "observed_at")),
    )
}
ITEM_FIELDS = ("sku", "product_name", "quantity", "unit_code", "unit_price")


@dataclass
class EntityReport:
    entity: str
    crm_rows: int = 0
    erp_rows: int = 0
    missing: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    differing: dict[int, list[str]] = field(default_factory=dict)
    unmappable: dict[int, str] = field(default_factory=dict)
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
    marked_deleted: dict[str, list[int]] = field(default_factory=dict)
    converged: bool = False
    waited_s: float = 0.0
    remaining: list[EntityReport] = field(default_factory=list)


@dataclass
class ReconcileReport:
    entities: list[EntityReport]
    repair: RepairReport | None = None

    @property
    def drift(self) -> int:
        if self.repair is not None:
            return sum(e.drift for e in self.repair.remaining)
        return sum(e.drift for e in self.entities)


def _expected(entity: Entity, crm_rows: list[dict[str, Any]],
              lines: list[dict[str, Any]], mappings: Mappings,
              report: EntityReport) -> dict[int, dict[str, Any]]:
    """key -> the mapped field values the sync would write for each CRM row."""
    by_order: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_order.setdefault(line["order_id"], []).append(line)
    now = datetime.now(UTC)
    out: dict[int, dict[str, Any]] = {}
    for row in crm_rows:
        key = row[entity.crm_key]
        changes = [RowChange(entity.crm_table, READ, None, row)]
        changes += [RowChange("crm.order_lines", READ, None, li) for li in by_order.get(key, [])]
        try:
            (event,) = build_events(changes, lsn=0, xid=0, commit_time=now, snapshot=True)
            kind = "market_demand" if entity.name == "demand" else event.kind
            change = to_erp(kind, event.record, mappings)
        except Permanent as exc:
            report.unmappable[key] = f"{type(exc).__name__}: {exc.reason}"
            continue
        src = change.partner or change.header or change.demand
        values = {f: getattr(src, f) for f in entity.fields}
        if entity.name == "orders":
            values["items"] = {i.line_no: tuple(getattr(i, f) for f in ITEM_FIELDS)
                               for i in change.items if not i.deleted}
        out[key] = values
    return out


def _actual(conn: PgConn, entity: Entity, where: str, params: list[Any]
            ) -> dict[int, dict[str, Any]]:
    cols = ", ".join((entity.erp_key, *entity.fields, "deleted", "source_lsn", "source_seq"))
    rows = conn.execute(f"SELECT {cols} FROM {entity.erp_table} WHERE {where} "
                        f"ORDER BY {entity.erp_key}", params).fetchall()
    out = {r[0]: dict(zip((*entity.fields, "deleted", "source_lsn", "source_seq"), r[1:],
                          strict=True)) for r in rows}
    for values in out.values():
        if "phone_others" in values:  # text[] (NULL when none) vs the mapped tuple
            values["phone_others"] = tuple(values["phone_others"] or ())
    if entity.name == "orders" and out:
        for values in out.values():
            values["items"] = {}
        for oid, line_no, *rest in conn.execute(
                f"SELECT crm_order_id, line_no, {', '.join(ITEM_FIELDS)} "
                "FROM erp.sales_order_items WHERE crm_order_id = ANY(%s) AND NOT deleted",
                (list(out),)).fetchall():
            out[oid]["items"][line_no] = tuple(rest)
    return out


def _compare(entity: Entity, expected: dict[int, dict[str, Any]],
             actual: dict[int, dict[str, Any]], report: EntityReport,
             positions: dict[int, tuple[int, int]]) -> None:
    report.erp_rows += sum(1 for v in actual.values() if not v["deleted"])
    for key in sorted(set(expected) | set(actual)):
        if key in report.unmappable:
            continue
        want, have = expected.get(key), actual.get(key)
        if want is None:
            if have is not None and not have["deleted"]:
                report.extra.append(key)
                positions[key] = (have["source_lsn"], have["source_seq"])
            continue
        if have is None or have["deleted"]:
            report.missing.append(key)
            continue
        fields = [f for f in want if want[f] != have.get(f)]
        if fields:
            report.differing[key] = fields


class Reconciler:
    def __init__(self, settings: Settings, chunk_size: int = 5000) -> None:
        if chunk_size < 1:
            raise ConfigError("--chunk-size", "must be at least 1")
        self.settings = settings
        self.chunk_size = chunk_size
        self.mappings = Mappings.load(settings.mappings_file)
        # Positions of extra rows as compared, for the guarded repair.
        self.positions: dict[str, dict[int, tuple[int, int]]] = {}

    def _crm_rows(self, crm: PgConn, entity: Entity, where: str, params: list[Any],
                  limit: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with crm.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f"SELECT * FROM {entity.crm_table} WHERE {where} ORDER BY "
                               f"{entity.crm_key}" + (" LIMIT %s" if limit else ""),
                               [*params, limit] if limit else params).fetchall()
            lines: list[dict[str, Any]] = []
            if entity.name == "orders" and rows:
                lines = cur.execute("SELECT * FROM crm.order_lines WHERE order_id = ANY(%s) "
                                    "ORDER BY order_id, line_no",
                                    ([r["order_id"] for r in rows],)).fetchall()
        return rows, lines

    def check(self, entity: Entity, progress: Callable[[int], None] | None = None
              ) -> EntityReport:
        """The whole entity, chunk by chunk, in key order."""
        started = time.monotonic()
        report = EntityReport(entity.name)
        positions = self.positions.setdefault(entity.name, {})
        n = self.chunk_size
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            last: int | None = None
            while True:
                where = "TRUE" if last is None else f"{entity.crm_key} > %s"
                rows, lines = self._crm_rows(crm, entity, where,
                                             [] if last is None else [last], n)
                report.crm_rows += len(rows)
                expected = _expected(entity, rows, lines, self.mappings, report)
                if rows:
                    hi = rows[-1][entity.crm_key]
                    erp_where = f"{entity.erp_key} <= %s" + (
                        "" if last is None else f" AND {entity.erp_key} > %s")
                    params: list[Any] = [hi] if last is None else [hi, last]
                    actual = _actual(erp, entity, erp_where, params)
                else:
                    # CRM exhausted: what the ERP has beyond the last key is extra.
                    erp_where = ("TRUE" if last is None else f"{entity.erp_key} > %s") + \
                        f" ORDER BY {entity.erp_key} LIMIT {n} --"
                    actual = _actual(erp, entity, erp_where, [] if last is None else [last])
                    if not actual:
                        break
                    hi = max(actual)
                _compare(entity, expected, actual, report, positions)
                if progress is not None:
                    progress(len(rows) or len(actual))
                last = hi
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def check_keys(self, entity: Entity, keys: list[int]) -> EntityReport:
        report = EntityReport(entity.name)
        if not keys:
            return report
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            rows, lines = self._crm_rows(crm, entity, f"{entity.crm_key} = ANY(%s)", [keys],
                                         None)
            report.crm_rows = len(rows)
            expected = _expected(entity, rows, lines, self.mappings, report)
            actual = _actual(erp, entity, f"{entity.erp_key} = ANY(%s)", [keys])
            _compare(entity, expected, actual, report,
                     self.positions.setdefault(entity.name, {}))
        return report

    def repair(self, reports: list[EntityReport], *, wait_s: float = 120.0,
               poll_s: float = 1.0) -> RepairReport:
        out = RepairReport()
        with connect(self.settings, "crm") as crm, connect(self.settings, "erp") as erp:
            ensure_capture_objects(crm, self.settings)
            for report in reports:
                entity = ENTITIES[report.entity]
                keys = sorted(set(report.missing) | set(report.differing))
                if keys:
                    out.snapshots[entity.name] = request_snapshot(
                        crm, entity.crm_table, keys, self.chunk_size, reason="reconcile")
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

    def _mark_deleted(self, erp: PgConn, entity: Entity, keys: list[int]) -> list[int]:
        done: list[int] = []
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
                    recompute_stock(cur, done)
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
        total = _estimate(settings, entity)
        bar = Progress(f"reconcile {name}", total)
        try:
            reports.append(rec.check(entity, bar.advance))
        finally:
            bar.close()
    result = ReconcileReport(reports)
    if repair and any(r.drift for r in reports):
        result.repair = rec.repair([r for r in reports if r.drift], wait_s=wait_s)
    return result


def _estimate(settings: Settings, entity: Entity) -> int | None:
    try:
        with connect(settings, "crm") as crm:
            row = crm.execute(f"SELECT count(*) FROM {entity.crm_table}").fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row else None
