"""The ERP role's missing grants as GRANT statements and words (newcomer9 F6)."""

from __future__ import annotations

from service.erp.privileges import Missing, describe, grant_sql, schemas_for


def test_one_grant_per_object_with_its_privileges_in_order_and_quoted() -> None:
    missing = [Missing("table", "erp.business_partners", "UPDATE"),
               Missing("table", "sync.held_events", "INSERT"),
               Missing("table", "sync.held_events", "DELETE"),
               Missing("schema", "sync", "USAGE"),
               Missing("database", "erp db", "TEMPORARY")]

    assert grant_sql(missing, "Erp-Writer") == [
        'GRANT UPDATE ON TABLE "erp"."business_partners" TO "Erp-Writer";',
        'GRANT INSERT, DELETE ON TABLE "sync"."held_events" TO "Erp-Writer";',
        'GRANT USAGE ON SCHEMA "sync" TO "Erp-Writer";',
        'GRANT TEMPORARY ON DATABASE "erp db" TO "Erp-Writer";',
    ]
    assert describe(missing) == ("UPDATE on table erp.business_partners; INSERT, DELETE on "
                                 "table sync.held_events; USAGE on schema sync; TEMPORARY on "
                                 "database erp db")


def test_nothing_missing_is_no_grant() -> None:
    assert grant_sql([], "erp_writer") == [] and describe([]) == ""


def test_the_tryton_target_writes_only_the_sync_schema() -> None:
    assert schemas_for("sql") == ("erp", "sync")
    assert schemas_for("tryton") == ("sync",)
