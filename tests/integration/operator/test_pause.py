"""`crm-erp-sync pause` / `resume` (issue #14 item 7): all or some partitions, audited, and
surviving consumer restarts (the pause is kept in the ERP, read with the breaker's state)."""

from __future__ import annotations

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpConsumer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up
from tests.integration.conftest import Cli


def partners(sync_env: SyncEnv) -> int:
    with sync_env.erp() as erp:
        return int(erp.execute("SELECT count(*) FROM erp.business_partners").fetchone()[0])


def add_customers(sync_env: SyncEnv, n: int) -> None:
    with sync_env.crm() as crm:
        for i in range(n):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('王', %s, '13912345678')", (f"五{i}",))
    CdcProducer(sync_env.settings, SchemaRegistry.load(sync_env.settings.schemas_dir)).run(
        until_idle=True)


def test_pause_survives_restarts_until_resume(sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.with_(breaker_poll_s=0.2)
    add_customers(sync_env, 6)
    consume_until_caught_up(ErpConsumer(settings))
    assert partners(sync_env) == 6

    sales = settings.sales_topic
    one = cli(settings, "pause", "--partition", f"{sales}:0", "--reason", "ERP upgrade",
              "--actor", "ops-1")
    assert one.code == 0, one.err
    assert f"paused {sales}[0]" in one.out
    every = cli(settings, "pause", "--all", "--reason", "ERP upgrade", "--json")
    assert every.code == 0
    assert f"{sales}[0]" in every.json["already_paused"]
    assert len(every.json["paused"]) == 2 * settings.topic_partitions - 1
    assert cli(settings, "pause", "--partition", f"{sales}:99", "--reason", "x").code == 2
    assert cli(settings, "pause", "--reason", "x").code == 2  # no partitions named

    add_customers(sync_env, 9)
    # A consumer started after the pause: the partitions with new events stay paused.
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert not stats.caught_up and stats.blocked
    assert all(b.startswith(sales) for b in stats.blocked)
    assert partners(sync_env) == 6
    status = cli(settings, "status", "--json")
    assert status.code == 1
    assert any("paused by" in a and "ERP upgrade" in a for a in status.json["attention"])
    # ... and after another restart too.
    assert consume_until_caught_up(ErpConsumer(settings)).blocked
    assert partners(sync_env) == 6

    resumed = cli(settings, "resume", "--all", "--reason", "upgrade done", "--actor", "ops-2")
    assert resumed.code == 0, resumed.err
    assert f"resumed {sales}[0]" in resumed.out and "ERP upgrade" in resumed.out
    stats = consume_until_caught_up(ErpConsumer(settings))
    assert stats.caught_up and not stats.blocked
    assert partners(sync_env) == 15
    after = cli(settings, "status", "--json")
    assert not any("paused by" in a for a in after.json["attention"])
    with sync_env.erp() as erp:
        audit = {(t, p): rest for t, p, *rest in erp.execute(
            "SELECT topic, partition, state, paused_by, reason, resumed_by, resume_reason "
            "FROM sync.operator_pauses").fetchall()}
    assert len(audit) == 2 * settings.topic_partitions
    assert audit[(sales, 0)] == ["resumed", "ops-1", "ERP upgrade", "ops-2", "upgrade done"]
    assert all(r[0] == "resumed" and r[3:] == ["ops-2", "upgrade done"]
               for r in audit.values())
    again = cli(settings, "resume", "--partition", f"{sales}:0", "--reason", "x")
    # Resuming what is not paused is a no-op that succeeds and says so (as --all does).
    assert again.code == 0, again.err
    assert again.out.strip() == f"{sales}[0] was not paused; nothing to resume"


def test_resume_json_names_partitions_not_paused_as_not_paused(sync_env: SyncEnv,
                                                                cli: Cli) -> None:
    # The key was "not_tripped" (the breaker's word) for a partition neither tripped nor
    # paused: "not_paused" now; the old key stays, deprecated, for scripts reading it.
    sales = sync_env.settings.sales_topic
    paused = cli(sync_env.settings, "pause", "--partition", f"{sales}:1", "--reason", "t")
    assert paused.code == 0, paused.err
    done = cli(sync_env.settings, "resume", "--partition", f"{sales}:0", "--partition",
               f"{sales}:1", "--reason", "t", "--json")
    assert done.code == 0, done.err
    assert done.json["not_paused"] == [f"{sales}[0]"]
    assert done.json["not_tripped"] == done.json["not_paused"]
    assert [p["partition_name"] for p in done.json["unpaused"]] == [f"{sales}[1]"]


def test_pause_and_resume_json_list_every_partition_as_an_object(sync_env: SyncEnv,
                                                                  cli: Cli) -> None:
    # F10 (newcomer7): `already_paused` / `not_paused` were strings beside lists of objects.
    # Each list is objects now (`unchanged`); the string lists stay, deprecated, for scripts.
    sales = sync_env.settings.sales_topic
    first = cli(sync_env.settings, "pause", "--partition", f"{sales}:1", "--reason", "t",
                "--json")
    assert first.code == 0, first.err
    assert first.json["unchanged"] == []
    again = cli(sync_env.settings, "pause", "--partition", f"{sales}:0", "--partition",
                f"{sales}:1", "--reason", "t", "--json")
    assert again.code == 0, again.err
    assert [p["partition_name"] for p in again.json["paused"]] == [f"{sales}[0]"]
    assert again.json["unchanged"] == [
        {"topic": sales, "partition": 1, "partition_name": f"{sales}[1]"}]
    assert again.json["already_paused"] == [f"{sales}[1]"]  # deprecated
    done = cli(sync_env.settings, "resume", "--partition", f"{sales}:1", "--partition",
               f"{sales}:2", "--reason", "t", "--json")
    assert done.code == 0, done.err
    assert done.json["unchanged"] == [
        {"topic": sales, "partition": 2, "partition_name": f"{sales}[2]"}]
    assert done.json["not_paused"] == done.json["not_tripped"] == [f"{sales}[2]"]
    for lists in (again.json, done.json):
        for name, items in lists.items():
            if name not in ("already_paused", "not_paused", "not_tripped"):
                assert all(isinstance(x, dict) for x in items), (name, items)


def test_pause_and_resume_json_without_partitions_print_a_json_error(sync_env: SyncEnv,
                                                                     cli: Cli) -> None:
    # F10 (newcomer7): a usage error with --json was text on stderr only, stdout empty.
    for command in ("pause", "resume"):
        bare = cli(sync_env.settings, command, "--reason", "t", "--json")
        assert bare.code == 2, (bare.out, bare.err)
        said = f"{command}: name the partitions: --partition TOPIC:N ... or --all"
        assert bare.json == {"error": said, "exit_code": 2}, bare.out
        assert said in bare.err  # as without --json
        wrong = cli(sync_env.settings, command, "--partition", "nope", "--reason", "t",
                    "--json")
        assert wrong.code == 2, (wrong.out, wrong.err)
        assert wrong.json["error"].startswith("--partition: expected TOPIC:PARTITION"), wrong.out
