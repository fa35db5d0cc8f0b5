"""Operating capture dead letters (issue #14): `status` lists them apart from the apply
path's letters (table, key, reason), `dlq show` says what their payload is, `reconcile` calls
their keys held (not differing), `dlq redrive --key` re-reads the row once for all of the
key's letters; every reconcile run is recorded and exported by the running consumers."""

from __future__ import annotations

from typing import Any

from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running, capture_ready


def letters_of(sync_env: SyncEnv) -> list[tuple[Any, ...]]:
    with sync_env.erp() as erp:
        return erp.execute("SELECT dead_letter_id, stage, msg_key, state FROM sync.dead_letters "
                           "ORDER BY dead_letter_id").fetchall()


def partner(sync_env: SyncEnv, key: int) -> Any:
    with sync_env.erp() as erp:
        return erp.execute("SELECT purchase_amount FROM erp.business_partners "
                           "WHERE crm_customer_id = %s AND NOT deleted", (str(key),)).fetchone()


def test_capture_letters_in_status_dlq_and_reconcile(sync_env: SyncEnv, cli: Cli,
                                                     running: Running) -> None:
    settings = sync_env.settings
    running.start_producer(settings)
    consumer = running.start_consumer(settings)
    wait_until(lambda: capture_ready(sync_env), message="slot and initial snapshot")
    with sync_env.crm() as crm:
        nan = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                          "purchase_amount) VALUES ('李', '娜', '13912345678', 'NaN') "
                          "RETURNING customer_id").fetchone()[0]
        # the fix is a capture letter too: its old row still holds NaN
        crm.execute("UPDATE crm.customers SET purchase_amount = 5000 WHERE customer_id = %s",
                    (nan,))
        masked = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) "
                             "VALUES ('张', '三', '138xxxx5678') RETURNING customer_id"
                             ).fetchone()[0]
    wait_until(lambda: len(letters_of(sync_env)) == 3, timeout=90,
               message="two capture letters and one transform letter recorded")

    st = cli(settings, "status", "--json")
    assert st.code == 1
    assert [(c["table"], c["key"], c["error_class"]) for c in st.json["capture_letters"]] == [
        ("crm.customers", str(nan), "UnrepresentableValue")] * 2
    assert all(c["reason"].startswith("purchase_amount: ") for c in st.json["capture_letters"])
    assert st.json["capture_letters_total"] == 2
    assert st.json["dead_letters_by_field"] == [["MappingError", "phone", 1]]
    assert any("2 capture dead letter(s)" in a for a in st.json["attention"])
    assert any(a.startswith("1 dead letter(s) unresolved") for a in st.json["attention"])
    text = cli(settings, "status").out
    assert "capture dead letter" in text and "crm.customers" in text

    first_capture = next(i for i, stage, *_ in letters_of(sync_env) if stage == "capture")
    shown = cli(settings, "dlq", "show", str(first_capture))
    assert shown.code == 0, shown.err
    assert "decoded from Avro" not in shown.out
    assert "capture dead letter: the JSON the producer wrote" in shown.out

    # reconcile: the row maps now (5000), the ERP lacks it because the key is held
    rec = cli(settings, "reconcile", "--json", "--entity", "customers")
    assert rec.code == 0  # both keys are held behind their letters: not drift (F10)
    (customers,) = rec.json["entities"]
    assert str(nan) not in customers["missing"] and str(nan) not in customers["differing"]
    assert customers["held"][str(nan)].startswith("held behind dead letter #")
    assert "capture: UnrepresentableValue" in customers["held"][str(nan)]
    assert customers["held"][str(masked)].startswith("cannot be mapped: MappingError")
    assert customers["counts"] == {"missing": 0, "extra": 0, "differing": 0,
                                   "unmappable": 0, "held": 2}
    # every consumer exports the newest run (read with its maintenance, every 5 s)
    wait_until(lambda: consumer.metrics.drift.labels("customers", "held")._value.get() == 2,
               timeout=30, message="the run's counts on the consumer's /metrics")
    assert consumer.metrics.drift.labels("customers", "unmappable")._value.get() == 0
    assert consumer.metrics.reconcile_last_drift._value.get() == 0
    assert consumer.metrics.reconcile_last._value.get() > 0
    assert b"crm_erp_sync_reconcile_drift{entity=\"customers\",kind=\"held\"} 2.0" in \
        consumer.metrics.exposition()

    # redrive by key: both letters of the row, one re-read of it
    redriven = cli(settings, "dlq", "redrive", "--key", str(nan), "--reason", "fixed in CRM",
                   "--json")
    assert redriven.code == 0, redriven.out
    outcomes = redriven.json["outcomes"]
    assert [o["outcome"] for o in outcomes] == ["redriven", "redriven"]
    assert "one re-read" in outcomes[1]["detail"]
    with sync_env.crm() as crm:
        assert crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                           "WHERE reason = 'redrive'").fetchone() == (1,)
    wait_until(lambda: partner(sync_env, nan) is not None, timeout=60,
               message="the re-read row applied")
    assert partner(sync_env, nan)[0] == 5000
    after = cli(settings, "reconcile", "--json", "--entity", "customers")
    assert list(after.json["entities"][0]["held"]) == [str(masked)]  # its letter is open
    wait_until(lambda: consumer.metrics.drift.labels("customers", "held")._value.get() == 1,
               timeout=30, message="the newer run exported")
    with sync_env.erp() as erp:
        runs = erp.execute("SELECT entities, counts -> 'customers' ->> 'held', drift "
                           "FROM sync.reconcile_runs ORDER BY run_id").fetchall()
    assert runs == [(["customers"], "2", 0), (["customers"], "1", 0)]  # held: not drift


def test_small_leftovers(sync_env: SyncEnv, cli: Cli, tmp_path: Any) -> None:
    settings = sync_env.settings
    from service.avro import SchemaRegistry
    from service.cdc.producer import CdcProducer

    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)

    # resume of a partition that does not exist: exit 2, the valid ones named
    bad = cli(settings, "resume", "--partition", f"{settings.sales_topic}:99", "--reason", "x")
    assert bad.code == 2
    assert f"{settings.sales_topic}:99" in bad.err and f"{settings.sales_topic}:0" in bad.err

    # config with a broken source profile: the file and key named, exit 2
    profile = tmp_path / "broken.toml"
    profile.write_text('[source]\nname = "x"\n\n[customer]\ntable = "crm.customers"\n'
                       'key = ["customer_id"]\ncolour = "blue"\n')
    import dataclasses

    broken = cli(dataclasses.replace(settings, source_profile=str(profile)), "config")
    assert broken.code == 2
    assert "broken.toml" in broken.err and "colour" in broken.err

    # setup --check: a profile table missing from the publication, or from the CRM
    with sync_env.crm() as crm:
        crm.execute(f"ALTER PUBLICATION {settings.publication_name} DROP TABLE crm.market_demand")
    check = cli(settings, "setup", "--check")
    assert check.code == 1
    line = next(li for li in check.out.splitlines() if f"publication {settings.publication_name}"
                in li)
    assert line.startswith("✗") and "crm.market_demand" in line
    with sync_env.crm() as crm:
        crm.execute(f"ALTER PUBLICATION {settings.publication_name} ADD TABLE crm.market_demand")
        crm.execute("ALTER TABLE crm.market_demand RENAME TO market_demand_old")
    gone = cli(settings, "setup", "--check")
    line = next(li for li in gone.out.splitlines() if f"publication {settings.publication_name}"
                in li)
    assert line.startswith("✗") and "no such table" in line, gone.out


def test_redrive_of_a_capture_letter_whose_row_is_gone_says_so(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    """A re-read cannot carry a delete: redriving the letter of a row deleted since must not
    report success (the ERP row would stay live); it names the way out instead."""
    settings = sync_env.settings
    running.start_producer(settings)
    running.start_consumer(settings)
    wait_until(lambda: capture_ready(sync_env), message="slot and initial snapshot")
    with sync_env.crm() as crm:
        gone = crm.execute("INSERT INTO crm.customers (family_name, given_name, phone, "
                           "purchase_amount) VALUES ('王', '五', '13912345678', 'NaN') "
                           "RETURNING customer_id").fetchone()[0]
        crm.execute("DELETE FROM crm.customers WHERE customer_id = %s", (gone,))
    wait_until(lambda: len(letters_of(sync_env)) == 2, timeout=90,
               message="the insert's and the delete's capture letters")

    redriven = cli(settings, "dlq", "redrive", "--key", str(gone), "--reason", "deleted",
                   "--json")
    outcomes = redriven.json["outcomes"]
    # the key's later letter waits behind its first, as for any key
    assert [o["outcome"] for o in outcomes] == ["failed_again", "skipped"]
    assert "deleted since" in outcomes[0]["detail"]
    assert "reconcile --repair" in outcomes[0]["detail"]
    assert redriven.code != 0
    assert [state for *_, state in letters_of(sync_env)] == ["failed_again", "open"]
    with sync_env.crm() as crm:
        assert crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                           "WHERE reason = 'redrive'").fetchone() == (0,)

    # the way out it names: discard the key's letters (by key), then reconcile --repair
    dry = cli(settings, "dlq", "discard", "--key", str(gone), "--reason", "row deleted",
              "--dry-run", "--json")
    assert dry.code == 0, dry.out
    assert len(dry.json["outcomes"]) == 2
    assert [state for *_, state in letters_of(sync_env)] == ["failed_again", "open"]
    done = cli(settings, "dlq", "discard", "--key", str(gone), "--reason", "row deleted",
               "--yes", "--json")
    assert done.code == 0, done.out
    assert [state for *_, state in letters_of(sync_env)] == ["discarded", "discarded"]
