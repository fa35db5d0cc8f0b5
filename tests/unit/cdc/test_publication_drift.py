"""PublicationDrift's words: what `status`, the log and `setup --check` say (pure)."""

from __future__ import annotations

from service.cdc.capture import PublicationDrift


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
