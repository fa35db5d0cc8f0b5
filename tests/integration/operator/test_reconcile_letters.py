"""What `reconcile` says of a row that cannot be mapped: the field and the error class, and
the dead letter that holds the reason (`dlq show <id>`), never the reason itself nor any CRM
value. A status column can hold anything (a name and a phone), a MappingError's reason quotes
the word, and the shipped reconcile CronJob's output is a pod log."""

from __future__ import annotations

from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running, caught_up

PLANTED = "张三 13812345678"


def test_reconcile_names_the_field_and_the_letter_not_the_value(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name) "
                            "VALUES ('李', '娜') RETURNING customer_id").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, "
                    "status, currency) VALUES (9400, 'A9400', %s, '2023-01-01', %s, '元')",
                    (buyer, PLANTED))
    running.start_producer(settings)
    running.start_consumer(settings)
    caught_up(sync_env)

    def letter() -> int | None:
        with sync_env.erp() as erp:
            row = erp.execute("SELECT dead_letter_id FROM sync.dead_letters "
                              "WHERE event_kind = 'order' AND state = 'open'").fetchone()
        return None if row is None else int(row[0])

    wait_until(lambda: letter() is not None, timeout=60, message="the order's dead letter")
    letter_id = letter()

    # behind its open letter: held, listed, not drift (newcomer9 F10)
    text = cli(settings, "reconcile", "--entity", "orders")
    assert text.code == 0, text.out
    line = next(x for x in text.out.splitlines() if x.startswith("orders 9400 "))
    assert "cannot be mapped: MappingError" in line and "status" in line, line
    assert f"held behind dead letter #{letter_id}" in line, line
    assert f"dlq show {letter_id}" in line, line
    assert "No drift. 1 key(s) held behind dead letters" in text.out, text.out
    as_json = cli(settings, "reconcile", "--entity", "orders", "--json")
    assert as_json.code == 0
    assert (as_json.json["drift"], as_json.json["held"]) == (0, 1)
    (orders,) = as_json.json["entities"]
    assert orders["unmappable"] == {}
    assert "status" in orders["held"]["9400"]
    assert f"dlq show {letter_id}" in orders["held"]["9400"]
    for out in (text.out, text.err, as_json.out, as_json.err):
        assert "张三" not in out and "13812345678" not in out, out
        assert "unknown order status" not in out  # the reason stays in the letter

    # the operator's screen still shows the reason, from the letter
    shown = cli(settings, "dlq", "show", str(letter_id))
    assert shown.code == 0 and "unknown order status" in shown.out
