"""The one place that provides real services to the tests.

Order of preference:
1. environment variables naming a broker and databases (CRM_ERP_SYNC_KAFKA_BOOTSTRAP,
   CRM_ERP_SYNC_CRM_DSN, CRM_ERP_SYNC_ERP_DSN): used as they are;
2. the local stack (`make up`) on its default ports;
   (1 or 2 is "local", i.e. restartable by tests through deploy/local/stack.sh, when this
   worktree's .stack/ runs the broker and PostgreSQL on exactly those ports: a second stack
   started with STACK_KAFKA_PORT/STACK_PG_PORT/STACK_KAFKA_CONTROLLER_PORT qualifies; tests
   actually kill or restart it only with STACK_TESTS_MAY_RESTART=1, because a
   local stack may be shared by other checkouts and people: see Stack.why_not_restartable);
3. a Docker engine: Apache Kafka 4.x (KRaft) and PostgreSQL 15 (wal_level=logical) started
   with testcontainers, once per session;
4. otherwise integration tests are skipped with a reason that says how to bring the stack up.

Each integration test gets its own CRM and ERP databases and its own topics, group, slot and
publication names, so tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from service.settings import REPO_ROOT, Settings

SKIP_REASON = (
    "no Kafka broker and PostgreSQL reachable: run `make up` (local stack, no Docker needed), "
    "or set CRM_ERP_SYNC_KAFKA_BOOTSTRAP / CRM_ERP_SYNC_CRM_DSN / CRM_ERP_SYNC_ERP_DSN"
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


# Tests that kill the broker or restart PostgreSQL run only when this is "1" (see
# Stack.why_not_restartable). A STACK_* name like the local stack's own variables, not
# CRM_ERP_SYNC_*: the service reads every CRM_ERP_SYNC_* variable as a setting and warns
# about an unknown one on stderr, in every command a test runs.
RESTART_OPT_IN = "STACK_TESTS_MAY_RESTART"
# The official image of the Kafka version the local stack runs (deploy/local/pom.xml), as
# docker-compose.yml (tests/unit/test_deploy_files.py keeps the three equal).
KAFKA_IMAGE = "apache/kafka:4.3.1"


@dataclasses.dataclass(frozen=True)
class Stack:
    kafka_bootstrap: str
    admin_dsn: str  # a DSN whose database we can use to CREATE/DROP DATABASE
    local: bool = False  # the no-Docker stack of deploy/local (tests may restart its server)
    # STACK_* variables that make deploy/local/stack.sh act on this stack's ports
    script_env: tuple[tuple[str, str], ...] = ()

    def dsn_for(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))

    def why_not_restartable(self) -> str | None:
        """Why tests may not kill or restart this stack's servers (a skip reason), or None.

        Only this worktree's own stack, and only when RESTART_OPT_IN is "1": a restart ends
        every session, walsender and broker connection on the server, other checkouts' and
        other people's included, so on a stack anyone else may use it is opt-in (.ci/run,
        on a machine of its own, opts in)."""
        if not self.local:
            return ("kills the broker / restarts PostgreSQL: only on this worktree's local "
                    "stack (make up, or a second one on STACK_* ports)")
        if os.environ.get(RESTART_OPT_IN) != "1":
            return (f"kills the broker / restarts PostgreSQL, which ends everyone's sessions on "
                    f"it: set {RESTART_OPT_IN}=1 only when nobody else uses this stack (or "
                    "point the tests at a second stack of your own on STACK_* ports)")
        return None

    def script(self, *args: str, timeout: float = 180.0) -> None:
        """Run deploy/local/stack.sh on this stack (restart-pg, kill-kafka, start-kafka).
        Raises RuntimeError when why_not_restartable() gives a reason."""
        import subprocess

        reason = self.why_not_restartable()
        if reason:
            raise RuntimeError(f"not restarting this stack: {reason}")
        subprocess.run(["bash", str(REPO_ROOT / "deploy/local/stack.sh"), *args], check=True,
                       capture_output=True, timeout=timeout,
                       env={**os.environ, **dict(self.script_env)})


def _local_stack(kafka_bootstrap: str, dsn: str) -> tuple[bool, tuple[tuple[str, str], ...]]:
    """Whether this worktree's .stack/ serves exactly this broker and PostgreSQL, and the
    STACK_* environment that points deploy/local/stack.sh at them."""
    import re

    state = REPO_ROOT / ".stack"
    props, pg_conf = state / "kafka" / "server.properties", state / "pg" / "data" / "stack.conf"
    if not props.is_file() or not pg_conf.is_file():
        return False, ()
    broker = re.search(r"^listeners=PLAINTEXT://[^:]+:(\d+),CONTROLLER://[^:]+:(\d+)",
                       props.read_text(), re.M)
    pg_port = re.search(r"^port = (\d+)", pg_conf.read_text(), re.M)
    if broker is None or pg_port is None:
        return False, ()
    kafka_port = kafka_bootstrap.split(",")[0].rsplit(":", 1)[-1]
    if broker[1] != kafka_port or int(pg_port[1]) != (urlsplit(dsn).port or 5432):
        return False, ()
    return True, (("STACK_KAFKA_PORT", broker[1]), ("STACK_KAFKA_CONTROLLER_PORT", broker[2]),
                  ("STACK_PG_PORT", pg_port[1]))


def _start_containers() -> tuple[Stack, list[Any]]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer

    pg = PostgresContainer("postgres:15", username="sync", password="sync", dbname="crm")
    pg.with_command("postgres -c wal_level=logical -c max_replication_slots=20")
    pg.start()
    kafka = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, 9092)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT://localhost:9092")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    )
    kafka.start()
    wait_for_logs(kafka, "Kafka Server started", timeout=120)
    host, port = pg.get_container_host_ip(), pg.get_exposed_port(5432)
    return Stack("localhost:9092", f"postgresql://sync:sync@{host}:{port}/crm"), [kafka, pg]


_test_tags: list[str] = []  # every sync_env's name prefix in this session


def _delete_test_topics(bootstrap: str) -> None:
    """Delete the topics this session's tests made on a broker that outlives it (one admin
    call at the end; a shared broker otherwise piles up thousands of test topics and starts
    ever slower). Best effort: a broker gone by now keeps them."""
    if not _test_tags:
        return
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    prefixes = tuple(f"{tag}." for tag in _test_tags)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)
    except KafkaError:
        return
    try:
        doomed = [t for t in admin.list_topics() if t.startswith(prefixes)]
        for i in range(0, len(doomed), 200):
            admin.delete_topics(doomed[i:i + 200], timeout_ms=60_000)
    except KafkaError:
        pass
    finally:
        admin.close()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    env = os.environ
    if "CRM_ERP_SYNC_KAFKA_BOOTSTRAP" in env and "CRM_ERP_SYNC_CRM_DSN" in env:
        bootstrap, dsn = env["CRM_ERP_SYNC_KAFKA_BOOTSTRAP"], env["CRM_ERP_SYNC_CRM_DSN"]
        try:
            yield Stack(bootstrap, dsn, *_local_stack(bootstrap, dsn))
        finally:
            _delete_test_topics(bootstrap)
        return
    defaults = Settings()
    kafka_host, kafka_port = defaults.kafka_bootstrap.split(":")
    pg = urlsplit(defaults.crm_dsn)
    if _reachable(kafka_host, int(kafka_port)) and _reachable(pg.hostname or "", pg.port or 0):
        try:
            yield Stack(defaults.kafka_bootstrap, defaults.crm_dsn,
                        *_local_stack(defaults.kafka_bootstrap, defaults.crm_dsn))
        finally:
            _delete_test_topics(defaults.kafka_bootstrap)
        return
    if _docker_answers():
        started, containers = _start_containers()
        try:
            yield started
        finally:
            for c in containers:
                c.stop()
        return
    pytest.skip(SKIP_REASON)


_counter = itertools.count()


@dataclasses.dataclass
class SyncEnv:
    """A private sync world for one test: its own databases, topics, group, slot."""

    settings: Settings
    stack: Stack

    def with_(self, **changes: Any) -> Settings:
        return dataclasses.replace(self.settings, **changes)

    def crm(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.settings.crm_dsn, autocommit=True)

    def erp(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.settings.erp_dsn, autocommit=True)


def _create_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def _drop_database(admin_dsn: str, name: str) -> None:
    """Drop a test database, first its logical slots: FORCE ends its sessions but not a
    walsender still streaming from one of its slots (a process the test killed may leave one
    behind for a moment), and PostgreSQL refuses to drop a database with an active slot."""
    deadline = time.monotonic() + 30
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        while True:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE database = %s AND active_pid IS NOT NULL", (name,))
            try:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                             "pg_replication_slots WHERE database = %s AND NOT active", (name,))
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class _PgServer(Protocol):
    """Where a test's CRM database is created: the shared stack, or a private cluster."""

    @property
    def admin_dsn(self) -> str: ...

    def dsn_for(self, database: str) -> str: ...


@contextlib.contextmanager
def _sync_env(stack: Stack, crm_server: _PgServer) -> Iterator[SyncEnv]:
    """A test's CRM database on crm_server, its ERP database, topics and group on stack;
    `setup` run. Everything is dropped again on exit."""
    from service.setup import run_setup

    tag = f"t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    _test_tags.append(tag)
    crm_db, erp_db = f"crm_{tag}", f"erp_{tag}"
    _create_database(crm_server.admin_dsn, crm_db)
    _create_database(stack.admin_dsn, erp_db)
    settings = dataclasses.replace(
        Settings(),
        kafka_bootstrap=stack.kafka_bootstrap,
        crm_dsn=crm_server.dsn_for(crm_db),
        erp_dsn=stack.dsn_for(erp_db),
        sales_topic=f"{tag}.crm.sales",
        market_topic=f"{tag}.crm.market-demand",
        dlq_topic=f"{tag}.dlq",
        topic_partitions=3,
        consumer_group=f"{tag}.erp",
        slot_name=f"slot_{tag}",
        publication_name=f"pub_{tag}",
        heartbeat_interval_s=2.0,
        orphan_hold_s=300.0,
    )
    run_setup(settings)
    try:
        yield SyncEnv(settings, stack)
    finally:
        with psycopg.connect(crm_server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active", (settings.slot_name,))
        _drop_database(crm_server.admin_dsn, crm_db)
        _drop_database(stack.admin_dsn, erp_db)


@pytest.fixture
def sync_env(stack: Stack) -> Iterator[SyncEnv]:
    """Fresh CRM and ERP databases and names; `setup` already run."""
    with _sync_env(stack, stack) as env:
        yield env


# ---- a private PostgreSQL for tests that lose a slot on purpose ------------------------------
#
# max_slot_wal_keep_size is cluster-wide: a server where it is small invalidates every idle or
# lagging slot on it at the next checkpoint, whoever owns the slot (another test, a stopped
# demo, another developer). Tests that must lose their slot therefore never change it on a
# shared server: their CRM database lives on a throwaway cluster of their own, started once a
# session from the Debian binaries the local stack uses (deploy/local/stack.sh).

PG_BIN = Path(os.environ.get("STACK_PG_BIN", "/usr/lib/postgresql/15/bin"))
SMALL_WAL_KEEP = "16MB"  # max_slot_wal_keep_size of the private cluster


@dataclasses.dataclass(frozen=True)
class PrivatePg:
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1:port, role sync/sync (superuser),
    wal_level=logical and max_slot_wal_keep_size = SMALL_WAL_KEEP; nobody else uses it."""

    port: int
    directory: Path  # data/, run/ (unix socket), postgres.log

    @property
    def admin_dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://sync:sync@127.0.0.1:{self.port}/{database}?connect_timeout=5"


def _private_pg_missing() -> str | None:
    """Why no private cluster can be started here, or None."""
    import shutil
    import subprocess

    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        return (f"PostgreSQL 15's initdb/pg_ctl not found in {PG_BIN} (apt-get install "
                "postgresql-15, or set STACK_PG_BIN): this test loses a replication slot on "
                "purpose and does so only on a private cluster, never on a shared server")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(
            ["id", "postgres"], capture_output=True).returncode != 0):
        return ("running as root without a `postgres` OS user (or runuser): initdb refuses "
                "to run as root, so no private cluster can be started for this test")
    return None


def _as_postgres(*args: str | Path, timeout: float = 120) -> None:
    """Run a PostgreSQL tool; as root, as the `postgres` OS user (as stack.sh's as_pg does):
    initdb and postgres refuse to run as root."""
    import subprocess

    cmd = [str(a) for a in args]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


@pytest.fixture(scope="session")
def small_wal_pg() -> Iterator[PrivatePg]:
    """A private PostgreSQL 15 cluster whose max_slot_wal_keep_size is SMALL_WAL_KEEP, for the
    tests that lose a slot on purpose (~2 s to start; stopped with `-m immediate` and deleted
    at the end of the session). Skips when PostgreSQL 15's binaries are not installed here
    (e.g. a Docker-only machine)."""
    import shutil
    import subprocess
    import tempfile

    missing = _private_pg_missing()
    if missing:
        pytest.skip(missing)
    # Not pytest's tmp_path: it lives under a 0700 directory the postgres user cannot reach.
    d = Path(tempfile.mkdtemp(prefix="crm-erp-sync-small-wal-"))
    d.chmod(0o755)
    data, run, log, pw = d / "data", d / "run", d / "postgres.log", d / "pw"
    run.mkdir(mode=0o700)
    pw.write_text("sync\n")
    pw.chmod(0o600)
    if os.geteuid() == 0:
        for p in (d, run, pw):
            shutil.chown(p, "postgres", "postgres")
    port = _free_port()
    try:
        _as_postgres(PG_BIN / "initdb", "-D", data, "-U", "sync", f"--pwfile={pw}", "-E", "UTF8",
                     "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                     "--no-sync", "--no-instructions")
        pw.unlink()
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"""
# crm-erp-sync tests (tests/conftest.py small_wal_pg): private, throwaway
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{run}'
unix_socket_permissions = 0700
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
max_slot_wal_keep_size = {SMALL_WAL_KEEP}
max_connections = 40
shared_buffers = 16MB
fsync = off
password_encryption = scram-sha-256
""")
        try:
            _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start")
        except RuntimeError as exc:
            tail = log.read_text("utf-8", "replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"private PostgreSQL did not start: {exc}\n{tail}") from None
        yield PrivatePg(port, d)
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that timed out
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "30",
                             "stop", timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def small_wal_env(stack: Stack, small_wal_pg: PrivatePg) -> Iterator[SyncEnv]:
    """sync_env, but its CRM database lives on small_wal_pg (max_slot_wal_keep_size 16MB),
    so a test can lose its slot without touching a setting of the shared server; the ERP,
    topics and group are on the shared stack as usual."""
    with _sync_env(stack, small_wal_pg) as env:
        yield env


# ---- a real CRM: BottleCRM (deploy/bottlecrm) -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BottleCrmInstall:
    template: str
    install_s: float  # wall time of install.sh in this session (near 0 when already built)


@dataclasses.dataclass
class BottleCrmDb:
    """One test's BottleCRM database, cloned from the migrated template, and its writer."""

    dsn: str  # as the stack's administrator (a superuser: reads past BottleCRM's RLS)
    name: str
    writer: Any  # service.demo.bottlecrm.Writer

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)


@pytest.fixture(scope="session")
def bottlecrm_installed(stack: Stack) -> BottleCrmInstall:
    """deploy/bottlecrm/install.sh has run (idempotent); skips without Python 3.12."""
    from service.demo import bottlecrm

    try:
        seconds = bottlecrm.ensure_installed(stack.admin_dsn)
    except bottlecrm.BottleCrmUnavailable as exc:
        pytest.skip(f"BottleCRM cannot be installed here: {exc}")
    return BottleCrmInstall(bottlecrm.TEMPLATE, seconds)


@pytest.fixture
def bottlecrm_db(stack: Stack, bottlecrm_installed: BottleCrmInstall) -> Iterator[BottleCrmDb]:
    """A fresh BottleCRM database (its 149 tables, no data) and a started writer on it."""
    from service.demo import bottlecrm

    name = f"bottlecrm_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{bottlecrm_installed.template}"')
    writer = None
    try:
        writer = bottlecrm.Writer(stack.dsn_for(name))
        yield BottleCrmDb(stack.dsn_for(name), name, writer)
    finally:
        if writer is not None:
            writer.close()
        _drop_database(stack.admin_dsn, name)

# ---- Tryton (the `tryton` ERP target) -------------------------------------------------------



@dataclasses.dataclass(frozen=True)
class TrytonServer:
    """A running trytond on a database cloned from the template, for one test module."""

    url: str
    database: str
    login: str
    password: str


def _tryton_stack_ok(stack: Stack) -> str | None:
    """Why deploy/tryton/install.sh cannot use this stack's PostgreSQL, or None."""
    parts = urlsplit(stack.admin_dsn)
    port = int(os.environ.get("STACK_PG_PORT", "15432"))
    if (parts.hostname, parts.port, parts.username) != ("127.0.0.1", port, "sync"):
        return ("the Tryton tests build their template on the local stack's PostgreSQL "
                f"(127.0.0.1:{port}, role sync): run `make up`")
    return None


@pytest.fixture(scope="session")
def tryton_install(stack: Stack) -> Path:
    """Tryton's venv and the template database (deploy/tryton/install.sh; idempotent)."""
    import subprocess

    reason = _tryton_stack_ok(stack)
    if reason:
        pytest.skip(reason)
    script = REPO_ROOT / "deploy" / "tryton" / "install.sh"
    venv = subprocess.run(["bash", str(script), "venv"], capture_output=True, text=True,
                          timeout=900)
    if venv.returncode != 0:
        # Only this is a reason to skip: no Python 3.10+ or no package index here.
        pytest.skip("Tryton cannot be installed here (deploy/tryton/install.sh venv): "
                    + venv.stderr.strip()[-400:])
    template = subprocess.run(["bash", str(script), "template"], capture_output=True,
                              text=True, timeout=1800)
    assert template.returncode == 0, f"Tryton template build failed:\n{template.stderr}"
    return REPO_ROOT / ".stack" / "tryton"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tryton_server(stack: Stack, tryton_install: Path) -> Iterator[TrytonServer]:
    """trytond on 127.0.0.1 for a database cloned from the template (~1 s) for one module."""
    import subprocess

    from service.demo.tryton import template_name

    database = f"tryton_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}" TEMPLATE "{template_name()}"')
    script = REPO_ROOT / "deploy" / "tryton" / "server.sh"
    port = _free_port()
    try:
        started = subprocess.run(["bash", str(script), "start", database, str(port)],
                                 capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, f"trytond did not start:\n{started.stderr[-2000:]}"
        yield TrytonServer(f"http://127.0.0.1:{port}", database, "crm_sync",
                           (tryton_install / "sync.pass").read_text().strip())
    finally:
        subprocess.run(["bash", str(script), "stop", database], capture_output=True,
                       timeout=60)
        _drop_database(stack.admin_dsn, database)
