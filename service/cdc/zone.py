"""The time zone a CRM's ``timestamp without time zone`` values are read in.

A naive timestamp is the CRM's wall-clock time: its users read it in their session's time
zone, which is the database's or role's ``timezone`` setting (``ALTER DATABASE crm SET
timezone = 'Asia/Shanghai'``) unless a client sets its own. The producer's sessions set
``TimeZone = 'UTC'`` (so ``timestamptz`` text is UTC), and pgoutput sends a naive value's text
unchanged, so the zone is read once from ``pg_settings.reset_val`` (the value the session
started with: the database/role default) and applied in Python, by the snapshot reads, the
streamed changes and ``reconcile`` alike. ``CRM_ERP_SYNC_CRM_TIMEZONE`` overrides it.
"""

from __future__ import annotations

from datetime import UTC, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from service.errors import ConfigError
from service.settings import Settings

_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "GMT", "Etc/GMT", "Z", "Zulu", "UCT", "Universal"})


def zone_named(name: str, variable: str) -> tzinfo:
    """The IANA zone ``name`` (UTC itself for UTC's aliases).

    Raises ConfigError naming ``variable`` when Python's zone database does not know it (a
    POSIX zone string such as ``<+08>-08``: set CRM_ERP_SYNC_CRM_TIMEZONE to an IANA name)."""
    if name in _UTC_NAMES:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(variable, f"time zone {name!r} is not an IANA zone name that Python "
                          "knows (set CRM_ERP_SYNC_CRM_TIMEZONE to one, e.g. Asia/Shanghai)"
                          ) from exc


def crm_naive_zone(conn: psycopg.Connection[Any], settings: Settings) -> tzinfo:
    """The zone naive CRM timestamps are read in: ``settings.crm_timezone``, else the CRM
    session's own default (its database's/role's ``timezone``).

    Raises ConfigError when that zone is not one Python knows."""
    if settings.crm_timezone:
        return zone_named(settings.crm_timezone, settings.env_var("crm_timezone"))
    row = conn.execute("SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'").fetchone()
    name = str(row[0]) if row and row[0] else "UTC"
    return zone_named(name, f"the CRM's timezone setting ({settings.env_var('crm_timezone')} "
                            "overrides it)")
