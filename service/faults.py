"""Transient faults by exception class: the one place library errors become ``Retryable``.

Long-running processes (producers, consumers) call :func:`transient` at their boundaries
and ``raise transient(exc, what) from exc``; they never look at message text. The reason
they get names what was lost and the exception class only: a library's message can quote
a row (psycopg's ``DataError`` does), so it is never copied.

- a lost session or an unreachable server (psycopg ``OperationalError`` family, except the
  in-transaction conflicts below; psycopg ``InterfaceError`` on a closed connection;
  kafka-python's connection, timeout and metadata errors; our ``StackUnavailable`` raised
  while reconnecting) -> :class:`ConnectionLost` (``/readyz`` 503 at once);
- a deadlock, serialization failure, lock timeout or cancelled statement, or any other
  kafka-python error that the library marks ``retriable`` -> :class:`Retryable`;
- anything else -> ``None``: not transient, the caller lets it propagate.
"""

from __future__ import annotations

import psycopg
from kafka import errors as kafka_errors

from service.errors import ConnectionLost, Retryable, StackUnavailable

# In-transaction conflicts: the session is fine, the statement can be retried.
PG_CONFLICT = (psycopg.errors.TransactionRollback, psycopg.errors.DeadlockDetected,
               psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable,
               psycopg.errors.QueryCanceled)
# The broker is gone or not answering: reconnect.
KAFKA_CONNECTION = (kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError,
                    kafka_errors.NodeNotReadyError, kafka_errors.RequestTimedOutError,
                    kafka_errors.Cancelled)
TRANSIENT_CLASSES = (psycopg.OperationalError, psycopg.InterfaceError, kafka_errors.KafkaError,
                     StackUnavailable)


def transient(exc: BaseException, what: str) -> Retryable | None:
    """The Retryable that ``exc`` is (``what`` names the peer: "CRM database", "broker"),
    or None when ``exc`` is not a transient fault."""
    name = type(exc).__name__
    if isinstance(exc, Retryable):
        return exc
    if isinstance(exc, PG_CONFLICT):
        return Retryable(f"{what}: {name}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ConnectionLost(f"{what} connection lost ({name})")
    if isinstance(exc, KAFKA_CONNECTION):
        return ConnectionLost(f"{what} unreachable ({name})")
    if isinstance(exc, kafka_errors.KafkaError) and exc.retriable:
        return Retryable(f"{what}: {name}")
    if isinstance(exc, StackUnavailable):
        return ConnectionLost(f"{what} unreachable")
    return None
