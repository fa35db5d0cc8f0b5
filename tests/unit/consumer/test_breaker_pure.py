"""Pure parts of the breaker and its operator command: reasons, partition names, filters."""

from __future__ import annotations

import pytest

from service.consumer.breaker import last_errors, last_reasons
from service.errors import ApplyError, CaptureRejected, ConfigError, DecodeError, MappingError
from service.operator.breaker import parse_partition
from service.operator.dlq import check_filter


def test_last_reasons_are_the_latest_distinct_ones_without_values() -> None:
    errors = [DecodeError("bad bytes")] + [MappingError("phone", "138xxxx5678", "not a number")
                                           for _ in range(3)] + [DecodeError("bad bytes")]
    reasons = last_reasons(errors)
    assert reasons == ["DecodeError: bad bytes", "MappingError: phone"]
    assert not any("138xxxx5678" in r for r in reasons)  # values may be personal data
    assert len(last_reasons([DecodeError(str(i)) for i in range(20)], n=5)) == 5


def test_the_trips_reasons_for_status_never_quote_the_crms_word() -> None:
    """`status` shows them: a status column holding a name and a phone must not."""
    status = MappingError("status", "张三 13812345678", "unknown order status 张三 13812345678")
    refused = ApplyError('InvalidTextRepresentation: invalid input syntax for type numeric: '
                         '"13812345678"')
    shown = last_reasons([status, refused])
    assert shown == ["ApplyError", "MappingError: status"]
    assert not any("张三" in t or "13812345678" in t for t in shown)


def test_the_trip_log_line_names_classes_and_fields_never_a_reason() -> None:
    status = MappingError("status", "张三 13812345678", "unknown order status 张三 13812345678")
    errors = [DecodeError("bad bytes"), status, status,
              CaptureRejected("numeric NaN is not a finite number", "purchase_amount")]
    logged = last_errors(errors)
    assert logged == ["CaptureRejected: purchase_amount", "MappingError: status",
                      "DecodeError"]
    assert not any("张三" in t or "13812345678" in t for t in logged)


@pytest.mark.parametrize(("text", "parsed"), [
    ("crm.sales:1", ("crm.sales", 1)), ("a:b:12", ("a:b", 12))])
def test_partition_names(text: str, parsed: tuple[str, int]) -> None:
    assert parse_partition(text) == parsed


@pytest.mark.parametrize("text", ["crm.sales", "crm.sales:", ":1", "crm.sales:-1", "x:one"])
def test_bad_partition_names_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="TOPIC:PARTITION"):
        parse_partition(text)


def test_a_filter_typo_is_refused_with_the_known_values() -> None:
    known = ["DecodeError", "MappingError", "decode", "transform"]
    check_filter("--error-type", "MappingError", known)
    with pytest.raises(ConfigError) as info:
        check_filter("--error-type", "MapingError", known)
    assert "did you mean 'MappingError'" in str(info.value)
    assert "known: DecodeError, MappingError, decode, transform" in str(info.value)
    with pytest.raises(ConfigError, match="unknown value 'zzz'; known"):
        check_filter("--topic", "zzz", ["crm.sales"])
