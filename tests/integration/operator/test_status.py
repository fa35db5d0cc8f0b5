"""`crm-erp-sync status` as the one screen (issue #14 item 3): the group's members beside the
consumers' own reports, dead letters by class and field, held events, the oldest CRM
transaction pinning the slot, and exit 1 for each condition that needs attention."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.kafka_io import make_consumer
from tests.conftest import SyncEnv
from tests.helpers import settings_env, wait_until
from tests.integration.conftest import Cli, Running


def test_status_shows_members_letters_by_field_and_what_needs_attention(
        sync_env: SyncEnv, cli: Cli, running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sync_env.with_(membership_check_s=0.5)
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    producer.run(until_idle=True)  # the slot
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('张', '三', '138xxxx5678')")
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('李', '四', '13912345678')")
    producer.run(until_idle=True)
    consumer = running.start_consumer(settings)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute("SELECT count(*) FROM sync.dead_letters").fetchone()[0]
                   == 1 and erp.execute("SELECT count(*) FROM sync.consumer_membership "
                                        "WHERE in_group").fetchone()[0] == 1,
                   message="one dead letter, the consumer reporting itself in the group")

    st = cli(settings, "status", "--json")
    assert st.code == 1  # the dead letter
    [member] = st.json["members"]
    assert member["in_group"] and member["client_id"] == consumer.membership.client_id
    assert len(member["partitions"]) == 2 * settings.topic_partitions
    assert member["mappings_version"] and member["pid"]
    assert st.json["dead_letters_by_field"] == [["MappingError", "phone", 1]]
    # The slot's WAL budget as the CRM reports it (the shared stack's setting, not changed
    # here): a fresh slot has room left, so nothing about losing WAL.
    with sync_env.crm() as crm:
        keep_mb = int(crm.execute("SELECT setting FROM pg_settings "
                                  "WHERE name = 'max_slot_wal_keep_size'").fetchone()[0])
    slot = st.json["slot"]
    assert slot["wal_status"] in ("reserved", "extended")
    assert slot["keep_size_bytes"] == (-1 if keep_mb < 0 else keep_mb * 1048576)
    assert (slot["safe_wal_bytes"] is None) == (keep_mb < 0)
    assert not any("UNRESERVED" in a or "safe_wal_size" in a for a in st.json["attention"])
    text = cli(settings, "status")
    assert consumer.membership.client_id in text.out
    assert "MappingError" in text.out and "phone" in text.out

    # A live consumer the broker does not list: named, with exit 1.
    with sync_env.erp() as erp:
        erp.execute("INSERT INTO sync.consumer_membership (consumer_group, client_id, host, pid, "
                    "member_id, in_group, out_since, assigned, mappings_version, started_at, "
                    "last_seen, rejoins) VALUES (%s, 'consumer-out', 'host-b', 4242, 'gone-1', "
                    "false, now(), '{}', 'abc', now(), now(), 3)", (settings.consumer_group,))
    out = cli(settings, "status", "--json")
    assert out.code == 1
    assert any("consumer-out (host host-b, pid 4242) reported 0s ago that it is NOT in group"
               in a for a in out.json["attention"]), out.json["attention"]
    # newcomer8 N6: one whose reports stopped (a SIGKILL leaves the last one behind) is not
    # called running: "stopped or stuck"; on this host with its pid gone: "no longer runs".
    with sync_env.erp() as erp:
        erp.execute("UPDATE sync.consumer_membership SET last_seen = now() - interval '20 s' "
                    "WHERE client_id = 'consumer-out'")
    quiet = cli(settings, "status", "--json")
    [line] = [a for a in quiet.json["attention"] if "consumer-out" in a]
    assert "not seen for 20s (it reports every 0.5s): stopped or stuck" in line, line
    assert "running" not in line
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    with sync_env.erp() as erp:
        erp.execute("UPDATE sync.consumer_membership SET host = %s, pid = %s, "
                    "last_seen = now() WHERE client_id = 'consumer-out'",
                    (socket.gethostname(), dead))
    killed = cli(settings, "status", "--json")
    [line] = [a for a in killed.json["attention"] if "consumer-out" in a]
    assert f"no longer runs (pid {dead} is gone on this host" in line, line
    # ... but not once its reports stopped (the process is gone).
    with sync_env.erp() as erp:
        erp.execute("UPDATE sync.consumer_membership SET last_seen = now() - interval '1 hour' "
                    "WHERE client_id = 'consumer-out'")
    gone = cli(settings, "status", "--json")
    assert not any("consumer-out" in a for a in gone.json["attention"])

    # The oldest CRM transaction holding an xid: pid, state, age; never its query.
    with psycopg.connect(settings.crm_dsn) as idle:
        idle.execute("SELECT txid_current()")
        pid = idle.info.backend_pid
        pinned = cli(sync_env.with_(membership_check_s=0.5, pinning_xact_max_s=0.000001),
                     "status", "--json")
        assert pinned.json["oldest_transaction"]["pid"] == pid
        assert pinned.json["oldest_transaction"]["state"] == "idle in transaction"
        assert any(f"CRM transaction pid {pid}" in a for a in pinned.json["attention"])
        assert "txid_current" not in pinned.out
        idle.rollback()


def test_status_names_an_invalid_mappings_file_or_profile(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path) -> None:
    """The files' contents, not only their existence: checked by the loaders the producer and
    consumer start with, named (file and key) among the problems, exit 1, no traceback."""
    valid = cli(sync_env.settings, "status", "--json")
    assert not any("invalid" in a for a in valid.json["attention"]), valid.json["attention"]

    mappings = tmp_path / "mappings.toml"
    mappings.write_text(sync_env.settings.mappings_file.read_text("utf-8").replace(
        'SHIPPED = "issue"', 'SHIPPED = "ship it"'), "utf-8")
    profile = tmp_path / "profile.toml"
    profile.write_text("[source]\nname = 'x'\n[customer]\ntable = 'crm.customers'\n"
                       "key = 'customer_id'\nbogus = 1\n", "utf-8")
    broken = sync_env.with_(mappings_file=mappings, source_profile=str(profile))
    out = cli(broken, "status", "--json")
    assert out.code == 1
    [bad_mappings] = [a for a in out.json["attention"] if a.startswith("mappings file invalid")]
    assert str(mappings) in bad_mappings and "status_stock_effect.SHIPPED" in bad_mappings
    # that profile has four mistakes: each is its own problem, named with file and key
    bad_profile = [a for a in out.json["attention"] if a.startswith("source profile invalid")]
    for spot in ("[customer].bogus: unknown setting", "[customer].key: must be a non-empty",
                 "[order]: required section is missing",
                 "[order_line]: required section is missing"):
        assert sum(f"{profile} {spot}" in a for a in bad_profile) == 1, (spot, bad_profile)
    assert len(bad_profile) == 4, bad_profile
    text = cli(broken, "status")
    assert text.code == 1
    assert "mappings file invalid (CRM_ERP_SYNC_MAPPINGS_FILE)" in text.out
    assert "Traceback" not in text.out + text.err and "unexpected_error" not in text.err


def test_status_names_members_that_stopped_reporting_while_events_wait(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.with_(membership_check_s=0.5)
    producer = CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir))
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('王', '五', '13912345678')")
    producer.run(until_idle=True)
    consumer = running.start_consumer(settings)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute("SELECT count(*) FROM erp.business_partners")
                   .fetchone()[0] == 1 and erp.execute(
                       "SELECT count(*) FROM sync.consumers").fetchone()[0] == 1,
                   message="the customer applied, the consumer reporting itself")
    running.stop(consumer)  # offsets committed; its report stays, then goes stale
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('赵', '六', '13987654321')")
    producer.run(until_idle=True)
    # A member whose loop is blocked: kafka-python's heartbeat thread keeps it in the group,
    # nothing reports. A plain consumer of the group stands in for it.
    member = make_consumer(settings, settings.sales_topic, settings.market_topic)
    try:
        wait_until(lambda: member.poll(timeout_ms=200, max_records=1) is not None
                   and bool(member.assignment()), message="the stand-in joined the group")
        with sync_env.erp() as erp:
            erp.execute("UPDATE sync.consumers SET seen_at = now() - interval '1 hour'")
        st = cli(settings, "status", "--json")
        assert st.code == 1, st.out
        assert any("no consumer of group" in a and "has reported in 60s" in a
                   for a in st.json["attention"]), st.json["attention"]
    finally:
        member.close()


def closed_port() -> int:
    """A local port nothing listens on: bound (so the system handed it to nobody else), then
    closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_with_the_broker_down_answers_quickly_with_what_the_databases_say(
        sync_env: SyncEnv) -> None:
    producer = CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir))
    producer.run(until_idle=True)  # the slot
    with sync_env.erp() as erp:  # a dead letter, so the DB-side section has a row to show
        erp.execute("INSERT INTO sync.dead_letters (topic, partition, \"offset\", stage, "
                    "error_class, error_message) VALUES (%s, 0, 7, 'transform', "
                    "'MappingError', 'phone: bad')", (sync_env.settings.sales_topic,))
    bootstrap = f"127.0.0.1:{closed_port()}"
    env = {**os.environ, **settings_env(sync_env.with_(kafka_bootstrap=bootstrap)),
           "CRM_ERP_SYNC_LOG_FORMAT": "json"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "service.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - started
    assert took < 20, f"status took {took:.1f}s with the broker down"
    # 3: the broker did not answer, so a part is unchecked (README, "Exit codes")
    assert done.returncode == 3, (done.stdout, done.stderr)
    out, err = done.stdout, done.stderr
    assert f"broker {bootstrap} unreachable: lag and group members unknown" in out
    # everything from the databases is still there
    assert "Producer: NOT RUNNING" in out and f"slot {sync_env.settings.slot_name}" in out
    assert "MappingError" in out and "phone" in out
    assert "Held events: none" in out and "Last applied:" in out
    assert "1 dead letter(s) unresolved" in out
    assert "Traceback" not in out + err
    # no kafka-python retry chatter: no line repeated, nothing from its loggers
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert not [line for line, n in Counter(lines).items() if n > 1], lines
    assert '"logger": "kafka' not in err and "ECONNREFUSED" not in out + err, err


def test_trace_pause_and_resume_with_the_broker_down_say_so_in_one_line_quickly(
        sync_env: SyncEnv) -> None:
    # status was made quiet with the broker down; these three printed kafka-python's ~20
    # retry lines (ECONNREFUSED, backoff) on the operator's terminal before saying so, and
    # then waited its 30 s bootstrap: now the same bound as status (BROKER_CHECK_S) and the
    # same line, exit 3.
    bootstrap = f"127.0.0.1:{closed_port()}"
    env = {**os.environ, **settings_env(sync_env.with_(kafka_bootstrap=bootstrap)),
           "CRM_ERP_SYNC_LOG_FORMAT": "json"}
    nothing = "partitions unknown, nothing changed"
    commands = {("trace", "1"): "events on Kafka unknown",
                ("pause", "--all", "--reason", "t"): nothing,
                ("resume", "--partition", f"{sync_env.settings.sales_topic}:0", "--reason",
                 "t"): nothing}
    started = time.monotonic()
    running = [subprocess.Popen([sys.executable, "-m", "service.cli", *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for argv in commands]
    for (argv, unknown), proc in zip(commands.items(), running, strict=True):
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 3, (argv, out, err)
        assert err.splitlines() == [f"crm-erp-sync: broker {bootstrap} unreachable: "
                                    f"{unknown}"], (argv, err)
    took = time.monotonic() - started
    assert took < 20, f"trace, pause and resume took {took:.1f}s with the broker down"
    with sync_env.erp() as erp:  # nothing was paused
        assert erp.execute("SELECT count(*) FROM sync.operator_pauses").fetchone()[0] == 0


def test_status_with_the_crm_database_down_shows_the_erp_broker_and_group_parts(
        sync_env: SyncEnv, cli: Cli) -> None:
    # It printed one line (CRM database unreachable) and nothing else: now the ERP's, the
    # broker's and the consumer group's parts are shown, the CRM's is named unknown, exit 3.
    producer = CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir))
    producer.run(until_idle=True)  # the slot, the topics
    with sync_env.erp() as erp:  # a dead letter, so the ERP's part has a row to show
        erp.execute("INSERT INTO sync.dead_letters (topic, partition, \"offset\", stage, "
                    "error_class, error_message) VALUES (%s, 0, 7, 'transform', "
                    "'MappingError', 'phone: bad')", (sync_env.settings.sales_topic,))
    port = closed_port()
    down = sync_env.with_(crm_dsn=f"postgresql://sync:sync@127.0.0.1:{port}/crm")

    st = cli(down, "status", "--json")
    assert st.code == 3, (st.out, st.err)
    assert st.json["crm_unreachable"].startswith("CRM database at ")
    assert f"127.0.0.1:{port}" in st.json["crm_unreachable"]
    assert "sync:sync" not in st.out + st.err  # the password never shown
    assert st.json["broker_unreachable"] is None
    assert len(st.json["lag"]) == 2 * sync_env.settings.topic_partitions
    assert st.json["dead_letters_by_field"] == [["MappingError", "phone", 1]]
    assert st.json["crm_unreachable"] in st.json["attention"]
    assert not any("replication slot" in a and "missing" in a for a in st.json["attention"])

    text = cli(down, "status")
    assert text.code == 3, (text.out, text.err)
    out = text.out
    assert f"Producer and slot {sync_env.settings.slot_name}: unknown (the CRM" in out
    assert f"  - CRM database at postgresql://sync:***@127.0.0.1:{port}/crm is unreachable" in out
    assert "CRM truncates and pending snapshots: unknown" in out
    assert "total lag: 0" in out and "Group members: none" in out  # the broker's part
    assert "MappingError" in out and "Held events: none" in out  # the ERP's part
    assert "Last applied:" in out and "1 dead letter(s) unresolved" in out
    assert "NOT RUNNING" not in out and "MISSING" not in out  # unknown, not absent
