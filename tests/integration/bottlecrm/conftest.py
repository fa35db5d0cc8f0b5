"""Roles for the BottleCRM tests (roles are cluster-wide: each gets a unique name)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from service.demo.bottlecrm import Role
from tests.conftest import Stack


def _role(stack: Stack, prefix: str, attributes: str) -> Iterator[Role]:
    role = Role(f"{prefix}_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex)
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role.name} {attributes} PASSWORD '{role.password}'")
    yield role
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        # Databases where the role still holds grants (the clone is dropped after us).
        dbs = [r[0] for r in conn.execute(
            "SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = %s::regrole",
            (role.name,))]
    for db in dbs:
        with psycopg.connect(stack.dsn_for(db), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role.name}")
    with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role.name}")  # grants on databases themselves
        conn.execute(f"DROP ROLE {role.name}")


@pytest.fixture
def capture_role(stack: Stack) -> Iterator[Role]:
    """A LOGIN REPLICATION role and nothing more."""
    yield from _role(stack, "cap", "LOGIN REPLICATION")


@pytest.fixture
def app_role(stack: Stack) -> Iterator[Role]:
    """A plain LOGIN role, as BottleCRM's RLS_SETUP asks the app to use (no BYPASSRLS)."""
    yield from _role(stack, "app", "LOGIN")
