"""What operator commands print (newcomer8 N11): `reconcile` says how many keys its --limit
left out of each list; `dlq discard` prints its report, not the apply code's JSON log lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli, Running, caught_up

REPO = Path(__file__).resolve().parents[3]


def test_reconcile_says_how_many_keys_each_list_left_out(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        for i in range(3):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('张', %s, '13812345678')", (f"好{i}",))
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('李', %s, '138xxxx5678')", (f"坏{i}",))
    running.start_producer(settings)
    running.start_consumer(settings)
    caught_up(sync_env)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute(
            "SELECT count(*) FROM sync.dead_letters WHERE state = 'open'").fetchone()[0] == 3
            and erp.execute("SELECT count(*) FROM erp.business_partners").fetchone()[0] == 3,
            timeout=60, message="3 customers applied, 3 dead-lettered")
        erp.execute("UPDATE erp.business_partners SET full_name = full_name || '改'")

    cut = cli(settings, "reconcile", "--entity", "customers", "--limit", "2")
    assert cut.code == 1, cut.out
    lines = cut.out.splitlines()
    assert sum(" differs in: " in x for x in lines) == 2, cut.out
    assert sum(" cannot be mapped: " in x for x in lines) == 2, cut.out
    assert ("customers … and 1 more differing key(s) not listed (--limit 0 shows all)"
            in lines), cut.out
    # the bad phones' letters are open: held, listed the same way (newcomer9 F10)
    assert ("customers … and 1 more held key(s) not listed (--limit 0 shows all)"
            in lines), cut.out
    full = cli(settings, "reconcile", "--entity", "customers", "--limit", "0")
    assert full.code == 1 and "more" not in full.out, full.out
    assert sum(" differs in: " in x for x in full.out.splitlines()) == 3


def test_dlq_discard_prints_its_report_and_no_log_line(
        sync_env: SyncEnv, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        buyer = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                            "('王', '五', '138xxxx5678') RETURNING customer_id").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, order_date, "
                    "status, currency) VALUES (9500, 'A9500', %s, '2023-01-01', '已发货', '元')",
                    (buyer,))
    running.start_producer(settings)
    running.start_consumer(settings)
    caught_up(sync_env)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute(
            "SELECT count(*) FROM sync.held_events WHERE reason = 'key_blocked'").fetchone()[0]
            >= 1, timeout=60, message="the order held behind its customer's dead letter")
        (letter,) = erp.execute("SELECT dead_letter_id FROM sync.dead_letters "
                                "WHERE state = 'open'").fetchone()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "dlq", "discard", str(letter), "--reason",
         "test"], cwd=REPO, env={**settings_env(settings), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "released 1 held event(s) of the key" in done.stdout, done.stdout
    for line in done.stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        assert not isinstance(record, dict) or record.get("level") not in (
            "info", "debug"), done.stderr
    assert "held_events_released" not in done.stderr and "events_held" not in done.stderr
