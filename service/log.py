"""structlog configuration: one JSON object per line, personal data and secrets redacted.

structlog has no built-in redaction, so a processor walks the event dict before the renderer.
Tracebacks are rendered without local variables: frame locals would leak personal data.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from service.settings import hide_secret

# Keys whose values are personal data or secrets, wherever they appear.
SENSITIVE_KEYS = frozenset(
    {
        "family_name", "given_name", "middle_name", "full_name", "phone", "phone_e164",
        "phone_extension", "phone_others",
        "email", "address", "street", "birth_date", "notes", "password", "secret", "token",
        "kafka_sasl_password", "sasl_password", "crm_dsn", "erp_dsn", "dsn",
    }
)
REDACTED = "***"
_MOBILE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?!\d)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def is_sensitive(key: object) -> bool:
    return isinstance(key, str) and (
        key in SENSITIVE_KEYS or key.endswith(("password", "_dsn", "secret", "token")))


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        if "://" in value:  # a URL's password (userinfo or query): settings' one pattern
            value = hide_secret(value)
        return _EMAIL.sub(REDACTED, _MOBILE.sub(REDACTED, value))
    if isinstance(value, dict):
        return {
            k: REDACTED if is_sensitive(k) and v is not None else redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        value = event_dict[key]
        if is_sensitive(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(value)
    return event_dict


# The libraries' own loggers (kafka-python, psycopg) go through the same redaction and
# renderer at WARNING and above: their INFO is chatter, and Python's last-resort handler
# printed their warnings as plain text lines among the JSON ones.
LIBRARY_LEVEL = logging.WARNING


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    exceptions = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, exceptions,
                    redact_processor, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(LIBRARY_LEVEL)
    # kafka-python 3's IO loop warns whenever one of its tasks took over 100 ms ("blocking the
    # event loop"), which on a busy machine is every time the thread waited for a core: no
    # fault, nothing to do. A real stall shows on /readyz and in the lag.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            exceptions,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
