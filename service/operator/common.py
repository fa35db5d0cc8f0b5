"""Connections for operator commands, with unreachable services named clearly."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service import pg
from service.errors import BrokerUnreachable, ConfigError, StackUnavailable
from service.pg import PgConn
from service.settings import Settings

if TYPE_CHECKING:
    from kafka import KafkaConsumer

__all__ = ["BROKER_CHECK_S", "PgConn", "actor", "broker_consumer", "broker_unreachable",
           "connect", "parse_time"]

# How long an operator command (`status`, `trace`, `pause`, `resume`) waits for the broker
# before it says it is unreachable: kafka-python's own bootstrap wait is 30 s, and an operator
# runs these during an outage. A broker that answers at all answers its first request in well
# under a second; the margin is for a machine whose cores are busy (a false "unreachable"
# would mislead more than a wait).
BROKER_CHECK_S = 8.0


def connect(settings: Settings, which: str, *, autocommit: bool = True) -> PgConn:
    """``which`` is 'crm' or 'erp'."""
    dsn = settings.crm_dsn if which == "crm" else settings.erp_dsn
    return pg.connect(dsn, which.upper(), autocommit=autocommit)


def broker_unreachable(settings: Settings, unknown: str) -> str:
    """The one line every operator command prints when the broker did not answer within
    ``BROKER_CHECK_S``: ``broker HOST:PORT unreachable: <unknown>``, where ``unknown`` says
    what could therefore not be checked or done."""
    return f"broker {settings.kafka_bootstrap} unreachable: {unknown}"


def broker_consumer(settings: Settings, unknown: str, **overrides: Any) -> KafkaConsumer:
    """``kafka_io.make_consumer(settings, **overrides)`` whose bootstrap waits at most
    ``BROKER_CHECK_S`` (not kafka-python's 30 s). Raises BrokerUnreachable (a
    StackUnavailable: exit 3) with :func:`broker_unreachable`'s line when no broker answered;
    the calls made on the consumer afterwards go to a broker that did."""
    from service.kafka_io import make_consumer

    try:
        return make_consumer(settings, bootstrap_timeout_ms=int(BROKER_CHECK_S * 1000),
                             **overrides)
    except StackUnavailable as exc:
        raise BrokerUnreachable(broker_unreachable(settings, unknown)) from exc


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
