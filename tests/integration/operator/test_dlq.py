"""`crm-erp-sync dlq`: list, show, redrive after a mapping fix, discard, audit, refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def test_redrive_after_a_mapping_fix_then_discard(sync_env: SyncEnv, cli: Cli,
                                                   running: Running, tmp_path: Path) -> None:
    default = sync_env.settings.mappings_file.read_text("utf-8")
    bad, fixed = tmp_path / "bad.toml", tmp_path / "fixed.toml"
    bad.write_text(default, "utf-8")
    fixed.write_text(default.replace("[products]\n", '[products]\nP-NEW = "SKU-999999"\n')
                     .replace("[sku_units]\n", '[sku_units]\nSKU-999999 = { base = "UNIT" }\n'),
                     "utf-8")
    s_bad = sync_env.with_(mappings_file=bad)
    s_fixed = sync_env.with_(mappings_file=fixed)
    produce_all(sync_env)  # creates the slot: what follows is streamed, not snapshotted
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (900, 'X900', %s, '2023-01-01', "
                        "'已付款', '元')", (buyer,))
            crm.execute("INSERT INTO crm.order_lines VALUES (900, 1, %s, 'P-NEW', '平衡车', "
                        "'10台', 5000)", (buyer,))
        # After the failing order, on the same key: must wait for the redrive.
        crm.execute("UPDATE crm.customers SET phone = '13900000000' WHERE customer_id = %s",
                    (buyer,))
        masked = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                             "VALUES ('张', '三', '138xxxx5678') RETURNING customer_id"
                             ).fetchone()[0]
        # An order of theirs waits behind the letter (a corrected customer row would
        # supersede the letter by itself: tests/integration/consumer/test_applier.py).
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (901, 'X901', %s, '2023-01-01', "
                        "'待付款', '元')", (masked,))
            crm.execute("INSERT INTO crm.order_lines VALUES (901, 1, %s, 'P-PHONE-5G', '手机', "
                        "'1台', 5000)", (masked,))
    produce_all(sync_env)
    consumer = running.start_consumer(s_bad)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute("SELECT count(*) FROM sync.held_events").fetchone()[0]
                   == 2, message="two dead letters and two held events")
    running.stop(consumer)

    listed = cli(s_bad, "dlq", "list", "--json")
    assert listed.code == 0, listed.err
    letters = {int(d["key"]): d for d in listed.json}
    assert set(letters) == {buyer, masked}
    order_id, masked_id = letters[buyer]["dead_letter_id"], letters[masked]["dead_letter_id"]
    assert letters[buyer]["error_class"] == "MappingError"
    assert "product" in letters[buyer]["error_message"]
    table = cli(s_bad, "dlq", "list", "--key", str(masked))
    assert table.code == 0 and "MappingError" in table.out and "phone" in table.out
    # the same UTC-with-offset rendering as `status`, `snapshot list` and `dlq show`
    created = datetime.fromisoformat(letters[masked]["created_at"]).astimezone(UTC)
    assert f"{created:%Y-%m-%d %H:%M:%S}+0000" in table.out, table.out
    assert cli(s_bad, "dlq", "list", "--error-type", "DecodeError").out.startswith("No dead")
    by_field = cli(s_bad, "dlq", "list", "--field", "phone", "--json")
    assert [d["dead_letter_id"] for d in by_field.json] == [masked_id]
    assert [d["dead_letter_id"] for d in cli(s_bad, "dlq", "list", "--field", "lines.product_code",
                                             "--json").json] == [order_id]
    assert cli(s_bad, "dlq", "redrive", "--field", "phone", "--dry-run").code == 1
    # a line's field is only ever named inside its order: the bare name is a typo, not an
    # empty filter ("Nothing to redrive", exit 0, while the letter waits; newcomer8)
    bare = cli(s_bad, "dlq", "redrive", "--field", "product_code", "--dry-run")
    assert bare.code == 2, (bare.out, bare.err)
    assert "did you mean 'lines.product_code'?" in bare.err, bare.err
    with sync_env.erp() as erp:
        assert erp.execute("SELECT count(*) FROM sync.held_events WHERE reason = 'key_blocked'"
                           ).fetchone() == (2,)

    status = cli(s_bad, "status")
    assert status.code == 1 and "MappingError" in status.out

    shown = cli(s_bad, "dlq", "show", str(order_id), "--json").json
    assert "kafka_dlt-original-topic" in shown["headers"], shown["headers"]
    assert shown["headers"]["kafka_dlt-original-topic"] == sync_env.settings.sales_topic
    assert "MappingError" in shown["headers"]["kafka_dlt-exception-fqcn"]
    assert shown["kind"] == "order"
    assert shown["payload"]["lines"][0]["after"]["product_code"] == "P-NEW"
    text = cli(s_bad, "dlq", "show", str(order_id))
    assert text.code == 0 and "P-NEW" in text.out and "Trace:" in text.out

    # Still the old mappings: a dry run says it would fail; a redrive fails again.
    dry = cli(s_bad, "dlq", "redrive", str(order_id), "--dry-run", "--json")
    assert dry.code == 1 and dry.json["outcomes"][0]["outcome"] == "would_fail_again"
    # In text, as an operator reads it: the advice that ends the detail is shown whole (a
    # table cut to 90 characters for redrive, 100 for show, used to drop it).
    again = cli(s_bad, "dlq", "redrive", str(order_id), "--actor", "ops-1")
    assert again.code == 1 and "failed_again" in again.out
    # an order's event holds only the lines its transaction changed: discarding the letter
    # alone would leave a line that failed here out of the ERP, so the order is re-read too
    order_key = shown["payload"]["key"]
    advice = (f"re-read the order, `crm-erp-sync snapshot --table order --key {order_key}`, "
              "so that the ERP gets every line as the CRM has it)")
    assert "`dlq discard` this letter" in again.out and advice in again.out, again.out
    shown_text = cli(s_bad, "dlq", "show", str(order_id))
    assert advice in shown_text.out
    with sync_env.erp() as erp:
        assert erp.execute("SELECT state, last_error FROM sync.dead_letters "
                           "WHERE dead_letter_id = %s", (order_id,)).fetchone()[0] == \
            "failed_again"
        assert erp.execute("SELECT count(*) FROM erp.sales_orders").fetchone() == (0,)

    # The operator fixed the mapping file: dry run says it maps, then the redrive works and
    # the customer update held behind it is applied after it.
    assert cli(s_fixed, "dlq", "redrive", "--all", "--dry-run").code == 1  # masked still fails
    done = cli(s_fixed, "dlq", "redrive", "--error-type", "MappingError", "--actor", "ops-1",
               "--reason", "added P-NEW to mappings", "--json")
    by_id = {o["dead_letter_id"]: o for o in done.json["outcomes"]}
    assert by_id[order_id]["outcome"] == "redriven"
    assert by_id[order_id]["released"] == 1
    assert by_id[masked_id]["outcome"] == "failed_again"
    with sync_env.erp() as erp:
        assert erp.execute("SELECT status_code FROM erp.sales_orders WHERE crm_order_id = '900'"
                           ).fetchone() == ("PAID",)
        assert erp.execute("SELECT sku FROM erp.sales_order_items").fetchall() == [
            ("SKU-999999",)]
        assert erp.execute("SELECT reserved FROM erp.stock WHERE sku = 'SKU-999999'"
                           ).fetchone()[0] == 10
        assert erp.execute("SELECT phone_e164 FROM erp.business_partners "
                           "WHERE crm_customer_id = %s", (str(buyer),)).fetchone() == (
            "+8613900000000",)
        assert erp.execute("SELECT action, actor, outcome FROM sync.dead_letter_actions "
                           "WHERE dead_letter_id = %s ORDER BY action_id", (order_id,)
                           ).fetchall() == [("redrive", "ops-1", "failed_again"),
                                            ("redrive", "ops-1", "redriven")]
    refused = cli(s_fixed, "dlq", "redrive", str(order_id))
    assert refused.code == 1 and "already redriven" in refused.out

    # The masked phone cannot be fixed by a mapping: discard it; the order is released (and
    # waits for its customer, who never reached the ERP).
    with pytest.raises(SystemExit) as no_reason:
        cli(s_fixed, "dlq", "discard", str(masked_id))
    assert no_reason.value.code == 2
    assert cli(s_fixed, "dlq", "discard", str(masked_id), "--reason", " ").code == 2
    gone = cli(s_fixed, "dlq", "discard", str(masked_id), "--reason",
               "masked phone; the corrected record follows", "--actor", "ops-2")
    assert gone.code == 0, gone.out + gone.err
    assert "discarded" in gone.out
    with sync_env.erp() as erp:
        assert erp.execute("SELECT state, resolved_at IS NOT NULL FROM sync.dead_letters "
                           "WHERE dead_letter_id = %s", (masked_id,)).fetchone() == (
            "discarded", True)
        assert erp.execute("SELECT action, actor, reason, outcome FROM "
                           "sync.dead_letter_actions WHERE dead_letter_id = %s ORDER BY action_id",
                           (masked_id,)).fetchall() == [
            ("redrive", "ops-1", "added P-NEW to mappings", "failed_again"),
            ("discard", "ops-2", "masked phone; the corrected record follows", "discarded")]
        assert erp.execute("SELECT reason, waits_for FROM sync.held_events").fetchall() == [
            ("awaiting_customer", str(masked))]
    assert cli(s_fixed, "dlq", "discard", str(masked_id), "--reason", "x").code == 1
    assert cli(s_fixed, "dlq", "list", "--json").json == []
    history = cli(s_fixed, "dlq", "list", "--state", "all", "--json").json
    assert {d["state"] for d in history} == {"redriven", "discarded"}
    assert cli(s_fixed, "dlq", "show", "424242").code == 2


def test_bulk_discard_by_field_with_confirmation_and_dry_run(
        sync_env: SyncEnv, cli: Cli) -> None:
    from service.consumer.pipeline import ErpConsumer
    from tests.helpers import consume_until_caught_up

    settings = sync_env.settings
    produce_all(sync_env)
    with sync_env.crm() as crm:
        for name in ("一", "二"):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('张', %s, '138xxxx5678')", (name,))
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (960, 'X960', %s, '2023-01-01', "
                        "'已付款', '元')", (buyer,))
            crm.execute("INSERT INTO crm.order_lines VALUES (960, 1, %s, 'P-NEW', '平衡车', "
                        "'10台', 5000)", (buyer,))
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(settings))

    def states() -> dict[str, list[str]]:
        with sync_env.erp() as erp:
            rows = erp.execute("SELECT state, split_part(error_message, ': ', 1) "
                               "FROM sync.dead_letters ORDER BY 2").fetchall()
        out: dict[str, list[str]] = {}
        for state, fld in rows:
            out.setdefault(fld, []).append(state)
        return out

    before = states()
    assert before["phone"] == ["open", "open"] and len(before) == 2

    dry = cli(settings, "dlq", "discard", "--field", "phone", "--reason", "masked", "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out.count("would_discard") == 3 and "DRY RUN" in dry.out
    assert states() == before
    # No terminal to ask (stdin is not a TTY here): refused, nothing changed.
    unconfirmed = cli(settings, "dlq", "discard", "--field", "phone", "--reason", "masked")
    assert unconfirmed.code == 1 and "not confirmed" in unconfirmed.err
    assert states() == before
    assert cli(settings, "dlq", "discard", "1", "--field", "phone", "--reason", "x").code == 2
    assert cli(settings, "dlq", "discard", "--reason", "x").code == 2
    assert cli(settings, "dlq", "discard", "--error-type", "MapingError", "--reason",
               "x").code == 2  # a typo is refused
    for action in (["list"], ["redrive"], ["discard", "--reason", "x", "--yes"]):
        typo = cli(settings, "dlq", *action, "--field", "phon")  # refused, not "nothing"
        assert typo.code == 2, (action, typo.out)
        assert "--field" in typo.err and "did you mean 'phone'?" in typo.err
    # a field the profile maps but no letter names yet: a real filter, just empty
    assert cli(settings, "dlq", "list", "--field", "email").out.startswith("No dead letters")

    done = cli(settings, "dlq", "discard", "--field", "phone", "--reason", "masked numbers",
               "--yes", "--actor", "ops", "--json")
    assert done.code == 0, done.err
    assert [o["outcome"] for o in done.json["outcomes"]] == ["discarded", "discarded"]
    after = states()
    assert after["phone"] == ["discarded", "discarded"]
    assert after == {**before, "phone": ["discarded", "discarded"]}  # the other stays open
    with sync_env.erp() as erp:
        assert erp.execute("SELECT DISTINCT actor, reason FROM sync.dead_letter_actions "
                           "WHERE action = 'discard'").fetchall() == [("ops", "masked numbers")]


def test_a_discard_releases_what_was_held_before_the_keys_next_letter(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    """Held behind letter A, followed by letter B of the same key: discarding A releases what
    came between A and B, not what follows B (newcomer8's N10: it all waited for B)."""
    produce_all(sync_env)
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        for order_id, product in ((910, "P-NEW"), (911, "P-PHONE-5G"), (912, "P-NEWER"),
                                  (913, "P-PHONE-5G")):
            with crm.transaction():
                crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                            "order_date, status) VALUES (%s, %s, %s, '2023-01-01', '已付款')",
                            (order_id, f"X{order_id}", buyer))
                crm.execute("INSERT INTO crm.order_lines VALUES (%s, 1, %s, %s, '手机', "
                            "'1台', 5000)", (order_id, buyer, product))
    produce_all(sync_env)
    consumer = running.start_consumer(sync_env.settings)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute("SELECT count(*) FROM sync.held_events").fetchone()[0]
                   == 2, message="two order letters and two orders held behind them")
    running.stop(consumer)
    in_log_order = sorted(cli(sync_env.settings, "dlq", "list", "--json").json,
                          key=lambda d: (d["partition"], d["offset"]))
    letters = {cli(sync_env.settings, "dlq", "show", str(d["dead_letter_id"]), "--json"
                   ).json["payload"]["key"]: d["dead_letter_id"] for d in in_log_order}
    assert list(letters) == ["910", "912"], letters

    gone = cli(sync_env.settings, "dlq", "discard", str(letters["910"]), "--reason", "test")
    assert gone.code == 0, gone.out + gone.err
    with sync_env.erp() as erp:
        assert erp.execute("SELECT crm_order_id FROM erp.sales_orders").fetchall() == [("911",)]
        held = erp.execute('SELECT reason, "offset" FROM sync.held_events').fetchall()
        assert [reason for reason, _ in held] == ["key_blocked"]
        assert erp.execute("SELECT state FROM sync.dead_letters WHERE dead_letter_id = %s",
                           (letters["912"],)).fetchone() == ("open",)
        letter_offset = erp.execute('SELECT "offset" FROM sync.dead_letters '
                                    "WHERE dead_letter_id = %s", (letters["912"],)).fetchone()[0]
        assert held[0][1] > letter_offset  # 913 still waits for 912's letter

    # Discarding the second letter releases the rest.
    assert cli(sync_env.settings, "dlq", "discard", str(letters["912"]), "--reason",
               "test").code == 0
    with sync_env.erp() as erp:
        assert erp.execute("SELECT crm_order_id FROM erp.sales_orders ORDER BY 1").fetchall() == [
            ("911",), ("913",)]
        assert erp.execute("SELECT count(*) FROM sync.held_events").fetchone() == (0,)
