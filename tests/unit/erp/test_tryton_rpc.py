"""Tryton's JSON encoding and the translation of its errors (service/erp/tryton_rpc.py)."""

from __future__ import annotations

import datetime as dt
import socket
from decimal import Decimal

import pytest

from service.erp.tryton_rpc import TrytonRPC, dumps, loads, translate_error
from service.errors import (
    ApplyError,
    Retryable,
    SyncError,
    TargetError,
    TargetRefused,
    TargetUnavailable,
)


def test_values_round_trip_in_trytons_json_classes() -> None:
    values = [Decimal("5000.10"), dt.date(2026, 11, 29), dt.datetime(2026, 11, 29, 8, 1, 2, 3),
              dt.timedelta(seconds=90), b"\x00\xff", "张三"]
    encoded = dumps(values)
    assert b'"__class__": "Decimal", "decimal": "5000.10"' in encoded
    assert "张三".encode() in encoded  # sent as UTF-8, not \\u escapes
    assert loads(encoded) == values


def test_a_user_error_is_a_permanent_refusal_with_trytons_message_kept_out_of_str() -> None:
    error = ["UserError", ["The code on party must be unique.", "CRM-42 张三", []]]

    exc = translate_error("model.party.party.create", error)

    assert isinstance(exc, TargetRefused) and isinstance(exc, ApplyError)
    assert not isinstance(exc, Retryable)
    assert exc.error_class == "UserError"
    assert exc.detail == "The code on party must be unique. CRM-42 张三"
    assert "张三" not in str(exc) and "张三" not in exc.reason


@pytest.mark.parametrize("error", [
    ["ConcurrencyException", "Records were modified in the meantime"],
    ["could not serialize access due to concurrent update", "Traceback ... 张三"],
    None,
])
def test_concurrency_server_exceptions_and_garbage_are_transient(error: object) -> None:
    exc = translate_error("model.sale.sale.confirm", error)

    assert isinstance(exc, TargetUnavailable) and isinstance(exc, Retryable)
    assert "张三" not in str(exc) and "Traceback" not in str(exc)


def test_a_rejected_session_is_a_target_error_not_a_retry() -> None:
    exc = translate_error("model.sale.sale.read", ["LoginException", "password", "..."])
    assert type(exc) is TargetError and isinstance(exc, SyncError)


def test_a_server_that_is_not_listening_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    rpc = TrytonRPC(f"http://127.0.0.1:{port}", "tryton", "crm_sync", "secret", timeout_s=2)

    with pytest.raises(TargetUnavailable, match="unreachable"):
        rpc.login()
