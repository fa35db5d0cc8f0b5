"""Re-snapshots of a CRM row whose transform fails: one open letter per row, not one per
snapshot (the newest failing full-state event supersedes the older letters of its key)."""

from __future__ import annotations

from pathlib import Path

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up
from tests.integration.conftest import Cli


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def consume_all(sync_env: SyncEnv) -> None:
    stats = consume_until_caught_up(ErpConsumer(sync_env.settings))
    assert stats.caught_up and not stats.blocked


def test_each_resnapshot_supersedes_the_older_letters_and_the_newest_redrives(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    settings = sync_env.settings
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(settings.mappings_file.read_text("utf-8").replace(
        "[gender]\n", '[gender]\n"靓仔" = "M"\n'), "utf-8")
    produce_all(sync_env)  # the slot: what follows is streamed
    with sync_env.crm() as crm:
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name, gender, phone) "
                          "VALUES ('张', '三', '靓仔', '13812345678') RETURNING customer_id"
                          ).fetchone()[0]
        with crm.transaction():  # held behind the customer's letter
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (970, 'X970', %s, '2023-01-01', "
                        "'已发货', '元')", (cid,))
            crm.execute("INSERT INTO crm.order_lines VALUES (970, 1, %s, 'P-PHONE-5G', '手机', "
                        "'10台', 5000)", (cid,))
        other = crm.execute("INSERT INTO crm.customers (family_name, given_name, gender) "
                            "VALUES ('李', '四', '靓仔') RETURNING customer_id").fetchone()[0]
    produce_all(sync_env)
    consume_all(sync_env)
    for _ in range(2):  # an operator re-snapshots twice (as each `resync` does)
        assert cli(settings, "snapshot", "--table", "customer").code == 0
        produce_all(sync_env)
        consume_all(sync_env)

    with sync_env.erp() as erp:
        rows = erp.execute("SELECT dead_letter_id, convert_from(msg_key, 'UTF8'), state "
                           "FROM sync.dead_letters ORDER BY dead_letter_id").fetchall()
        mine = [(i, s) for i, k, s in rows if k == str(cid)]
        assert [s for _, s in mine] == ["superseded", "superseded", "open"]
        assert [s for _, k, s in rows if k == str(other)] == ["superseded", "superseded",
                                                               "open"]
        newest = mine[-1][0]
        actions = erp.execute(
            "SELECT dead_letter_id, action, actor, outcome, reason FROM "
            "sync.dead_letter_actions WHERE dead_letter_id = ANY(%s) ORDER BY dead_letter_id",
            ([i for i, _ in mine],)).fetchall()
        assert [a[:4] for a in actions] == [(mine[0][0], "supersede", "consumer", "superseded"),
                                            (mine[1][0], "supersede", "consumer", "superseded")]
        # each older letter names one that replaced it, the last one the newest
        assert f"dead letter {newest} " in actions[1][4]
        assert erp.execute("SELECT reason FROM sync.held_events").fetchall() == [
            ("key_blocked",)]
        assert erp.execute("SELECT count(*) FROM erp.business_partners").fetchone() == (0,)

    # what the operator sees: one letter per row; the history stays
    listed = cli(settings, "dlq", "list", "--json")
    assert sorted(d["key"] for d in listed.json) == sorted([str(cid), str(other)])
    history = cli(settings, "dlq", "list", "--state", "superseded", "--key", str(cid), "--json")
    assert [d["dead_letter_id"] for d in history.json] == [i for i, _ in mine[:2]]
    status = cli(settings, "status", "--json")
    assert sum(status.json["dead_letters"].values()) == 2, status.json["dead_letters"]
    shown = cli(settings, "dlq", "show", str(mine[0][0]), "--json").json
    assert shown["letter"]["state"] == "superseded"
    assert [a["action"] for a in shown["actions"]] == ["supersede"]

    # an older letter cannot be redriven; the newest can, with the fixed mappings, and the
    # order held behind the key follows it
    s_fixed = sync_env.with_(mappings_file=fixed)
    old = cli(s_fixed, "dlq", "redrive", str(mine[0][0]))
    assert old.code == 1 and "already superseded" in old.out
    done = cli(s_fixed, "dlq", "redrive", str(newest), "--json")
    assert done.code == 0, done.out + done.err
    assert done.json["outcomes"][0]["outcome"] == "redriven"
    assert done.json["outcomes"][0]["released"] == 1
    with sync_env.erp() as erp:
        assert erp.execute("SELECT crm_customer_id, gender_code FROM erp.business_partners"
                           ).fetchall() == [(str(cid), "M")]
        assert erp.execute("SELECT status_code FROM erp.sales_orders").fetchall() == [
            ("SHIPPED",)]
        assert erp.execute("SELECT count(*) FROM sync.held_events").fetchone() == (0,)
