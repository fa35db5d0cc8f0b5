"""`crm-erp-sync trace KEY` (issue #14 item 7): a key that went through create, update, a
dead letter and its redrive shows each step."""

from __future__ import annotations

import socket
import time
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


def test_trace_shows_create_update_dead_letter_and_redrive(sync_env: SyncEnv, cli: Cli,
                                                           tmp_path: Path) -> None:
    default = sync_env.settings.mappings_file.read_text("utf-8")
    bad, fixed = tmp_path / "bad.toml", tmp_path / "fixed.toml"
    bad.write_text(default, "utf-8")
    fixed.write_text(default.replace("[products]\n", '[products]\nP-NEW = "SKU-999999"\n')
                     .replace("[sku_units]\n", '[sku_units]\nSKU-999999 = { base = "UNIT" }\n'),
                     "utf-8")
    s_bad, s_fixed = sync_env.with_(mappings_file=bad), sync_env.with_(mappings_file=fixed)
    produce_all(sync_env)
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('李', '四', '13912345678') RETURNING customer_id").fetchone()[0]
        with crm.transaction():
            crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                        "order_date, status, currency) VALUES (970, 'X970', %s, '2023-01-01', "
                        "'待付款', '元')", (buyer,))
            crm.execute("INSERT INTO crm.order_lines VALUES (970, 1, %s, 'P-PHONE-5G', '手机', "
                        "'10台', 5000)", (buyer,))
        crm.execute("UPDATE crm.sales_orders SET status = '已付款' WHERE order_id = 970")
        crm.execute("UPDATE crm.order_lines SET product_code = 'P-NEW' WHERE order_id = 970")
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(s_bad))
    letters = cli(s_bad, "dlq", "list", "--json").json
    assert len(letters) == 1
    redriven = cli(s_fixed, "dlq", "redrive", str(letters[0]["dead_letter_id"]), "--reason",
                   "SKU added", "--actor", "ops")
    assert redriven.code == 0, redriven.out

    t = cli(s_fixed, "trace", "970", "--json")
    assert t.code == 0, t.err
    tr = t.json
    assert [c["entity"] for c in tr["crm"]] == ["order"]
    order_events = [e for e in tr["events"] if e["kind"] == "order"]
    assert [e["op"] for e in order_events] == ["CREATE", "UPDATE", "UPDATE"]
    assert len({(e["partition"]) for e in order_events}) == 1
    assert [o for o in order_events if o["event_key"] == "970"] == order_events
    [erp_order] = [r for r in tr["erp"] if r["as"] == "order"]
    last = order_events[-1]
    # The ERP row's position is one of the key's events (the last that changed the header).
    assert (erp_order["row"]["source_lsn"], erp_order["row"]["source_seq"]) in [
        (e["lsn"], e["seq"]) for e in order_events]
    [letter] = tr["dead_letters"]
    assert letter["state"] == "redriven" and letter["offset"] == last["offset"]
    assert [(a["action"], a["actor"], a["outcome"]) for a in letter["actions"]] == [
        ("redrive", "ops", "redriven")]
    assert tr["held"] == []

    # An order line's key (its changes travel in its order's events) is followed to its
    # order: the order's events and its dead letter, found before only through "970".
    line = cli(s_fixed, "trace", '["970","1"]', "--json")
    assert line.code == 0, line.err
    lj = line.json
    assert lj["follows"] == ["970"]
    assert [c["entity"] for c in lj["crm"]] == ["order_line", "order"]
    assert [(e["offset"], e["op"]) for e in lj["events"]] == [
        (e["offset"], e["op"]) for e in order_events]
    assert [d["dead_letter_id"] for d in lj["dead_letters"]] == [letter["dead_letter_id"]]
    assert {r["as"] for r in lj["erp"]} == {"order of the line", "order line"}
    line_text = cli(s_fixed, "trace", '["970","1"]')
    assert "followed to its order 970" in line_text.out
    assert f"#{letter['dead_letter_id']}" in line_text.out
    assert "event None" not in line_text.out  # a line's row has no event id: '-'

    text = cli(s_fixed, "trace", "970")
    assert "CRM order" in text.out and "Events on Kafka (3 of" in text.out
    assert "redriven" in text.out and "redrive by ops" in text.out
    assert cli(s_fixed, "trace", "970", "--topic", "crm.salse").code == 2
    # A key found nowhere is a named object that does not exist: exit 2 (README, "Exit
    # codes"), saying so.
    nothing = cli(s_fixed, "trace", "no-such-key", "--json")
    assert nothing.code == 2 and nothing.json["events"] == [] and nothing.json["crm"] == []
    assert "'no-such-key' found nowhere" in nothing.err
    nothing_text = cli(s_fixed, "trace", "no-such-key")
    assert nothing_text.code == 2, nothing_text.out
    assert "'no-such-key' found nowhere" in nothing_text.err
    assert "Traceback" not in nothing_text.err


def closed_port() -> int:
    """A local port nothing listens on: bound (so the system handed it to nobody else), then
    closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trace_with_the_broker_down_shows_what_the_databases_hold(sync_env: SyncEnv,
                                                                   cli: Cli) -> None:
    # It printed nothing but the broker's line: now the CRM row, the ERP row and the dead
    # letter are shown, the events are said to be unknown, and it exits 3 (a part unchecked).
    produce_all(sync_env)
    with sync_env.crm() as crm:
        key = str(crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                              "VALUES ('李', '四', '13912345678') RETURNING customer_id"
                              ).fetchone()[0])
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(sync_env.settings))
    with sync_env.crm() as crm:  # an update the ERP cannot take: a dead letter of the key
        crm.execute("UPDATE crm.customers SET phone = '138xxxx5678' WHERE customer_id = %s",
                    (int(key),))
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(sync_env.settings))
    down = sync_env.with_(kafka_bootstrap=f"127.0.0.1:{closed_port()}")
    line = f"crm-erp-sync: broker {down.kafka_bootstrap} unreachable: events on Kafka unknown"

    started = time.monotonic()
    t = cli(down, "trace", key, "--json")
    assert time.monotonic() - started < 20
    assert t.code == 3, (t.out, t.err)
    assert t.err.splitlines() == [line]
    tr = t.json
    assert [c["entity"] for c in tr["crm"]] == ["customer"]
    assert [r["as"] for r in tr["erp"]] == ["customer"]
    [letter] = tr["dead_letters"]
    assert letter["error_class"] == "MappingError" and letter["state"] == "open"
    assert tr["events"] == [] and tr["broker_unreachable"] == line.removeprefix(
        "crm-erp-sync: ")

    text = cli(down, "trace", key)
    assert text.code == 3 and text.err.splitlines() == [line]
    assert "CRM customer (crm.customers)" in text.out and "138xxxx5678" in text.out
    assert (f"Events on Kafka: unknown (broker {down.kafka_bootstrap} unreachable"
            in text.out)
    assert "erp.business_partners (customer): position lsn" in text.out
    assert f"#{letter['dead_letter_id']}" in text.out and "MappingError" in text.out


def test_trace_of_an_order_shows_its_capture_dead_letter(sync_env: SyncEnv, cli: Cli) -> None:
    # newcomer7: an order whose row could not be captured (an infinity order date) has its
    # letter on the customer's Kafka key at an offset of its own; `trace ORDER` said
    # "Dead letters: none" while it held the customer's key.
    produce_all(sync_env)
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('张', '三', '13812345678') RETURNING customer_id").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                    "order_date, status, currency) VALUES (971, 'X971', %s, 'infinity', "
                    "'已发货', '元')", (buyer,))
    produce_all(sync_env)
    consume_until_caught_up(ErpConsumer(sync_env.settings))
    [letter] = cli(sync_env.settings, "dlq", "list", "--json").json
    assert letter["stage"] == "capture", letter

    tr = cli(sync_env.settings, "trace", "971", "--json").json
    assert [d["dead_letter_id"] for d in tr["dead_letters"]] == [letter["dead_letter_id"]]
    assert tr["dead_letters"][0]["error_class"] == "UnrepresentableValue"
