"""Schema evolution, checked with Apache Avro's own compatibility checker (independent of
fastavro, which the service uses).

The documented decision (``service/upcast.py``): v2, the canonical events, is a *breaking*
change from v1, the demo CRM's rows (keys long -> string, fields renamed, decimals -> exact
text). The checker must say so in both directions; v1 events already on a topic stay readable
because the consumer decodes them with their own writer schema and upcasts them, and the upcast
must give exactly the event the v2 producer builds for the same row. Within one line of
versions (no break between them) every reader must read every writer, both ways.
"""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from service.avro import MAGIC, SchemaRegistry, schema_fingerprint
from service.cdc.events import (
    CREATE,
    DELETE,
    READ,
    UPDATE,
    References,
    RowChange,
    build_events,
    canonical,
)
from service.cdc.profile import load_profile
from service.errors import DecodeError
from service.upcast import UPCASTERS

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TS = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LSN = 0x1A
DEMO = load_profile("demo")

# Versions that break compatibility with every version before them (each one is a decision,
# documented where the version is introduced, with an upcast for every older version).
BREAKS: dict[str, set[int]] = {"customer": {2}, "order": {2}, "market_demand": {2}}


ROW: dict[str, Any] = {
    "key": "42", "full_name": None, "family_name": "张", "given_name": "三",
    "middle_name": None, "name_order": "eastern", "gender": "男",
    "birth_date": date(1990, 5, 17), "phone": "13812345678", "email": None,
    "address": "北京市朝阳区建国路88号", "street": None, "city": None, "region": None,
    "postcode": None, "country": None, "currency": None, "purchase_frequency": None,
    "purchase_amount": "5000.00", "product_preference": None, "notes": None,
}
EVENT: dict[str, Any] = {
    "event_id": "1A/0", "op": "CREATE",
    "source": {"lsn": 26, "seq": 0, "txid": 700, "commit_time": TS,
               "table": "crm.customers", "snapshot": False, "profile": "demo"},
    "key": "42", "before": None, "after": ROW,
}


def versions_of(directory: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for path in directory.glob("*/v*.avsc"):
        out.setdefault(path.parent.name, {})[int(path.stem[1:])] = path
    return out


def parse(path: Path) -> avro.schema.Schema:
    return avro.schema.parse(path.read_text("utf-8"))


def compatibility(reader: Path, writer: Path) -> Any:
    return ReaderWriterCompatibilityChecker().get_compatibility(parse(reader), parse(writer))


def line_of(kind: str, version: int) -> int:
    """The version that started the line ``version`` belongs to (1 or its latest break)."""
    return max({1} | {b for b in BREAKS.get(kind, set()) if b <= version})


def _pairs() -> list[tuple[str, int, int]]:
    """(kind, version, newest) for every version of every kind."""
    return [(kind, v, max(by_version))
            for kind, by_version in sorted(versions_of(SCHEMAS).items())
            for v in sorted(by_version)]


def test_every_kind_has_contiguous_versions_from_1() -> None:
    found = versions_of(SCHEMAS)
    assert {"customer", "order", "market_demand", "truncate"} <= set(found)
    for kind, by_version in found.items():
        assert sorted(by_version) == list(range(1, len(by_version) + 1)), kind
        assert BREAKS.get(kind, set()) <= set(by_version), kind


@pytest.mark.parametrize(("kind", "version", "newest"), _pairs(),
                         ids=[f"{k}-v{v}" for k, v, _ in _pairs()])
def test_newest_reader_reads_every_older_writer(kind: str, version: int, newest: int) -> None:
    by_version = versions_of(SCHEMAS)[kind]
    result = compatibility(reader=by_version[newest], writer=by_version[version])
    if line_of(kind, version) == line_of(kind, newest):
        assert result.compatibility is SchemaCompatibilityType.compatible, result.messages
    else:
        # Across a documented break: the checker must refuse it, and an upcast must exist.
        assert result.compatibility is SchemaCompatibilityType.incompatible
        assert (kind, version) in UPCASTERS


@pytest.mark.parametrize(("kind", "version", "newest"), _pairs(),
                         ids=[f"{k}-v{v}" for k, v, _ in _pairs()])
def test_every_older_reader_reads_the_newest_writer(kind: str, version: int, newest: int) -> None:
    by_version = versions_of(SCHEMAS)[kind]
    result = compatibility(reader=by_version[version], writer=by_version[newest])
    if line_of(kind, version) == line_of(kind, newest):
        assert result.compatibility is SchemaCompatibilityType.compatible, result.messages
    else:
        # Not forward compatible: consumers are upgraded before the producer writes v2.
        assert result.compatibility is SchemaCompatibilityType.incompatible


@pytest.mark.parametrize("kind", ["customer", "order", "market_demand"])
def test_v2_readers_are_incompatible_with_v1_writers(kind: str) -> None:
    v1, v2 = SCHEMAS / kind / "v1.avsc", SCHEMAS / kind / "v2.avsc"
    result = compatibility(reader=v2, writer=v1)
    assert result.compatibility is SchemaCompatibilityType.incompatible
    # For the real reason (v2's required text key, which no v1 writer has), not a name clash.
    assert "key" in result.messages, result.messages
    assert compatibility(reader=v1, writer=v2).compatibility \
        is SchemaCompatibilityType.incompatible


@pytest.mark.parametrize("kind", ["customer", "order", "market_demand"])
def test_every_version_before_a_break_has_an_upcast(kind: str) -> None:
    newest = max(versions_of(SCHEMAS)[kind])
    needed = {(kind, v) for v in range(1, newest + 1)
              if line_of(kind, v) != line_of(kind, newest)}
    assert needed and needed <= set(UPCASTERS)


# ---- v1 events already on a topic: decoded and upcast, faithfully ---------------------------

def v1_bytes(kind: str, record: dict[str, Any]) -> bytes:
    """``record`` as a v1 producer wrote it: single-object encoding with v1's fingerprint."""
    parsed = fastavro.parse_schema(json.loads((SCHEMAS / kind / "v1.avsc").read_text("utf-8")))
    buf = io.BytesIO()
    buf.write(MAGIC + schema_fingerprint(parsed))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def customer_row(cid: int = 42, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "customer_id": cid, "family_name": "张", "given_name": "三", "middle_name": None,
        "name_order": "eastern", "gender": "男", "birth_date": date(1990, 5, 17),
        "phone": "138 1234 5678", "email": " Zhang.San@Example.cn",
        "address": "北京市朝阳区建国路88号",
        "purchase_frequency": "每月1次", "purchase_amount": Decimal("5000.00"),
        "product_preference": "电子产品", "notes": "老客户，喜欢5G手机。" * 100, "updated_at": TS,
    }
    row.update(overrides)
    return row


def header_row(order_id: int = 9001, cid: int = 42, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"order_id": order_id, "order_no": "20230101", "customer_id": cid,
                           "order_date": date(2023, 1, 1), "status": "已发货", "currency": "元",
                           "updated_at": TS}
    row.update(overrides)
    return row


def line_row(line_no: int, order_id: int = 9001, cid: int = 42, price: str = "5000.00"
             ) -> dict[str, Any]:
    return {"order_id": order_id, "line_no": line_no, "customer_id": cid,
            "product_code": f"P-{line_no:03d}", "product_name": "手机", "quantity": "10台",
            "unit_price": Decimal(price)}


def demand_row(did: int = 7) -> dict[str, Any]:
    return {"demand_id": did, "kind": "客户需求反馈", "product_category": "手机",
            "content": "5G手机市场增长迅速", "observed_at": TS}


def v1_source(table: str, seq: int, snapshot: bool = False) -> dict[str, Any]:
    return {"lsn": LSN, "seq": seq, "txid": 0 if snapshot else 700, "commit_time": TS,
            "table": table, "snapshot": snapshot}


def v2_events(changes: list[RowChange], snapshot: bool = False) -> list[Any]:
    orders = {"9001": header_row(), "9002": header_row(9002, 43)}
    refs = References(lambda entity, key: canonical(DEMO.entities["order"], orders[key],
                                                    References()) if key in orders else None)
    return build_events(changes, profile=DEMO, refs=refs, lsn=LSN, xid=0 if snapshot else 700,
                        commit_time=TS, snapshot=snapshot)


def _single_row_v1(kind: str, change: RowChange, snapshot: bool = False) -> dict[str, Any]:
    prefix = "snap/" if snapshot else ""
    return {"event_id": f"{prefix}1A/0", "op": change.op,
            "source": v1_source(change.table, 0, snapshot),
            "before": change.before, "after": change.after}


SINGLE_ROW_CASES = [
    pytest.param("customer", RowChange("crm.customers", CREATE, None, customer_row()), False,
                 id="customer-create"),
    pytest.param("customer", RowChange("crm.customers", UPDATE, customer_row(),
                                       customer_row(purchase_amount=Decimal("0.10"),
                                                    birth_date=None, phone=None)), False,
                 id="customer-update"),
    pytest.param("customer", RowChange("crm.customers", DELETE, customer_row(77), None), False,
                 id="customer-delete"),
    pytest.param("customer", RowChange("crm.customers", READ, None,
                                       customer_row(purchase_amount=None)), True,
                 id="customer-snapshot-read"),
    pytest.param("market_demand", RowChange("crm.market_demand", CREATE, None, demand_row()),
                 False, id="demand-create"),
    pytest.param("market_demand", RowChange("crm.market_demand", DELETE, demand_row(8), None),
                 False, id="demand-delete"),
]


@pytest.mark.parametrize(("kind", "change", "snapshot"), SINGLE_ROW_CASES)
def test_v1_event_upcasts_to_what_the_demo_profile_builds(kind: str, change: RowChange,
                                                         snapshot: bool) -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    data = v1_bytes(kind, _single_row_v1(kind, change, snapshot))
    assert registry.writer_of(data).version == 1
    (expected,) = v2_events([change], snapshot)
    assert registry.decode(data) == (kind, expected.record)
    # And what the v2 producer writes decodes to the same record.
    assert registry.decode(registry.encode(kind, expected.record)) == (kind, expected.record)


def test_v1_order_with_lines_upcasts_to_what_the_demo_profile_builds() -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    changes = [RowChange("crm.sales_orders", CREATE, None, header_row()),
               RowChange("crm.order_lines", CREATE, None, line_row(1)),
               RowChange("crm.order_lines", CREATE, None, line_row(2, price="12345678901.23"))]
    v1 = {"event_id": "1A/0", "op": CREATE, "source": v1_source("crm.sales_orders", 0),
          "order_id": 9001, "customer_id": 42, "before": None, "after": header_row(),
          "lines": [{"op": CREATE, "before": None, "after": line_row(1)},
                    {"op": CREATE, "before": None,
                     "after": line_row(2, price="12345678901.23")}]}
    (expected,) = v2_events(changes)
    kind, decoded = registry.decode(v1_bytes("order", v1))
    assert (kind, decoded) == ("order", expected.record)
    assert [ln["after"]["key"] for ln in decoded["lines"]] == ['["9001","1"]', '["9001","2"]']
    assert decoded["lines"][1]["after"]["unit_price"] == "12345678901.23"


def test_v1_lines_only_order_event_upcasts_to_what_the_demo_profile_builds() -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    changed = {**line_row(1, 9002, 43), "quantity": "12台"}
    changes = [RowChange("crm.order_lines", UPDATE, line_row(1, 9002, 43), changed),
               RowChange("crm.order_lines", DELETE, line_row(2, 9002, 43), None)]
    v1 = {"event_id": "1A/0", "op": UPDATE, "source": v1_source("crm.order_lines", 0),
          "order_id": 9002, "customer_id": 43, "before": None, "after": None,
          "lines": [{"op": UPDATE, "before": line_row(1, 9002, 43), "after": changed},
                    {"op": DELETE, "before": line_row(2, 9002, 43), "after": None}]}
    (expected,) = v2_events(changes)
    assert registry.decode(v1_bytes("order", v1)) == ("order", expected.record)


def test_v1_order_delete_upcasts_to_what_the_demo_profile_builds() -> None:
    registry = SchemaRegistry.load(SCHEMAS)
    changes = [RowChange("crm.sales_orders", UPDATE, header_row(), header_row(status="已完成")),
               RowChange("crm.sales_orders", DELETE, header_row(status="已完成"), None)]
    v1 = {"event_id": "1A/0", "op": DELETE, "source": v1_source("crm.sales_orders", 0),
          "order_id": 9001, "customer_id": 42, "before": header_row(), "after": None,
          "lines": []}
    (expected,) = v2_events(changes)
    assert registry.decode(v1_bytes("order", v1)) == ("order", expected.record)


def test_a_v1_event_without_an_upcast_is_a_decode_error(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    # The break is real: without the upcast, v1 bytes cannot become a v2 record.
    registry = SchemaRegistry.load(SCHEMAS)
    data = v1_bytes("customer", _single_row_v1(
        "customer", RowChange("crm.customers", CREATE, None, customer_row())))
    monkeypatch.delitem(UPCASTERS, ("customer", 1))
    with pytest.raises(DecodeError, match="customer v1: no upcast"):
        registry.decode(data)


# ---- the check has teeth: a deliberate change to the newest customer schema ----------------

def _customer_record(schema: dict[str, Any]) -> dict[str, Any]:
    before = next(f for f in schema["fields"] if f["name"] == "before")
    record = before["type"][1]
    assert record["name"] == "Customer"
    return record


def _newest_customer() -> int:
    return max(versions_of(SCHEMAS)["customer"])


def _with_next_customer(tmp_path: Path, change: Any) -> Path:
    """A copy of schemas/ whose customer kind gains v<newest+1> = newest changed by
    ``change`` (a candidate next version, not a documented break)."""
    directory = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, directory)
    newest = _newest_customer()
    schema = json.loads((SCHEMAS / "customer" / f"v{newest}.avsc").read_text("utf-8"))
    change(_customer_record(schema))
    (directory / "customer" / f"v{newest + 1}.avsc").write_text(
        json.dumps(schema, ensure_ascii=False, indent=2), "utf-8")
    return directory


def _paths(directory: Path) -> tuple[Path, Path]:
    newest = _newest_customer()
    return (directory / "customer" / f"v{newest}.avsc",
            directory / "customer" / f"v{newest + 1}.avsc")


def _current_customer_bytes(directory: Path) -> bytes:
    """A customer event as today's producer (newest schema only) writes it."""
    current = directory.parent / "current-only"
    (current / "customer").mkdir(parents=True, exist_ok=True)
    name = f"v{_newest_customer()}.avsc"
    shutil.copy(directory / "customer" / name, current / "customer" / name)
    return SchemaRegistry.load(current).encode("customer", EVENT)


def test_new_required_field_without_default_is_incompatible(tmp_path: Path) -> None:
    directory = _with_next_customer(tmp_path, lambda rec: rec["fields"].append(
        {"name": "vip_level", "type": "int"}))
    old, new = _paths(directory)
    result = compatibility(reader=new, writer=old)
    assert result.compatibility is SchemaCompatibilityType.incompatible
    # The service's own resolution (fastavro) agrees: today's data cannot be read as this.
    with pytest.raises(DecodeError, match=f"customer v{_newest_customer()}"):
        SchemaRegistry.load(directory).decode(_current_customer_bytes(directory))


def test_changed_field_type_is_incompatible(tmp_path: Path) -> None:
    def change(rec: dict[str, Any]) -> None:
        field = next(f for f in rec["fields"] if f["name"] == "key")
        field["type"] = "long"  # string -> long: neither direction can be resolved

    directory = _with_next_customer(tmp_path, change)
    old, new = _paths(directory)
    for reader, writer in ((new, old), (old, new)):
        result = compatibility(reader=reader, writer=writer)
        assert result.compatibility is SchemaCompatibilityType.incompatible


def test_removed_field_without_default_is_incompatible_for_old_readers(tmp_path: Path) -> None:
    def change(rec: dict[str, Any]) -> None:
        rec["fields"] = [f for f in rec["fields"] if f["name"] != "key"]

    directory = _with_next_customer(tmp_path, change)
    old, new = _paths(directory)
    assert compatibility(reader=old, writer=new).compatibility \
        is SchemaCompatibilityType.incompatible


def test_new_optional_field_is_compatible_and_resolved_with_its_default(tmp_path: Path) -> None:
    directory = _with_next_customer(tmp_path, lambda rec: rec["fields"].append(
        {"name": "loyalty_tier", "type": ["null", "string"], "default": None}))
    old, new = _paths(directory)
    assert compatibility(reader=new, writer=old).compatibility \
        is SchemaCompatibilityType.compatible
    assert compatibility(reader=old, writer=new).compatibility \
        is SchemaCompatibilityType.compatible

    row, event = ROW, EVENT
    data = _current_customer_bytes(directory)

    evolved = SchemaRegistry.load(directory)
    assert evolved.latest("customer").version == _newest_customer() + 1
    assert evolved.writer_of(data).version == _newest_customer()
    kind, decoded = evolved.decode(data)
    assert kind == "customer"
    assert decoded["after"]["loyalty_tier"] is None
    assert decoded["after"]["purchase_amount"] == "5000.00"
    assert {k: v for k, v in decoded["after"].items() if k != "loyalty_tier"} == row

    # The evolved producer writes the new version; its bytes carry a new fingerprint the old
    # registry does not know, and the evolved registry reads them back.
    written = evolved.encode("customer", {**event, "after": {**row, "loyalty_tier": "gold"}})
    assert written[2:10] != data[2:10]
    assert evolved.decode(written)[1]["after"]["loyalty_tier"] == "gold"


def test_a_consumer_without_the_truncate_schema_refuses_a_truncate_event(tmp_path: Path) -> None:
    """An older consumer (its schemas/ has no truncate kind) gets a dead letter, not a skip."""
    from service.cdc.events import truncate_event
    from service.errors import UnknownSchema

    event = truncate_event(DEMO.entities["customer"], lsn=LSN, seq=0, xid=700,
                           commit_time=TS, profile="demo")
    data = SchemaRegistry.load(SCHEMAS).encode("truncate", event.record)
    older = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, older)
    shutil.rmtree(older / "truncate")
    with pytest.raises(UnknownSchema):
        SchemaRegistry.load(older).decode(data)
