"""The pure source-contract check (service.cdc.contract) and the decoder's use of it."""

from __future__ import annotations

import struct

import pytest

from service.cdc import contract, pgoutput
from service.cdc.contract import TABLE, Shape, Violation, check, check_profile
from service.cdc.producer import ChangeDecoder
from service.cdc.profile import load_profile
from service.errors import CaptureRejected, SourceContractBroken

DEMO = load_profile("demo")
BOTTLE = load_profile("bottlecrm")
TEXT, DATE, TIMESTAMPTZ, BOOL, INT8 = 25, 1082, 1184, 16, 20


def _demand(*, renamed: dict[str, str] | None = None, **changes: int | None) -> Shape:
    """The demo's market_demand as the catalog gives it, after ``changes`` (a column added
    with its type OID, or dropped: None) and ``renamed`` (old name -> new). Like PostgreSQL,
    an added column takes a new attnum and a renamed one keeps its own."""
    columns: dict[str, int] = {"demand_id": INT8, "kind": TEXT, "product_category": TEXT,
                               "content": TEXT, "observed_at": TIMESTAMPTZ}
    attnums = {c: n for n, c in enumerate(columns, start=1)}
    for old, new in (renamed or {}).items():
        columns[new] = columns.pop(old)
        attnums[new] = attnums.pop(old)
    for name, oid in changes.items():
        if oid is None:
            columns.pop(name)
            attnums.pop(name)
        else:
            columns[name] = oid
            attnums.setdefault(name, 100 + len(attnums))
    types = {c: {TEXT: "text", INT8: "bigint", TIMESTAMPTZ: "timestamp with time zone"}
             .get(o, "?") for c, o in columns.items()}
    return Shape("crm.market_demand", "f", columns, types, attnums)


DEMAND = DEMO.table("crm.market_demand")
assert DEMAND is not None


def test_a_table_that_keeps_the_contract_has_no_violation() -> None:
    assert check(DEMAND, _demand()) == []


def test_an_unmapped_column_may_come_and_go() -> None:
    assert check(DEMAND, _demand(scratch=TEXT)) == []


def test_a_missing_table_is_one_table_violation() -> None:
    [v] = check(DEMAND, None)
    assert (v.table, v.column) == ("crm.market_demand", TABLE)
    assert "does not exist" in v.problem


def test_a_dropped_column_names_it_and_the_type_to_add_back() -> None:
    [v] = check(DEMAND, _demand(product_category=None), known=_demand())
    assert (v.table, v.column) == ("crm.market_demand", "product_category")
    assert v.message == ("crm.market_demand.product_category: column is mapped by the source "
                         "profile but missing (renamed or dropped)")
    assert v.fix.startswith('ALTER TABLE "crm"."market_demand" ADD COLUMN "product_category" '
                            "text;")


def test_a_renamed_column_gets_the_rename_back() -> None:
    [v] = check(DEMAND, _demand(renamed={"product_category": "category"}), known=_demand())
    assert v.fix == ('ALTER TABLE "crm"."market_demand" RENAME COLUMN "category" TO '
                     '"product_category";')


def test_a_dropped_column_is_not_renamed_from_an_unrelated_new_one() -> None:
    """A mapped column dropped after an unmapped one of its type was added: renaming that
    one back would feed its data to the ERP under the dropped column's meaning."""
    [v] = check(DEMAND, _demand(product_category=None, scratch=TEXT), known=_demand())
    assert "RENAME" not in v.fix
    assert v.fix.startswith('ALTER TABLE "crm"."market_demand" ADD COLUMN "product_category" '
                            "text;")


def test_without_attnums_no_rename_is_guessed() -> None:
    """A Relation message's shape has no attnums: a rename cannot be told from a drop."""
    renamed = _demand(renamed={"product_category": "category"})
    [v] = check(DEMAND, Shape(renamed.table, "f", renamed.columns, renamed.types),
                known=_demand())
    assert "RENAME" not in v.fix


def test_without_a_known_shape_the_fix_says_what_to_restore() -> None:
    [v] = check(DEMAND, _demand(product_category=None))
    assert v.fix.startswith("-- restore column product_category of crm.market_demand")


def test_a_date_field_fed_by_a_text_column_is_a_type_violation() -> None:
    [v] = check(DEMAND, _demand(observed_at=TEXT), known=_demand())
    assert v.column == "observed_at"
    assert v.problem == "type text cannot feed market_demand.observed_at"
    assert v.fix == ('ALTER TABLE "crm"."market_demand" ALTER COLUMN "observed_at" TYPE '
                     'timestamp with time zone USING "observed_at"::timestamp with time zone;')


def test_a_relation_messages_shape_names_built_in_types_not_oids() -> None:
    # A Relation message carries type OIDs only (no ``types``): a built-in type is named as
    # SQL spells it, any other by its OID.
    relation = Shape("crm.market_demand", "f", {**_demand().columns, "observed_at": TEXT})
    [v] = check(DEMAND, relation)
    assert v.problem == "type text cannot feed market_demand.observed_at"
    relation = Shape("crm.market_demand", "f", {**_demand().columns, "observed_at": BOOL})
    assert check(DEMAND, relation)[0].problem.startswith("type boolean cannot feed")
    relation = Shape("crm.market_demand", "f", {**_demand().columns, "observed_at": 16401})
    assert check(DEMAND, relation)[0].problem.startswith("type 16401 cannot feed")
    assert contract.type_name(1700) == "numeric"
    assert contract.type_name(TIMESTAMPTZ) == "timestamp with time zone"


@pytest.mark.parametrize("oid", [DATE, 1114, TIMESTAMPTZ])
def test_any_date_or_timestamp_type_feeds_a_timestamp_field(oid: int) -> None:
    assert check(DEMAND, _demand(observed_at=oid)) == []


def test_text_fields_take_any_type() -> None:
    assert check(DEMAND, _demand(content=1700, kind=BOOL, demand_id=TEXT)) == []


def test_replica_identity_other_than_full_is_a_table_violation() -> None:
    shape = _demand()
    for identity, named in (("d", "DEFAULT"), ("n", "NOTHING"), ("i", "USING INDEX")):
        [v] = check(DEMAND, Shape(shape.table, identity, shape.columns))
        assert v.column == TABLE and f"replica identity is {named}" in v.problem
        assert v.fix == 'ALTER TABLE "crm"."market_demand" REPLICA IDENTITY FULL;'


def test_a_boolean_delete_flag_must_stay_boolean() -> None:
    accounts = BOTTLE.table("public.accounts")
    assert accounts is not None and accounts.deleted_when is not None
    allowed, uses = contract.accepts(accounts, "is_active")
    assert allowed == frozenset({BOOL}) and "the delete flag" in uses
    columns = dict.fromkeys(accounts.columns, TEXT)
    assert [v.column for v in check(accounts, Shape("public.accounts", "f", columns))] == [
        "is_active"]
    columns["is_active"] = BOOL
    assert check(accounts, Shape("public.accounts", "f", columns)) == []


def test_check_profile_covers_every_table_in_profile_order() -> None:
    found = check_profile(DEMO, {"crm.market_demand": _demand(observed_at=TEXT)})
    assert [(v.table, v.column) for v in found] == [
        ("crm.customers", TABLE), ("crm.sales_orders", TABLE), ("crm.order_lines", TABLE),
        ("crm.market_demand", "observed_at")]


# ---- the decoder -----------------------------------------------------------------------
def _relation(identity: str, columns: list[tuple[str, int]]) -> bytes:
    out = b"R" + struct.pack(">I", 7) + b"crm\0market_demand\0" + identity.encode()
    out += struct.pack(">H", len(columns))
    for name, oid in columns:
        out += b"\0" + name.encode() + b"\0" + struct.pack(">Ii", oid, -1)
    return out


def _begin() -> bytes:
    return b"B" + struct.pack(">QqI", 100, 0, 9)


def _insert(values: list[str]) -> bytes:
    out = b"I" + struct.pack(">I", 7) + b"N" + struct.pack(">H", len(values))
    for v in values:
        out += b"t" + struct.pack(">I", len(v.encode())) + v.encode()
    return out


def _commit() -> bytes:
    return b"C" + struct.pack(">BQQq", 0, 100, 120, 0)


def test_the_decoder_asks_before_any_change_and_stops_on_what_the_check_raises() -> None:
    seen: list[pgoutput.Relation] = []

    def broken(rel: pgoutput.Relation) -> CaptureRejected | None:
        seen.append(rel)
        raise SourceContractBroken([Violation(rel.qualified_name, "product_category",
                                              "missing", "fix")])

    decoder = ChangeDecoder(check_relation=broken)
    decoder.feed(_begin())
    with pytest.raises(SourceContractBroken):
        decoder.feed(_relation("f", [("demand_id", INT8), ("kind", TEXT)]))
    assert [r.qualified_name for r in seen] == ["crm.market_demand"]


def test_changes_under_a_relation_broken_then_are_rejected_with_their_raw_values() -> None:
    rejection = CaptureRejected("written while the table broke the source contract",
                                "product_category")
    decoder = ChangeDecoder(check_relation=lambda rel: rejection)
    decoder.feed(_begin())
    decoder.feed(_relation("f", [("demand_id", INT8), ("kind", TEXT)]))
    decoder.feed(_insert(["1", "市场趋势"]))
    txn = decoder.feed(_commit())
    assert txn is not None and len(txn.changes) == 1
    assert txn.rejected[0].error is rejection
    assert txn.rejected[0].after == {"demand_id": "1", "kind": "市场趋势"}


# ---- a retype that keeps the contract (the table was rewritten: re-snapshot it) ----------

VARCHAR = 1043


def _typmods(shape: Shape, **typmods: int) -> Shape:
    mods = {c: -1 for c in shape.columns} | typmods
    return Shape(shape.table, shape.replica_identity, shape.columns, shape.types,
                 shape.attnums, mods)


def test_a_mapped_column_retyped_to_a_type_it_still_takes_is_named() -> None:
    known = _typmods(_demand())
    now = _typmods(_demand(content=VARCHAR), content=204)
    assert check(DEMAND, now) == []  # the contract holds: capture goes on
    assert contract.retyped(DEMAND, known, now) == ["content"]


def test_a_type_modifier_change_alone_is_a_retype() -> None:
    # varchar(100) -> varchar(200), numeric(16,4) -> numeric(14,2): same OID, a rewrite
    known = _typmods(_demand(content=VARCHAR), content=104)
    now = _typmods(_demand(content=VARCHAR), content=204)
    assert contract.retyped(DEMAND, known, now) == ["content"]


def test_no_retype_without_a_known_shape_or_for_unmapped_columns_or_same_types() -> None:
    known = _typmods(_demand(scratch=TEXT))
    assert contract.retyped(DEMAND, None, known) == []
    assert contract.retyped(DEMAND, known, _typmods(_demand(scratch=INT8))) == []
    assert contract.retyped(DEMAND, known, known) == []
    # a Relation message's shape without typmods compares OIDs only
    assert contract.retyped(DEMAND, known, _demand()) == []


def test_recorded_types_compare_mapped_columns_only_and_a_new_column_is_no_change() -> None:
    shape = _demand(scratch=TEXT)
    recorded = contract.mapped_types(DEMAND, shape)
    assert "scratch" not in recorded
    assert recorded["observed_at"] == "timestamp with time zone"
    now = dict(recorded, content="character varying(200)")
    assert contract.changed_types(recorded, now) == ["content"]
    assert contract.changed_types({"demand_id": "bigint"}, recorded) == []
    assert contract.changed_types(recorded, recorded) == []
