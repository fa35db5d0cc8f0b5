"""Pure parts of the operator toolkit: argument parsing, rendering, the reconcile mapping."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from service.cdc.events import References
from service.cdc.profile import load_profile
from service.cli import build_parser
from service.erp.mappings import Mappings
from service.errors import ConfigError, MappingError, UnrepresentableValue
from service.operator import render
from service.operator.common import parse_time
from service.operator.reconcile import (
    ENTITIES,
    EntityReport,
    Reconciler,
    ReconcileReport,
    _compare,
    _expected,
    unmappable_text,
)
from service.operator.replay import parse_offsets


def test_parse_offsets_and_times() -> None:
    assert parse_offsets(["0:10", "2:0"]) == {0: 10, 2: 0}
    for bad in ("3", "a:1", "1:-4"):
        with pytest.raises(ConfigError, match="--from-offset"):
            parse_offsets([bad])
    assert parse_time("2024-05-01T08:00:00", "--since") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert parse_time("2024-05-01T08:00:00Z", "--since").tzinfo is not None
    with pytest.raises(ConfigError, match="--since"):
        parse_time("last tuesday", "--since")


def test_table_aligns_cjk_and_json_handles_service_types() -> None:
    out = render.table(["name", "n"], [("张三", 1), ("Smith", 22)]).splitlines()
    # 张三 is four columns wide on a terminal: the numbers line up on screen.
    assert render._width(out[2][:out[2].index("1")]) == out[3].index("22")
    assert render.jsonable({"d": date(2024, 1, 2), "x": Decimal("1.50"), "b": b"\xff",
                            "k": b"42"}) == {"d": "2024-01-02", "x": "1.50",
                                             "b": "base64:/w==", "k": "42"}


def test_times_are_shown_in_utc_with_the_offset_whatever_the_session_zone() -> None:
    # a CRM session in Asia/Shanghai reads 15:30+08:00; the operator reads 07:30 UTC
    shanghai = datetime(2026, 11, 29, 15, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert render.when(shanghai) == "2026-11-29 07:30:00+0000"
    assert render.cell(shanghai) == "2026-11-29 07:30:00+0000"
    new_york = datetime(2026, 11, 29, 2, 30, tzinfo=ZoneInfo("America/New_York"))
    assert render.cell(new_york) == "2026-11-29 07:30:00+0000"
    assert render.cell(datetime(2026, 11, 29, 7, 30)) == "2026-11-29 07:30:00"  # naive: as is


def test_every_operator_command_has_help() -> None:
    parser = build_parser()
    for argv in (["status"], ["replay"], ["dlq", "list"], ["dlq", "show"], ["dlq", "redrive"],
                 ["dlq", "discard"], ["reconcile"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*argv, "--help"])
        assert exc.value.code == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "--topic", "t"])  # a start position is required


def test_reconcile_compares_mapped_fields_with_the_pipeline_transform() -> None:
    mappings = Mappings.load()
    profile = load_profile("demo")
    entity = ENTITIES["orders"]
    report = EntityReport("orders")
    crm = [{"order_id": 1, "order_no": "A1", "customer_id": 7, "order_date": date(2023, 1, 1),
            "status": "已付款", "currency": "元", "updated_at": datetime.now(UTC)},
           {"order_id": 2, "order_no": "A2", "customer_id": 7, "order_date": date(2023, 1, 1),
            "status": "不存在", "currency": "元", "updated_at": datetime.now(UTC)}]
    lines = [{"order_id": 1, "line_no": 1, "customer_id": 7, "product_code": "P-LAPTOP",
              "product_name": "笔记本电脑", "quantity": "2台", "unit_price": Decimal("10")}]
    expected = _expected(entity, profile, References(), crm, lines, mappings, report)
    assert set(expected) == {"1"}
    assert "status" in report.unmappable["2"]
    assert expected["1"]["status_code"] == "PAID"
    assert expected["1"]["crm_customer_id"] == "7"
    assert expected["1"]["items"] == {'["1","1"]': ("SKU-100003", "笔记本电脑", Decimal(2),
                                                    "UNIT", Decimal("10"), Decimal(2),
                                                    "UNIT")}
    have = {"1": {**expected["1"], "status_code": "CANCELLED", "deleted": False,
                  "source_lsn": 5, "source_seq": 0},
            "3": {**expected["1"], "deleted": False, "source_lsn": 9, "source_seq": 1},
            "2": {**expected["1"], "deleted": False, "source_lsn": 4, "source_seq": 0}}
    _compare(expected, have, report)
    assert report.differing == {"1": ["status_code"]}
    # Pass 1 judges only CRM keys: "3" (ERP only) is left to pass 2, "2" is unmappable.
    assert report.missing == [] and report.extra == []

    # Pass 2: live ERP rows, in key order and in chunks, whose CRM row is gone; read
    # through the ERP target (its live_keys pages, then the positions of the extra rows).
    class Target:
        def __init__(self, rows: list[tuple[str, int, int]]) -> None:
            self.rows = sorted(rows)

        def attach(self, conn: Any) -> None:
            pass

        def live_keys(self, kind: str, after: str | None, limit: int) -> list[str]:
            assert kind == "order"
            return [r[0] for r in self.rows if after is None or r[0] > after][:limit]

        def read(self, kind: str, keys: list[str]) -> dict[str, dict[str, Any]]:
            return {k: {"deleted": False, "position": (lsn, seq)}
                    for k, lsn, seq in self.rows if k in keys}

    asked: list[list[str]] = []

    class Rec(Reconciler):
        def _live_in_crm(self, crm: Any, ent: Any, keys: list[str]) -> set[str]:
            asked.append(keys)
            return {k for k in keys if k in ("1", "2")}

    rec = object.__new__(Rec)
    rec.chunk_size, rec.positions = 2, {}
    rec._target = cast(Any, Target([("1", 5, 0), ("2", 4, 0), ("3", 9, 1), ("4", 11, 2),
                                    ("5", 12, 0)]))
    report.unmappable["5"] = "MappingError: status"  # judged already: not also extra
    seen = rec._extra_pass(cast(Any, None), cast(Any, None), entity,
                           profile.entities["order"], report, None)
    assert seen == 5
    assert asked == [["1", "2"], ["3", "4"], ["5"]]
    assert report.extra == ["3", "4"]
    assert rec.positions == {"orders": {"3": (9, 1), "4": (11, 2)}}


def test_reconcile_names_an_unmappable_rows_field_and_class_never_its_reason() -> None:
    status = MappingError("status", "张三 13812345678", "unknown order status 张三 13812345678")
    assert unmappable_text(status) == "MappingError in field status"
    line = MappingError("quantity", "台十", "does not start with a number").in_line('["9","2"]')
    assert unmappable_text(line) == 'MappingError in field lines.quantity of line ["9","2"]'
    nan = UnrepresentableValue("numeric NaN is not a finite number", "purchase_amount")
    assert unmappable_text(nan) == "UnrepresentableValue in column purchase_amount"


def test_a_redrive_mappings_version_no_running_consumer_applies_is_named() -> None:
    from service.operator.dlq import mappings_mismatch

    assert mappings_mismatch("aaaaaaaaaaaa", [], "/m.toml") is None  # nothing to compare
    assert mappings_mismatch("aaaaaaaaaaaa", ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "/m.toml") is None
    said = mappings_mismatch("aaaaaaaaaaaa", ["cccccccccccc", "bbbbbbbbbbbb"], "/m.toml")
    assert said is not None
    assert said.startswith("the mappings file /m.toml is version aaaaaaaaaaaa, which no "
                           "running consumer applies")
    assert "apply bbbbbbbbbbbb, cccccccccccc" in said and said.endswith("--force redrives anyway")


def test_held_keys_are_listed_and_counted_but_are_not_drift() -> None:
    """F10 (newcomer9): a key held behind an open dead letter (an unmappable row's too) is
    not drift: the nightly run stays green while only letters are open, real drift shows."""
    held = EntityReport("customers", held={"5": "cannot be mapped: MappingError: phone; held "
                                                  "behind dead letter #3"})
    assert held.drift == 0 and held.counts()["held"] == 1
    result = ReconcileReport([held])
    assert (result.drift, result.held) == (0, 1)
    drifted = EntityReport("customers", missing=["7"], unmappable={"8": "MappingError: x"},
                           held={"5": "held behind dead letter #3"})
    assert drifted.drift == 2
    assert (ReconcileReport([held, drifted]).drift, ReconcileReport([held, drifted]).held) == (
        2, 2)
