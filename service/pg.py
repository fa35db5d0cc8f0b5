"""The boundary with psycopg: connections made one way, an unreachable database named."""

from __future__ import annotations

from typing import Any

import psycopg

from service.errors import StackUnavailable
from service.settings import hide_secret

PgConn = psycopg.Connection[Any]


def connect(dsn: str, what: str, *, autocommit: bool = True) -> PgConn:
    """Connect to the CRM or ERP database (``what`` names it in the error)."""
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StackUnavailable(
            f"{what} database at {hide_secret(dsn)} is unreachable: {reason}; "
            "is the stack up? (make up)"
        ) from exc
