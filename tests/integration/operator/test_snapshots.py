"""`crm-erp-sync snapshot list` / `snapshot cancel ID` (issue #14 item 6)."""

from __future__ import annotations

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from tests.conftest import SyncEnv
from tests.integration.conftest import Cli


def test_list_and_cancel_snapshots(sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.settings
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    producer.run(until_idle=True)  # the initial snapshots (nothing in the CRM yet)
    with sync_env.crm() as crm:
        for i in range(5):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('赵', %s, '13912345678')", (str(i),))
    first = cli(settings, "snapshot", "--table", "customer", "--chunk-size", "2", "--json")
    second = cli(settings, "snapshot", "--table", "customer", "--json")
    assert first.code == second.code == 0, first.err + second.err
    assert second.out == (f'{{"snapshot_id": {second.json["snapshot_id"]}, '
                          '"table": "crm.customers", "keys": "all"}\n')  # as scripts read it
    cancel_id, keep_id = first.json["snapshot_id"], second.json["snapshot_id"]

    listed = cli(settings, "snapshot", "list", "--json")
    assert listed.code == 0
    by_id = {r["snapshot_id"]: r for r in listed.json}
    assert by_id[cancel_id]["state"] == by_id[keep_id]["state"] == "pending"
    assert [r["snapshot_id"] for r in listed.json][:2] == [keep_id, cancel_id]  # newest first

    cancelled = cli(settings, "snapshot", "cancel", str(cancel_id))
    assert cancelled.code == 0 and f"cancelled snapshot {cancel_id}" in cancelled.out
    again = cli(settings, "snapshot", "cancel", str(cancel_id))
    assert again.code == 1 and "is cancelled" in again.err
    assert cli(settings, "snapshot", "cancel", "99999").code == 2
    assert cli(settings, "snapshot", "cancel").code == 2
    assert cli(settings, "snapshot").code == 2  # neither --table nor an action

    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    after = {r["snapshot_id"]: r for r in cli(settings, "snapshot", "list", "--json").json}
    assert after[cancel_id]["state"] == "cancelled" and after[cancel_id]["rows_emitted"] == 0
    assert after[keep_id]["state"] == "done" and after[keep_id]["rows_emitted"] == 5
    text = cli(settings, "snapshot", "list")
    assert "cancelled" in text.out and "done" in text.out
    one = cli(settings, "snapshot", "list", str(keep_id), "--json")  # that one only
    assert [r["snapshot_id"] for r in one.json] == [keep_id], one.out
    assert cli(settings, "snapshot", "list", "99999").code == 2
    done = cli(settings, "snapshot", "cancel", str(keep_id))
    assert done.code == 1 and "is done" in done.err

    # Without --json: a sentence for the operator, as the other commands print
    with sync_env.crm() as crm:
        a, b = (str(r[0]) for r in crm.execute(
            "SELECT customer_id FROM crm.customers ORDER BY customer_id LIMIT 2").fetchall())
    said = cli(settings, "snapshot", "--table", "customer", "--key", a, "--key", b)
    assert said.code == 0, said.err
    assert said.out.startswith("requested snapshot ") and "{" not in said.out, said.out
    assert f"of crm.customers (keys {a}, {b})" in said.out and "chunks of 1000 rows" in said.out
