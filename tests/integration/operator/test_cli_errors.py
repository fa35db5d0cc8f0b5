"""Errors that name the real problem, and the same exit code for the same condition: database
credentials vs a missing database vs an unreachable server; typos in filters; snapshot
arguments; IDs that do not exist; `dlq list` oldest first."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from service import pg
from service.consumer.pipeline import ErpConsumer
from service.errors import (
    ConfigError,
    DatabaseAuthFailed,
    DatabaseMissing,
    DatabaseTlsFailed,
    DatabaseUnreachable,
)
from service.kafka_io import make_producer
from tests.conftest import SyncEnv
from tests.helpers import consume_until_caught_up
from tests.integration.conftest import Cli


def with_dsn(dsn: str, *, password: str | None = None, database: str | None = None,
             port: int | None = None) -> str:
    parts = urlsplit(dsn)
    user = parts.username or ""
    netloc = (f"{user}:{password if password is not None else parts.password}@"
              f"{parts.hostname}:{port or parts.port}")
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}" if database
                                     else parts.path))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connect_errors_are_typed_by_what_went_wrong(sync_env: SyncEnv) -> None:
    erp = sync_env.settings.erp_dsn
    with pytest.raises(DatabaseAuthFailed) as auth:
        pg.connect(with_dsn(erp, password="wrong-pw-51"), "ERP")
    user = urlsplit(erp).username
    assert f"refused user {user!r}" in str(auth.value) and "CRM_ERP_SYNC_ERP_DSN" in str(
        auth.value)
    assert "wrong-pw-51" not in str(auth.value)
    with pytest.raises(DatabaseMissing, match="'no_such_db_51' does not exist"):
        pg.connect(with_dsn(erp, database="no_such_db_51"), "ERP")
    with pytest.raises(DatabaseUnreachable, match="unreachable"):
        pg.connect(with_dsn(erp, port=free_port()), "ERP")


def test_tls_mistakes_are_configuration_errors_not_an_unreachable_server(
        sync_env: SyncEnv, cli: Cli) -> None:
    """newcomer6 F17, against the shared stack (PostgreSQL without TLS, a PLAINTEXT broker):
    exit 2 naming the setting, not "unreachable ... is the stack up?" (exit 3)."""
    erp = sync_env.settings.erp_dsn
    with pytest.raises(DatabaseTlsFailed) as tls:
        pg.connect(f"{erp}?sslmode=require", "ERP")
    assert tls.value.variable == "CRM_ERP_SYNC_ERP_DSN"
    assert "answers but offers no TLS" in tls.value.problem and "sslmode=require" in str(
        tls.value)
    with pytest.raises(DatabaseUnreachable, match="unreachable"):  # nothing there at all
        pg.connect(f"{with_dsn(erp, port=free_port())}?sslmode=require", "ERP")
    with pytest.raises(ConfigError, match="refused the DSN's parameters"):
        pg.connect(f"{erp}?sslmode=verify-everything", "ERP")
    done = cli(sync_env.with_(erp_dsn=f"{erp}?sslmode=require"), "status")
    assert done.code == 2 and "offers no TLS" in done.err, done.err
    assert "make up" not in done.err
    done = cli(sync_env.with_(kafka_security_protocol="SASL_SSL",
                              kafka_sasl_mechanism="SCRAM-SHA-512",
                              kafka_sasl_username="sync", kafka_sasl_password="pw-secret-17"),
               "status")
    assert done.code == 2, done.err
    assert ("CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL: the broker's listener at "
            f"{sync_env.settings.kafka_bootstrap} is PLAINTEXT") in done.err
    assert "pw-secret-17" not in done.out + done.err


def test_consume_exits_at_once_on_a_wrong_password(sync_env: SyncEnv, cli: Cli) -> None:
    bad = sync_env.with_(erp_dsn=with_dsn(sync_env.settings.erp_dsn, password="wrong-pw-52"))
    started = time.monotonic()
    done = cli(bad, "consume")
    assert done.code == 2 and "refused user" in done.err and "wrong-pw-52" not in done.err
    assert time.monotonic() - started < 60  # not minutes of retries
    missing = sync_env.with_(crm_dsn=with_dsn(sync_env.settings.crm_dsn, database="nope_52"))
    done = cli(missing, "status")
    assert done.code == 2 and "'nope_52' does not exist" in done.err


@pytest.mark.parametrize("command", ["consume", "produce"])
def test_an_http_port_in_use_names_the_setting_and_exits_2(sync_env: SyncEnv, cli: Cli,
                                                          command: str) -> None:
    # newcomer9 F7: `unexpected_error OSError` with frames only, no port, no setting
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(sync_env.with_(http_host="127.0.0.1", http_port=port), command)
    assert done.code == 2, done.err
    assert (f"crm-erp-sync: CRM_ERP_SYNC_HTTP_PORT: 127.0.0.1:{port} is in use") in done.err
    assert "unexpected_error" not in done.err and "Traceback" not in done.err


def test_filters_ids_and_snapshot_arguments_are_checked(sync_env: SyncEnv, cli: Cli) -> None:
    settings = sync_env.settings
    for i in range(3):  # dead-lettered one after another, on partitions in reverse order
        producer = make_producer(settings)
        producer.send(settings.sales_topic, key=f"k{i}".encode(), value=b"not avro",
                      partition=2 - i).get(30)
        producer.close()
        consume_until_caught_up(ErpConsumer(settings))

    listed = cli(settings, "dlq", "list", "--json")
    assert listed.code == 0
    assert [d["key"] for d in listed.json] == ["k0", "k1", "k2"]  # oldest first
    typo = cli(settings, "dlq", "list", "--error-type", "DecodeErorr")
    assert typo.code == 2 and "did you mean 'DecodeError'" in typo.err
    assert "MappingError" in typo.err  # the known ones are listed
    topic = cli(settings, "dlq", "list", "--topic", settings.sales_topic + "x")
    assert topic.code == 2 and settings.sales_topic in topic.err
    assert cli(settings, "dlq", "list", "--error-type", "decode").code == 0
    assert cli(settings, "dlq", "list", "--error-type", "MappingError").code == 0  # none yet

    # The same condition, a dead letter that does not exist, the same code everywhere.
    for argv in (("show", "99999"), ("redrive", "99999"),
                 ("discard", "99999", "--reason", "x")):
        done = cli(settings, "dlq", *argv)
        assert done.code == 2 and "no dead letter 99999" in done.err, argv

    with sync_env.crm() as crm:
        cid = crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES "
                          "('张', '三') RETURNING customer_id").fetchone()[0]
    for bad in ("-5", "0", "1000001", "many"):
        with pytest.raises(SystemExit) as refused:  # argparse: usage error, exit 2
            cli(settings, "snapshot", "--table", "customers", "--chunk-size", bad)
        assert refused.value.code == 2, bad
    with sync_env.crm() as crm:
        assert crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots").fetchone() == (0,)
    missing = cli(settings, "snapshot", "--table", "customers", "--key", str(cid),
                  "--key", "987654")
    assert missing.code == 2 and "987654" in missing.err
    ok = cli(settings, "snapshot", "--table", "customers", "--key", str(cid),
             "--chunk-size", "10")
    assert ok.code == 0, ok.err
    with sync_env.crm() as crm:
        assert crm.execute("SELECT keys::text[], chunk_size FROM crm_erp_sync.snapshots "
                           "WHERE reason = 'ad-hoc'").fetchall() == [([str(cid)], 10)]


def test_a_refusal_of_a_dsn_that_connected_before_is_transient(sync_env: SyncEnv) -> None:
    erp = sync_env.settings.erp_dsn
    database = urlsplit(erp).path.lstrip("/")
    pg.connect(erp, "ERP").close()  # these credentials work
    with pg.connect(with_dsn(erp, database="postgres"), "admin") as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            # what a consumer meets when the database is closed to connections or its
            # connection limit is reached: retried, not a configuration error
            with pytest.raises(DatabaseUnreachable, match="accepted before"):
                pg.connect(erp, "ERP")
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    pg.connect(erp, "ERP").close()


def test_a_consumer_on_a_new_erp_database_says_to_run_setup_on_it(sync_env: SyncEnv,
                                                                    cli: Cli) -> None:
    """A brand-new ERP database (e.g. before a `replay` into it) nobody ran setup on: exit 2
    naming the missing object and `setup`, not "after an upgrade" alone (issue F5)."""
    name = f"{urlsplit(sync_env.settings.erp_dsn).path.lstrip('/')}_new"
    with psycopg.connect(sync_env.stack.admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        fresh = sync_env.with_(erp_dsn=sync_env.stack.dsn_for(name))
        done = cli(fresh, "consume", "--until-caught-up")
        assert done.code == 2, (done.out, done.err)
        assert "the ERP database has no " in done.err and "crm-erp-sync setup" in done.err
        assert "a new ERP database needs it" in done.err, done.err
        assert "unexpected_error" not in done.err and "Traceback" not in done.err
    finally:
        with psycopg.connect(sync_env.stack.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_consume_refuses_topic_settings_that_name_no_topic(sync_env: SyncEnv, cli: Cli) -> None:
    """A typo in a topic setting (or a topic deleted) is a configuration error naming the
    variable, exit 2: before, `consume --until-caught-up` with no sales topic applied nothing
    and exited 0 "caught up", and with no dead-letter topic it hung on the first letter
    saying the broker was unreachable (newcomer8)."""
    typo = sync_env.with_(sales_topic=f"{sync_env.settings.sales_topic}-typo",
                          dlq_topic=f"{sync_env.settings.dlq_topic}-typo")
    started = time.monotonic()
    done = cli(typo, "consume", "--until-caught-up")
    assert done.code == 2, (done.out, done.err)
    assert f"CRM_ERP_SYNC_SALES_TOPIC: topic '{typo.sales_topic}'" in done.err, done.err
    assert f"CRM_ERP_SYNC_DLQ_TOPIC: topic '{typo.dlq_topic}'" in done.err, done.err
    assert "does not exist on the broker" in done.err and "crm-erp-sync setup" in done.err
    assert "CRM_ERP_SYNC_MARKET_TOPIC" not in done.err  # that one exists
    assert "unexpected_error" not in done.err and "Traceback" not in done.err
    assert time.monotonic() - started < 60
    assert cli(sync_env.settings, "consume", "--until-caught-up").code == 0  # the real names
