"""Mappings reload under running consumers (issue #12 item 6), on the real broker and ERP:
a new status word applies without a restart; a broken file is refused and the old one kept;
SIGHUP reloads a real `crm-erp-sync consume` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.mappings_watch import mappings_version
from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli, Running

# Goods out of the warehouse: a word and an ERP status the shipped file does not have; the
# status issues stock, so the ERP's status effects must be reloaded too.
NEW_WORD = '"已出库" = "DISPATCHED"'
NEW_EFFECT = 'DISPATCHED = "issue"'


def produce_all(sync_env: SyncEnv) -> None:
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def with_status_word(text: str, line: str, effect: str | None = None) -> str:
    text = text.replace("[order_status]\n", f"[order_status]\n{line}\n", 1)
    if effect is not None:
        text = text.replace("[status_stock_effect]\n", f"[status_stock_effect]\n{effect}\n", 1)
    return text


def issued(erp: Any) -> Any:
    return erp.execute("SELECT issued FROM erp.stock WHERE sku = 'SKU-100001'").fetchone()[0]


def order(crm: Any, order_id: int, phone: str, status: str) -> str:
    """A new customer and one order of theirs in `status`; returns the customer's key."""
    customer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                           "('李', '四', %s) RETURNING customer_id", (phone,)).fetchone()[0]
    with crm.transaction():
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, "
                    "status, currency) VALUES (%s, %s, %s, '2023-01-01', %s, '元')",
                    (order_id, f"X{order_id}", customer, status))
        crm.execute("INSERT INTO crm.order_lines VALUES (%s, 1, %s, 'P-PHONE-5G', '手机', "
                    "'10台', 5000)", (order_id, customer))
    return str(customer)


def member(erp: Any, group: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = erp.execute(
        "SELECT mappings_version, refused_version, refused_error FROM sync.consumers "
        "WHERE consumer_group = %s", (group,)).fetchone()
    return row


def status_of(erp: Any, order_id: int) -> str | None:
    row = erp.execute("SELECT status_code FROM erp.sales_orders WHERE crm_order_id = %s",
                      (str(order_id),)).fetchone()
    return None if row is None else str(row[0])


def test_a_new_word_applies_without_restart_and_a_broken_file_is_refused(
        sync_env: SyncEnv, running: Running, cli: Cli, tmp_path: Path) -> None:
    shipped = sync_env.settings.mappings_file.read_text("utf-8")
    path = tmp_path / "mappings.toml"
    path.write_text(shipped, "utf-8")
    settings = sync_env.with_(mappings_file=path, mappings_check_s=0.5)
    group = settings.consumer_group
    produce_all(sync_env)  # the slot exists: what follows is streamed
    consumer = running.start_consumer(settings)
    first = mappings_version(shipped.encode())
    with sync_env.crm() as crm, sync_env.erp() as erp:
        wait_until(lambda: member(erp, group) == (first, None, None),
                   message="the consumer reports the loaded version")
        early = order(crm, 901, "13900000001", "已出库")
        produce_all(sync_env)
        wait_until(lambda: erp.execute("SELECT error_message FROM sync.dead_letters "
                                       "WHERE msg_key = %s", (early.encode(),)).fetchone(),
                   message="the order with the unknown word dead-lettered")

        # The operator adds the word; the running consumer picks it up, no restart.
        added = with_status_word(shipped, NEW_WORD, NEW_EFFECT)
        path.write_text(added, "utf-8")
        second = mappings_version(added.encode())
        wait_until(lambda: member(erp, group) == (second, None, None),
                   message="the consumer reports the new version")
        exposition = consumer.metrics.exposition().decode()
        assert f'crm_erp_sync_mappings_info{{version="{second}"}} 1.0' in exposition
        assert f'version="{first}"' not in exposition
        order(crm, 902, "13900000002", "已出库")
        produce_all(sync_env)
        wait_until(lambda: status_of(erp, 902) == "DISPATCHED",
                   message="a new order with the new word applied")
        assert issued(erp) == 10  # the new status's stock effect was loaded with it
        # The letter from before is redriven with the same file.
        done = cli(settings, "dlq", "redrive", "--all", "--json")
        assert [o["outcome"] for o in done.json["outcomes"]] == ["redriven"], done.out
        assert status_of(erp, 901) == "DISPATCHED"
        assert issued(erp) == 20

        # A broken file: refused, naming file and key; the old version keeps applying.
        path.write_text(with_status_word(added, '"已签收" = "delivered"'), "utf-8")
        broken = mappings_version(path.read_bytes())
        # (until it is this file's refusal: a check between write_text's truncate and its
        # write sees an empty file, refused first)
        refused = wait_until(lambda: (m := member(erp, group)) and m[1] == broken and m,
                             message="the consumer reports the refused file")
        assert refused[0] == second
        assert f'{path}: order_status."已签收"' in refused[2]
        exposition = consumer.metrics.exposition().decode()
        assert "crm_erp_sync_mappings_reload_failing 1.0" in exposition
        assert 'crm_erp_sync_mappings_reloads_total{outcome="refused"} 1.0' in exposition
        assert 'crm_erp_sync_mappings_reloads_total{outcome="applied"} 1.0' in exposition
        order(crm, 903, "13900000003", "已出库")
        produce_all(sync_env)
        wait_until(lambda: status_of(erp, 903) == "DISPATCHED",
                   message="events keep applying with the kept version")
        assert issued(erp) == 30

        shown = cli(settings, "status", "--json")
        assert shown.code == 1
        [row] = shown.json["consumers"]
        assert (row["mappings_version"], row["refused_version"]) == (second, broken)
        assert any("refused the mappings file" in a and "已签收" in a
                   for a in shown.json["attention"]), shown.json["attention"]
        text = cli(settings, "status")
        assert second in text.out and "refused the mappings file" in text.out

        # Fixed again: the refusal clears.
        path.write_text(added, "utf-8")
        wait_until(lambda: member(erp, group) == (second, None, None),
                   message="the refusal cleared")
        running.stop(consumer)
        assert member(erp, group) is None  # a clean stop takes the member off the list


def test_sighup_reloads_a_consume_process(sync_env: SyncEnv, tmp_path: Path) -> None:
    shipped = sync_env.settings.mappings_file.read_text("utf-8")
    path = tmp_path / "mappings.toml"
    path.write_text(shipped, "utf-8")
    # The periodic check is an hour away: only the signal can make it reload in time.
    settings = sync_env.with_(mappings_file=path, mappings_check_s=3600.0)
    env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_LEVEL": "info"}
    log = (tmp_path / "consume.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "consume"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        with sync_env.erp() as erp:
            group = settings.consumer_group
            wait_until(lambda: member(erp, group) == (mappings_version(shipped.encode()),
                                                      None, None),
                       message="the process reports the loaded version")
            added = with_status_word(shipped, NEW_WORD, NEW_EFFECT)
            path.write_text(added, "utf-8")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: member(erp, group) == (mappings_version(added.encode()),
                                                      None, None),
                       timeout=30, message="the new version after SIGHUP")
        assert proc.poll() is None  # SIGHUP did not end it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "consume.log").read_text("utf-8")[-2000:]
    text = (tmp_path / "consume.log").read_text("utf-8")
    assert '"mappings_reloaded"' in text and '"trigger": "SIGHUP"' in text
    with sync_env.erp() as erp:
        assert member(erp, settings.consumer_group) is None
