"""Transient faults by exception class."""

from __future__ import annotations

import psycopg
import pytest
from kafka import errors as kafka_errors

from service.errors import ConnectionLost, Retryable, StackUnavailable
from service.faults import transient

# A library message may quote a row: the reason must never carry it.
ROW = "张三 138xxxx5678"


@pytest.mark.parametrize("exc", [
    psycopg.OperationalError(f"server closed the connection unexpectedly {ROW}"),
    psycopg.errors.AdminShutdown(ROW), psycopg.errors.CrashShutdown(ROW),
    psycopg.errors.CannotConnectNow(ROW), psycopg.InterfaceError(ROW),
    kafka_errors.KafkaConnectionError(ROW), kafka_errors.KafkaTimeoutError(ROW),
    kafka_errors.NodeNotReadyError(ROW), StackUnavailable(ROW),
])
def test_lost_connections_are_connection_lost(exc: Exception) -> None:
    fault = transient(exc, "CRM database")
    assert isinstance(fault, ConnectionLost)
    assert fault.reason.startswith("CRM database")
    assert "张三" not in fault.reason and "张三" not in str(fault)
    if not isinstance(exc, StackUnavailable):
        assert type(exc).__name__ in fault.reason


@pytest.mark.parametrize("exc", [
    psycopg.errors.DeadlockDetected(), psycopg.errors.SerializationFailure(),
    psycopg.errors.LockNotAvailable(), kafka_errors.NotLeaderForPartitionError(),
    kafka_errors.CoordinatorNotAvailableError(),
])
def test_conflicts_and_retriable_broker_errors_are_retryable(exc: Exception) -> None:
    fault = transient(exc, "ERP")
    assert isinstance(fault, Retryable) and not isinstance(fault, ConnectionLost)


@pytest.mark.parametrize("exc", [
    psycopg.errors.UniqueViolation(), psycopg.errors.NumericValueOutOfRange(),
    kafka_errors.MessageSizeTooLargeError(), ValueError("x"),
])
def test_the_rest_is_not_transient(exc: Exception) -> None:
    assert transient(exc, "broker") is None
