"""Schema evolution: every released version stays readable, checked with Apache Avro's own
compatibility checker (independent of fastavro, which the service uses)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from service.avro import SchemaRegistry
from service.errors import DecodeError

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TS = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


ROW: dict[str, Any] = {
    "customer_id": 42, "family_name": "张", "given_name": "三", "middle_name": None,
    "name_order": "eastern", "gender": "男", "birth_date": date(1990, 5, 17),
    "phone": "13812345678", "email": None, "address": "北京市朝阳区建国路88号",
    "purchase_frequency": None, "purchase_amount": Decimal("5000.00"),
    "product_preference": None, "notes": None, "updated_at": TS,
}
EVENT: dict[str, Any] = {
    "event_id": "1A/0", "op": "CREATE",
    "source": {"lsn": 26, "seq": 0, "txid": 700, "commit_time": TS,
               "table": "crm.customers", "snapshot": False},
    "before": None, "after": ROW,
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


def _pairs() -> list[tuple[str, int, int]]:
    """(kind, version, newest) for every version of every kind."""
    return [(kind, v, max(by_version))
            for kind, by_version in sorted(versions_of(SCHEMAS).items())
            for v in sorted(by_version)]


def test_every_kind_has_contiguous_versions_from_1() -> None:
    found = versions_of(SCHEMAS)
    assert {"customer", "order", "market_demand"} <= set(found)
    for kind, by_version in found.items():
        assert sorted(by_version) == list(range(1, len(by_version) + 1)), kind


@pytest.mark.parametrize(("kind", "version", "newest"), _pairs(),
                         ids=[f"{k}-v{v}" for k, v, _ in _pairs()])
def test_newest_reader_reads_every_older_writer(kind: str, version: int, newest: int) -> None:
    by_version = versions_of(SCHEMAS)[kind]
    result = compatibility(reader=by_version[newest], writer=by_version[version])
    assert result.compatibility is SchemaCompatibilityType.compatible, result.messages


@pytest.mark.parametrize(("kind", "version", "newest"), _pairs(),
                         ids=[f"{k}-v{v}" for k, v, _ in _pairs()])
def test_every_older_reader_reads_the_newest_writer(kind: str, version: int, newest: int) -> None:
    by_version = versions_of(SCHEMAS)[kind]
    result = compatibility(reader=by_version[version], writer=by_version[newest])
    assert result.compatibility is SchemaCompatibilityType.compatible, result.messages


# ---- the check has teeth -------------------------------------------------------------------

def _customer_record(schema: dict[str, Any]) -> dict[str, Any]:
    before = next(f for f in schema["fields"] if f["name"] == "before")
    record = before["type"][1]
    assert record["name"] == "Customer"
    return record


def _with_customer_v2(tmp_path: Path, change: Any) -> Path:
    """A copy of schemas/ whose customer kind has v1 and a v2 = v1 changed by ``change``."""
    directory = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, directory)
    for extra in (directory / "customer").glob("v*.avsc"):
        if extra.name != "v1.avsc":
            extra.unlink()
    schema = json.loads((SCHEMAS / "customer" / "v1.avsc").read_text("utf-8"))
    change(_customer_record(schema))
    (directory / "customer" / "v2.avsc").write_text(
        json.dumps(schema, ensure_ascii=False, indent=2), "utf-8")
    return directory


def _v1_customer_bytes(directory: Path) -> bytes:
    """A customer event as a producer that knows only customer/v1 writes it."""
    v1_only = directory.parent / "v1-only"
    (v1_only / "customer").mkdir(parents=True, exist_ok=True)
    shutil.copy(directory / "customer" / "v1.avsc", v1_only / "customer" / "v1.avsc")
    return SchemaRegistry.load(v1_only).encode("customer", EVENT)


def test_new_required_field_without_default_is_incompatible(tmp_path: Path) -> None:
    directory = _with_customer_v2(tmp_path, lambda rec: rec["fields"].append(
        {"name": "vip_level", "type": "int"}))
    old, new = directory / "customer" / "v1.avsc", directory / "customer" / "v2.avsc"
    result = compatibility(reader=new, writer=old)
    assert result.compatibility is SchemaCompatibilityType.incompatible
    # The service's own resolution (fastavro) agrees: v1 data cannot be read as this v2.
    with pytest.raises(DecodeError, match="customer v1"):
        SchemaRegistry.load(directory).decode(_v1_customer_bytes(directory))


def test_changed_field_type_is_incompatible(tmp_path: Path) -> None:
    def change(rec: dict[str, Any]) -> None:
        field = next(f for f in rec["fields"] if f["name"] == "customer_id")
        field["type"] = "string"  # long -> string: neither direction can be resolved

    directory = _with_customer_v2(tmp_path, change)
    old, new = directory / "customer" / "v1.avsc", directory / "customer" / "v2.avsc"
    for reader, writer in ((new, old), (old, new)):
        result = compatibility(reader=reader, writer=writer)
        assert result.compatibility is SchemaCompatibilityType.incompatible


def test_new_optional_field_is_compatible_and_resolved_with_its_default(tmp_path: Path) -> None:
    directory = _with_customer_v2(tmp_path, lambda rec: rec["fields"].append(
        {"name": "loyalty_tier", "type": ["null", "string"], "default": None}))
    old, new = directory / "customer" / "v1.avsc", directory / "customer" / "v2.avsc"
    assert compatibility(reader=new, writer=old).compatibility \
        is SchemaCompatibilityType.compatible
    assert compatibility(reader=old, writer=new).compatibility \
        is SchemaCompatibilityType.compatible

    row, event = ROW, EVENT
    data = _v1_customer_bytes(directory)

    evolved = SchemaRegistry.load(directory)
    assert evolved.latest("customer").version == 2
    assert evolved.writer_of(data).version == 1
    kind, decoded = evolved.decode(data)
    assert kind == "customer"
    assert decoded["after"]["loyalty_tier"] is None
    assert decoded["after"]["purchase_amount"] == Decimal("5000.00")
    assert {k: v for k, v in decoded["after"].items() if k != "loyalty_tier"} == row

    # The evolved producer writes v2; its bytes carry a new fingerprint the old registry
    # does not know, and the evolved registry reads them back.
    written = evolved.encode("customer", {**event, "after": {**row, "loyalty_tier": "gold"}})
    assert written[2:10] != data[2:10]
    assert evolved.decode(written)[1]["after"]["loyalty_tier"] == "gold"
