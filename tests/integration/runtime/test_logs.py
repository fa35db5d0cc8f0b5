"""What a real run logs: the producer and the consumer run as processes over demo CRM data
(Chinese and Western names, phones, e-mails, addresses, messy records and some that must be
dead-lettered) with JSON logs at debug level; their stderr is grepped for every piece of
personal data in the CRM, and every line must be one JSON object."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.demo.load import load_demo
from service.kafka_io import make_producer
from tests.conftest import SyncEnv
from tests.helpers import settings_env

REPO = Path(__file__).resolve().parents[3]


def run_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env,
                          capture_output=True, timeout=240, check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    return stderr


def personal_data(sync_env: SyncEnv) -> set[str]:
    """Every name, phone, e-mail and address in the CRM, and the digits of each phone."""
    found: set[str] = set()
    with sync_env.crm() as crm:
        rows = crm.execute("SELECT family_name, given_name, middle_name, phone, email, address, "
                           "notes FROM crm.customers").fetchall()
    for family, given, middle, phone, email, address, notes in rows:
        found.update(v for v in (email, address, notes) if v and len(v.strip()) >= 4)
        if phone:
            found.add(phone)
            digits = re.sub(r"\D", "", phone)
            if len(digits) >= 7:
                found.add(digits[-8:])  # however it is re-formatted, the last 8 digits
        found.add(f"{family}{given}")  # 张三
        found.add(f"{given} {family}")  # John Smith
        found.update(n for n in (family, given, middle)
                     if n and (len(n) >= 5 or (len(n) >= 2 and not n.isascii())))
    return found


def test_a_real_run_logs_json_lines_without_personal_data(sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    load_demo(settings.crm_dsn, customers=150, orders=300, rate=None, seed=21, changes=150)
    with sync_env.crm() as crm:  # records the ERP refuses: dead letters, logged per message
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, email, address)"
                    " VALUES ('诸葛', '孔明', '138xxxx5678', 'kongming@example.cn', "
                    "'四川省成都市武侯区武侯祠大街231号'), "
                    "('Fitzgerald', 'Scott', '+1 (212) 555-0187 ext. 12', "
                    "'Scott.Fitz@Example.com', '599 Fifth Avenue, New York')")
        # A status column holding free text (a name and an address): the letter's reason
        # quotes the CRM's word, the log line must not.
        buyer = crm.execute("SELECT min(customer_id) FROM crm.customers").fetchone()[0]
        crm.execute("INSERT INTO crm.sales_orders (order_id, order_no, customer_id, "
                    "order_date, status, currency) VALUES (990001, 'X990001', %s, "
                    "'2023-01-01', '司马懿 北京市朝阳区建国路99号', '元')", (buyer,))
        # A value the producer cannot read: a capture letter, whose line names the column.
        crm.execute("UPDATE crm.customers SET birth_date = 'infinity' WHERE customer_id = "
                    "(SELECT min(customer_id) FROM crm.customers WHERE customer_id > %s)",
                    (buyer,))
    env = {**os.environ, **settings_env(settings), "CRM_ERP_SYNC_LOG_FORMAT": "json",
           "CRM_ERP_SYNC_LOG_LEVEL": "debug"}
    logged = run_cli(env, "produce", "--until-idle")
    kafka = make_producer(settings)
    kafka.send(settings.sales_topic, key=b"424242", value=b"not avro").get(30)
    kafka.close()
    logged += run_cli(env, "consume", "--until-idle", "3")

    lines = [line for line in logged.splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict) and "event" in record and "level" in record, line
        records.append(record)
    events = {r["event"] for r in records}
    assert {"capture_lock_acquired", "producer_stopped", "consumer_stopped",
            "dead_lettered"} <= events, events

    leaks = sorted(p for p in personal_data(sync_env) if p in logged)
    assert not leaks, f"personal data in the logs: {leaks[:10]}"
    assert not re.search(r"(?<!\d)1[3-9]\d{9}(?!\d)", logged), "a mobile number was logged"
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.-]+", logged), "an e-mail address was logged"
    assert "sync:sync@" not in logged  # nor the DSNs' password

    # Per-message lines carry the message's context.
    letters = [r for r in records if r["event"] == "dead_lettered"]
    assert len(letters) >= 3
    for r in letters:
        assert {"topic", "partition", "offset", "key", "event_id", "stage", "error"} <= set(r)
        assert "reason" not in r  # it may quote a CRM value: kept in the letter only
    assert any(r.get("field") == "status" for r in letters)
    assert any(r["stage"] == "capture" and r.get("field") == "birth_date" for r in letters), \
        [r for r in letters if r["stage"] == "capture"]
    assert "司马懿" not in logged and "建国路" not in logged
    assert any(r["key"] == "424242" and r["event_id"] is None and r["stage"] == "decode"
               for r in letters)
    decoded = [r for r in letters if r["event_id"] is not None]
    assert decoded and all(
        re.fullmatch(r"[0-9A-F]+/\d+|snap/\d+/\d+/[a-z_.]+/.+", r["event_id"])
        for r in decoded), decoded
