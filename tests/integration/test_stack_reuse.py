"""`make up` (deploy/local/stack.sh) in a second checkout: a healthy stack on the same ports
that another checkout started is reused (and never stopped by this one); a port held by
something else is refused, naming the port and what to set instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from service.settings import REPO_ROOT
from tests.conftest import Stack


@pytest.fixture
def second_checkout(tmp_path: Path, stack: Stack) -> Path:
    """A copy of the stack script in a checkout of its own (no .stack/, no jars, no venv)."""
    if not Path("/usr/lib/postgresql/15/bin/pg_ctl").exists() or shutil.which("psql") is None:
        pytest.skip("PostgreSQL 15 binaries (deploy/local/stack.sh's prerequisites) not here")
    try:
        with psycopg.connect(stack.dsn_for("erp"), connect_timeout=3):
            pass
    except psycopg.OperationalError:
        pytest.skip("the stack under test is not deploy/local's (no database erp)")
    script = tmp_path / "deploy" / "local" / "stack.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "deploy" / "local" / "stack.sh", script)
    return tmp_path


def _ports(stack: Stack) -> dict[str, str]:
    return {"STACK_KAFKA_PORT": stack.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1],
            "STACK_PG_PORT": str(urlsplit(stack.admin_dsn).port or 5432)}


def _run(checkout: Path, command: str, ports: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(checkout / "deploy" / "local" / "stack.sh"), command],
                          env={**os.environ, **ports, "STACK_WAIT_S": "20"},
                          capture_output=True, text=True, timeout=120)


def test_a_second_checkout_reuses_the_running_stack_and_leaves_it_running(
        second_checkout: Path, stack: Stack) -> None:
    ports = _ports(stack)
    up = _run(second_checkout, "up", ports)
    assert up.returncode == 0, up.stderr
    assert f"kafka on 127.0.0.1:{ports['STACK_KAFKA_PORT']} was not started by this checkout " \
           "but answers: reusing it" in up.stderr
    assert "reusing it" in up.stderr.split("postgresql on", 1)[1]
    # nothing of its own was started or fetched
    assert not (second_checkout / ".stack" / "kafka").exists()
    assert not (second_checkout / ".stack" / "pg").exists()
    assert not (second_checkout / "deploy" / "local" / "lib").exists()

    status = _run(second_checkout, "status", ports)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") == 2
    assert status.stdout.count("(not started by this checkout)") == 2

    down = _run(second_checkout, "down", ports)
    assert down.returncode == 0 and down.stderr.count("left running") == 2, down.stderr
    with psycopg.connect(stack.dsn_for("crm"), connect_timeout=3) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def foreign_port() -> Iterator[int]:
    """A port held by something that is not PostgreSQL (it accepts and says nothing)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_a_port_held_by_something_else_is_refused_naming_it(
        second_checkout: Path, stack: Stack, foreign_port: int) -> None:
    ports = {**_ports(stack), "STACK_PG_PORT": str(foreign_port)}
    up = _run(second_checkout, "up", ports)
    assert up.returncode == 1
    assert f"port 127.0.0.1:{foreign_port} is taken" in up.stderr
    assert "STACK_PG_PORT" in up.stderr and "CRM_ERP_SYNC_CRM_DSN" in up.stderr
