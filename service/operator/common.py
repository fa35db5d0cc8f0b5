"""Connections for operator commands, with unreachable services named clearly."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime

from service import pg
from service.errors import ConfigError
from service.pg import PgConn
from service.settings import Settings

__all__ = ["PgConn", "actor", "connect", "parse_time"]


def connect(settings: Settings, which: str, *, autocommit: bool = True) -> PgConn:
    """``which`` is 'crm' or 'erp'."""
    dsn = settings.crm_dsn if which == "crm" else settings.erp_dsn
    return pg.connect(dsn, which.upper(), autocommit=autocommit)


def actor(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except Exception:  # no user name in a container
        return os.environ.get("USER", "unknown")


def parse_time(text: str, option: str) -> datetime:
    """ISO 8601; a time without zone is UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(option, f"not an ISO 8601 time: {text!r} "
                                  "(e.g. 2024-05-01T08:00:00+08:00)") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)
