"""service.cdc.prerequisites: how `setup --check` renders its checks and quotes its SQL."""

from __future__ import annotations

from service.cdc.prerequisites import (
    Check,
    fix_script,
    quote_ident,
    quote_table,
    render_checks,
)


def test_identifiers_are_quoted_so_the_printed_sql_survives_odd_names() -> None:
    assert quote_table("public", "orders") == '"public"."orders"'
    assert quote_table("CRM", 'we"ird') == '"CRM"."we""ird"'
    assert quote_ident("cdc-reader") == '"cdc-reader"'


def test_a_passing_report_lists_every_check_and_no_sql() -> None:
    checks = [Check("wal_level", True, "logical"),
              Check("replica identity crm.customers", True, "FULL", fix_sql="unused;")]
    assert render_checks(checks) == (
        "✓ wal_level: logical\n"
        "✓ replica identity crm.customers: FULL\n"
        "all 2 checks passed."
    )
    assert fix_script(checks) == ""


def test_a_failed_check_prints_its_sql_indented_under_it() -> None:
    checks = [
        Check("wal_level", True, "logical"),
        Check("row-level security", False, "cdc is subject to RLS on public.orders",
              'ALTER ROLE "cdc" BYPASSRLS;'),
        Check("read access public.orders", False, "cdc cannot read it",
              'GRANT USAGE ON SCHEMA "public" TO "cdc";\n'
              'GRANT SELECT ON TABLE "public"."orders" TO "cdc";'),
    ]
    assert render_checks(checks).splitlines() == [
        "✓ wal_level: logical",
        "✗ row-level security: cdc is subject to RLS on public.orders",
        '    ALTER ROLE "cdc" BYPASSRLS;',
        "✗ read access public.orders: cdc cannot read it",
        '    GRANT USAGE ON SCHEMA "public" TO "cdc";',
        '    GRANT SELECT ON TABLE "public"."orders" TO "cdc";',
        "2 of 3 checks failed; run the SQL above as a superuser (or the tables' owner), "
        "then check again.",
    ]
    assert fix_script(checks) == (
        'ALTER ROLE "cdc" BYPASSRLS;\n'
        'GRANT USAGE ON SCHEMA "public" TO "cdc";\n'
        'GRANT SELECT ON TABLE "public"."orders" TO "cdc";'
    )


def test_a_failure_without_sql_says_so() -> None:
    missing = Check("table public.nope", False, "no such table")
    assert render_checks([missing]).splitlines() == [
        "✗ table public.nope: no such table",
        "1 of 1 checks failed; fix them, then check again."]
    fixable = Check("capture role cdc", False, "lacks REPLICATION", 'ALTER ROLE "cdc" REPLICATION;')
    assert render_checks([missing, fixable]).splitlines()[-1] == (
        "2 of 2 checks failed; run the SQL above as a superuser (or the tables' owner), "
        "fix the rest, then check again.")
