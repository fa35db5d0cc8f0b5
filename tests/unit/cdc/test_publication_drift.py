"""PublicationDrift's words: what `status`, the log and `setup --check` say (pure)."""

from __future__ import annotations

from service.cdc.capture import PublicationDrift, Repair, rows_leaving_filter
from service.cli import repair_lines
from service.setup import SetupReport


def test_a_missing_table_names_the_publication_and_the_add_with_the_profile_filter() -> None:
    drift = PublicationDrift("nc6_pub", "public.accounts", True, None, "(org_id = 'x'::uuid)")
    assert drift.problem.startswith("not in publication nc6_pub")
    assert drift.sql_fix == ('ALTER PUBLICATION "nc6_pub" ADD TABLE "public"."accounts" '
                             "WHERE (org_id = 'x'::uuid);")
    assert drift.fix.startswith("run `crm-erp-sync setup` as the publication's owner")
    assert "crm-erp-sync snapshot --table public.accounts" in drift.fix


def test_a_changed_filter_names_both_filters_and_replaces_the_member() -> None:
    drift = PublicationDrift("p", "crm.customers", False, "(a > 1)", None)
    assert "filters it with (a > 1) but the source profile's row_filter is none" in drift.problem
    assert drift.sql_fix == ('ALTER PUBLICATION "p" DROP TABLE "crm"."customers"; '
                             'ALTER PUBLICATION "p" ADD TABLE "crm"."customers";')
    added = PublicationDrift("p", "crm.customers", False, None, "(a > 1)")
    assert "filters it with no filter but the source profile's row_filter is (a > 1)" in (
        added.problem)
    assert added.sql_fix.endswith('ADD TABLE "crm"."customers" WHERE (a > 1);')


def _setup_lines(*repairs: Repair) -> list[str]:
    return repair_lines(SetupReport([], False, True, list(repairs)))


def test_setup_says_rows_a_narrower_filter_excludes_stay_live_until_reconcile_repair() -> None:
    # F7 (newcomer7): a narrower filter retires nothing; setup said only "re-reads the table".
    drift = PublicationDrift("p", "crm.market_demand", False, "(kind <> 'spam'::text)",
                             "(kind <> '竞争对手分析'::text)")
    [line] = _setup_lines(Repair(drift, 6, 2))
    assert line.startswith("CRM: changed the row filter of crm.market_demand"), line
    assert line.endswith(
        "; requested snapshot 6 of it (changes made meanwhile were not captured; the producer "
        "re-reads the table); 2 row(s) of crm.market_demand in the CRM pass the old filter "
        "but not the new one: those applied before stay live in the ERP until `crm-erp-sync "
        "reconcile --repair` marks them deleted"), line
    [unknown] = _setup_lines(Repair(drift, 6, None))
    assert unknown.endswith("rows of crm.market_demand applied before that the new filter "
                            "excludes (if any) stay live in the ERP until `crm-erp-sync "
                            "reconcile --repair` marks them deleted (they could not be "
                            "counted)"), unknown


def test_setup_says_nothing_of_reconcile_when_no_row_leaves_the_filter() -> None:
    wider = PublicationDrift("p", "crm.customers", False, "(a > 1)", None)
    readded = PublicationDrift("p", "crm.customers", True, None, "(a > 1)")
    for line in _setup_lines(Repair(wider, 3), Repair(readded, 4, 0)):
        assert "reconcile" not in line, line
    assert rows_leaving_filter(None, wider) == 0  # type: ignore[arg-type]  # no query
    assert rows_leaving_filter(None, readded) == 0  # type: ignore[arg-type]
