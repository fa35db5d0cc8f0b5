"""service.log: one JSON object per line, personal data and secrets redacted."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from service.log import REDACTED, configure, redact_value


@pytest.fixture
def logged() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Configure JSON logging, send it to a buffer instead of stderr, and return a function
    that parses what was logged since the last call."""
    configure(level="info", fmt="json")
    buf = io.StringIO()
    # configure() binds sys.stderr; swap only the output, keep the service's processors.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))

    def lines() -> list[dict[str, Any]]:
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    yield lines
    structlog.reset_defaults()


def test_one_json_object_per_line_with_level_and_utc_timestamp(logged: Any) -> None:
    log = structlog.get_logger()
    log.info("first", topic="crm.sales")
    log.warning("second", partition=2)
    first, second = logged()
    assert first["event"] == "first" and first["level"] == "info"
    assert second["level"] == "warning" and second["partition"] == 2
    assert first["timestamp"].endswith("Z")


def test_level_filtering(logged: Any) -> None:
    log = structlog.get_logger()
    log.debug("noise")
    log.info("signal")
    assert [e["event"] for e in logged()] == ["signal"]


def test_personal_data_is_redacted_and_kafka_coordinates_survive(logged: Any) -> None:
    structlog.get_logger().info(
        "applied",
        topic="crm.sales", partition=3, offset=13812345678, event_id="16B374D848/2",
        family_name="张", given_name="三", address="北京市朝阳区建国路88号",
        phone="13812345678", email="zhangsan@example.com",
        note="客户电话 13812345678，备用 +86 138-1234-5678，邮箱 zhang.san+crm@mail.example.cn",
    )
    (entry,) = logged()
    for key in ("family_name", "given_name", "address", "phone", "email"):
        assert entry[key] == REDACTED, key
    assert entry["note"] == "客户电话 ***，备用 ***，邮箱 ***"
    assert entry["topic"] == "crm.sales"
    assert entry["partition"] == 3
    assert entry["offset"] == 13812345678  # a number, not a phone
    assert entry["event_id"] == "16B374D848/2"
    raw = json.dumps(entry, ensure_ascii=False)
    for leaked in ("张", "北京市", "13812345678\"", "138-1234-5678", "@example.com", "@mail"):
        assert leaked not in raw


def test_nested_rows_are_redacted(logged: Any) -> None:
    row = {"customer_id": 42, "family_name": "Smith", "given_name": "John",
           "middle_name": None, "phone": "(555) 010-4477", "email": "john@example.com",
           "birth_date": "1990-05-17", "notes": "VIP since 2019", "gender": "男"}
    structlog.get_logger().info("row", record={"before": None, "after": row},
                                rows=[row, (row,)])
    (entry,) = logged()
    after = entry["record"]["after"]
    assert after["customer_id"] == 42 and after["gender"] == "男"
    assert after["middle_name"] is None  # nothing to hide
    for key in ("family_name", "given_name", "phone", "email", "birth_date", "notes"):
        assert after[key] == REDACTED, key
        assert entry["rows"][0][key] == REDACTED
        assert entry["rows"][1][0][key] == REDACTED
    raw = json.dumps(entry)
    for leaked in ("Smith", "John", "555", "john@", "1990", "VIP"):
        assert leaked not in raw
    # The caller's data is not modified.
    assert row["family_name"] == "Smith"


def test_secrets_are_hidden(logged: Any) -> None:
    structlog.get_logger().info(
        "connecting",
        crm_dsn="postgresql://sync:s3cr3t@db:5432/crm",
        target="postgresql://sync:an0ther@db:5432/erp",
        password="hunter2", token="tok-123",
        message="retrying postgresql://sync:th1rd@10.0.0.5:5432/crm in 2s",
    )
    (entry,) = logged()
    assert entry["crm_dsn"] == REDACTED
    assert entry["target"] == "postgresql://sync:***@db:5432/erp"
    assert entry["password"] == REDACTED and entry["token"] == REDACTED
    assert entry["message"].startswith("retrying postgresql://sync:***@")
    raw = json.dumps(entry)
    for leaked in ("s3cr3t", "an0ther", "hunter2", "tok-123", "th1rd"):
        assert leaked not in raw


def test_settings_secret_field_names_are_redacted(logged: Any) -> None:
    structlog.get_logger().info("settings", kafka_sasl_password="hunter2-sasl")
    assert "hunter2-sasl" not in json.dumps(logged())


def _fail_lookup() -> None:
    private_note = "客户张三的私人备注-DO-NOT-LOG"  # matches no redaction pattern
    customer_phone = "13912345678"
    raise ValueError(f"lookup failed for {len(private_note) + len(customer_phone)} chars")


def test_exception_is_structured_and_has_no_frame_locals(logged: Any) -> None:
    try:
        _fail_lookup()
    except ValueError:
        structlog.get_logger().exception("lookup_failed", topic="crm.sales")
    (entry,) = logged()
    raw = json.dumps(entry, ensure_ascii=False)
    assert entry["level"] == "error" and entry["topic"] == "crm.sales"
    (exc,) = entry["exception"]
    assert exc["exc_type"] == "ValueError"
    assert exc["exc_value"].startswith("lookup failed")
    assert len(exc["frames"]) >= 2
    assert all("locals" not in frame for frame in exc["frames"])
    assert "DO-NOT-LOG" not in raw
    assert "13912345678" not in raw
    assert "private_note" not in raw and "customer_phone" not in raw


def test_traceback_frames_keep_their_function_names(logged: Any) -> None:
    try:
        _fail_lookup()
    except ValueError:
        structlog.get_logger().exception("lookup_failed")
    (entry,) = logged()
    names = [frame["name"] for frame in entry["exception"][0]["frames"]]
    assert "_fail_lookup" in names


def test_exception_message_is_redacted(logged: Any) -> None:
    try:
        raise RuntimeError("no customer with phone 13812345678 / a@b.example")
    except RuntimeError:
        structlog.get_logger().exception("failed")
    (entry,) = logged()
    assert entry["exception"][0]["exc_value"] == "no customer with phone *** / ***"


@pytest.mark.parametrize(("text", "expected"), [
    ("13812345678", "***"),
    ("+86 138-1234-5678", "***"),
    ("+8613812345678", "***"),
    ("138 1234 5678", "***"),
    ("tel:13812345678.", "tel:***."),
    ("order 20230101", "order 20230101"),  # an order number is not a phone
    ("lsn 16/B374D848", "lsn 16/B374D848"),
    ("12345678901234", "12345678901234"),  # longer digit runs are not phones
    ("a.b-c+tag@sub.example.com", "***"),
])
def test_redact_value_patterns(text: str, expected: str) -> None:
    assert redact_value(text) == expected


def test_configure_writes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure(level="info", fmt="json")  # binds the sys.stderr of this moment (captured)
    try:
        structlog.get_logger().info("to_stderr", phone="13812345678", topic="crm.sales")
    finally:
        structlog.reset_defaults()
    captured = capsys.readouterr()
    (entry,) = [json.loads(line) for line in captured.err.splitlines()]
    assert entry["event"] == "to_stderr" and entry["phone"] == REDACTED
    assert captured.out == ""


def test_console_format_is_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure(level="info", fmt="console")
    try:
        structlog.get_logger().info("hello", phone="13812345678", topic="crm.sales")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "hello" in err and "crm.sales" in err
    assert "13812345678" not in err


def test_a_library_warning_is_one_redacted_json_line_and_its_info_is_dropped(
        capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    configure(level="debug", fmt="json")  # binds the handler to the captured stderr
    try:
        lib = logging.getLogger("psycopg")
        lib.info("chatter")
        lib.warning("error ignored terminating %s: pipeline aborted", "conn 13912345678")
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        [record] = [json.loads(line) for line in lines]  # every line JSON, INFO dropped
        assert record["level"] == "warning" and record["logger"] == "psycopg"
        assert record["event"] == f"error ignored terminating conn {REDACTED}: pipeline aborted"
        assert "timestamp" in record
    finally:
        logging.getLogger().handlers = []
        structlog.reset_defaults()
