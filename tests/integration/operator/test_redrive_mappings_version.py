"""`dlq redrive` names the mappings version it maps with, records it in the audit, and
refuses (exit 2, unless --force) a file whose version no running consumer applies
(finding N5: a redrive with another copy of the file applied what the consumers would refuse,
silently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.mappings_watch import mappings_version
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up, wait_until
from tests.integration.conftest import Cli, Running


def _actions(erp: Any, letter_id: int) -> list[tuple[str, str | None, str | None]]:
    return [(r[0], r[1], r[2]) for r in erp.execute(
        "SELECT outcome, mappings_version, reason FROM sync.dead_letter_actions "
        "WHERE dead_letter_id = %s ORDER BY action_id", (letter_id,)).fetchall()]


def _order_with_an_unknown_product(sync_env: SyncEnv) -> None:
    """Order 930 with product P-NEW, which the shipped mappings do not know."""
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (930, 'X930', %s, '2023-01-01', "
                        "'已付款', '元')", (buyer,))
            crm.execute("INSERT INTO crm.order_lines VALUES (930, 1, %s, 'P-NEW', '平衡车', "
                        "'10台', 5000)", (buyer,))
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def test_redrive_names_records_and_checks_its_mappings_version(
        sync_env: SyncEnv, cli: Cli, running: Running, tmp_path: Path) -> None:
    shipped = sync_env.settings.mappings_file.read_text("utf-8")
    theirs, other = tmp_path / "theirs.toml", tmp_path / "other.toml"
    theirs.write_text(shipped, "utf-8")
    other.write_text(shipped.replace("[products]\n", '[products]\nP-NEW = "SKU-999999"\n')
                     .replace("[sku_units]\n", '[sku_units]\nSKU-999999 = { base = "UNIT" }\n'),
                     "utf-8")
    v_theirs = mappings_version(theirs.read_bytes())
    v_other = mappings_version(other.read_bytes())
    s_theirs = sync_env.with_(mappings_file=theirs)
    s_other = sync_env.with_(mappings_file=other)

    _order_with_an_unknown_product(sync_env)
    running.start_consumer(s_theirs)  # keeps running: it applies v_theirs
    with sync_env.erp() as erp:
        letter_id = wait_until(lambda: (erp.execute(
            "SELECT dead_letter_id FROM sync.dead_letters").fetchone() or [None])[0],
            message="the order with the unknown product dead-lettered")
        wait_until(lambda: erp.execute(
            "SELECT mappings_version FROM sync.consumers").fetchall() == [(v_theirs,)],
            message="the consumer reports its mappings version")

        # The consumers' own file: printed, recorded (it fails again: P-NEW is unknown there).
        same = cli(s_theirs, "dlq", "redrive", str(letter_id), "--reason", "same file")
        assert same.code == 1, same.out + same.err
        assert f"Mappings version {v_theirs} ({theirs}; running consumers apply {v_theirs})" \
            in same.out, same.out
        assert "warning" not in same.err
        assert _actions(erp, letter_id) == [("failed_again", v_theirs, "same file")]

        # Another file no consumer runs: refused before anything is done, saying why.
        refused = cli(s_other, "dlq", "redrive", str(letter_id), "--reason", "other file")
        assert refused.code == 2, refused.out + refused.err
        assert "CRM_ERP_SYNC_MAPPINGS_FILE" in refused.err
        assert f"version {v_other}, which no running consumer applies" in refused.err
        assert f"apply {v_theirs}" in refused.err and "--force" in refused.err
        assert len(_actions(erp, letter_id)) == 1  # nothing redriven, nothing audited
        assert erp.execute("SELECT count(*) FROM erp.sales_orders").fetchone()[0] == 0

        # A dry run says so too, and changes nothing.
        dry = cli(s_other, "dlq", "redrive", str(letter_id), "--dry-run", "--json")
        assert dry.code == 0, dry.out + dry.err
        assert (dry.json["mappings_version"], dry.json["consumer_versions"]) == (
            v_other, [v_theirs])
        assert "no running consumer applies" in dry.err
        assert len(_actions(erp, letter_id)) == 1

        # --force: done, with the warning, and the version it used is in the audit.
        forced = cli(s_other, "dlq", "redrive", str(letter_id), "--force", "--reason", "ok")
        assert forced.code == 0, forced.out + forced.err
        assert f"Mappings version {v_other}" in forced.out
        assert "crm-erp-sync: warning: " in forced.err and v_other in forced.err
        assert _actions(erp, letter_id)[-1] == ("redriven", v_other, "ok")
        shown = cli(s_other, "dlq", "show", str(letter_id), "--json")
        assert [a["mappings"] for a in shown.json["actions"]] == [v_theirs, v_other]


def test_an_erp_without_the_audit_column_gets_the_version_in_the_detail(
        sync_env: SyncEnv, cli: Cli) -> None:
    # set up before the column: the redrive still works and still records the version
    with sync_env.erp() as erp:
        erp.execute("ALTER TABLE sync.dead_letter_actions DROP COLUMN mappings_version")
    _order_with_an_unknown_product(sync_env)
    consume_until_caught_up(ErpConsumer(sync_env.settings))
    version = mappings_version(sync_env.settings.mappings_file.read_bytes())
    again = cli(sync_env.settings, "dlq", "redrive", "--all")
    assert again.code == 1, again.out + again.err  # no consumer runs: nothing to compare
    assert f"Mappings version {version} (" in again.out
    assert "no consumer is running to compare with" in again.out
    with sync_env.erp() as erp:
        rows = erp.execute("SELECT dead_letter_id, detail FROM sync.dead_letter_actions"
                           ).fetchall()
    assert len(rows) == 1 and rows[0][1].endswith(f"; mappings {version}"), rows
    shown = cli(sync_env.settings, "dlq", "show", str(rows[0][0]), "--json")
    assert shown.code == 0 and shown.json["actions"][0]["mappings"] is None
