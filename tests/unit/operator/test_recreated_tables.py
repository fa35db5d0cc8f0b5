"""Pure parts of finding N2: which reconcile entity a captured table feeds, and when a
reconcile run clears a dropped-and-re-created table from `status`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from service.cdc.profile import load_profile
from service.operator.reconcile import entity_of_table
from service.operator.status import recreated_line, unchecked_recreations

AT = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def _row(entity: str | None = "demand") -> dict[str, Any]:
    return {"table": "crm.market_demand", "recreated_at": AT, "entity": entity}


def test_each_captured_table_maps_to_the_entity_reconcile_checks_it_under() -> None:
    profile = load_profile("demo")
    assert entity_of_table(profile, "crm.customers") == "customers"
    assert entity_of_table(profile, "crm.sales_orders") == "orders"
    assert entity_of_table(profile, "crm.order_lines") == "orders"  # lines travel with orders
    assert entity_of_table(profile, "crm.market_demand") == "demand"
    assert entity_of_table(profile, "crm.nosuch") is None


def test_only_a_later_run_of_the_entity_without_extra_rows_clears_the_line() -> None:
    clean = {"demand": {"extra": 0, "missing": 0}}
    later, earlier = AT + timedelta(minutes=1), AT - timedelta(minutes=1)
    assert unchecked_recreations([_row()], []) == [_row()]
    assert unchecked_recreations([_row()], [(earlier, ["demand"], clean)]) == [_row()]
    assert unchecked_recreations([_row()], [(later, ["customers"], {
        "customers": {"extra": 0}})]) == [_row()]
    assert unchecked_recreations([_row()], [(later, ["demand"], {
        "demand": {"extra": 2}})]) == [_row()]
    assert unchecked_recreations([_row()], [(later, ["demand"], {})]) == [_row()]
    assert unchecked_recreations([_row()], [(later, ["demand"], {"demand": {"extra": 2}}),
                                            (later, ["demand"], clean)]) == []
    # the profile unreadable: the entity unknown, nothing can say it was checked
    assert unchecked_recreations([_row(None)], [(later, ["demand"], clean)]) == [_row(None)]


def test_the_line_names_table_time_and_the_reconcile_to_run() -> None:
    line = recreated_line(_row())
    assert line.startswith("crm.market_demand was dropped and created again (seen 2026-11-30")
    assert "rows dropped with the old table are still live in the ERP" in line
    assert "`crm-erp-sync reconcile --repair --entity demand`" in line
    assert "`crm-erp-sync reconcile --repair`" in recreated_line(_row(None))


def test_a_table_repaired_into_the_publication_has_its_own_line() -> None:
    """F8 (newcomer9): same mechanism, a wording that does not send the operator hunting
    for a DROP TABLE."""
    line = recreated_line({**_row(), "cause": "publication"})
    assert line.startswith("crm.market_demand was out of the publication (or its row filter "
                           "narrowed) until the producer repaired it 2026-11-30")
    assert "rows deleted meanwhile" in line
    assert "`crm-erp-sync reconcile --repair --entity demand`" in line
    assert "dropped and created again" in recreated_line({**_row(), "cause": "recreated"})
