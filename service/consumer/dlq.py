"""Dead letters: the original key and value bytes, unchanged, with headers that say why.

Header names follow Spring Kafka's dead-letter topics (``kafka_dlt-*``) where they fit, plus
our own (``crm_erp_sync-*``). Values are UTF-8 text (Spring writes partition and offset as
big-endian integers; text is what operators can read with any tool).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from service import __version__
from service.errors import Permanent

ORIGINAL_TOPIC = "kafka_dlt-original-topic"
ORIGINAL_PARTITION = "kafka_dlt-original-partition"
ORIGINAL_OFFSET = "kafka_dlt-original-offset"
ORIGINAL_TIMESTAMP = "kafka_dlt-original-timestamp"
ORIGINAL_GROUP = "kafka_dlt-original-consumer-group"
EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
EXCEPTION_STACKTRACE = "kafka_dlt-exception-stacktrace"
STAGE = "crm_erp_sync-stage"
ATTEMPTS = "crm_erp_sync-attempts"
SERVICE_VERSION = "crm_erp_sync-service-version"


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    error: Permanent
    attempts: int = 1
    # the producer's event id when known (stable across the producer's re-sends)
    event_id: str | None = None

    def headers(self, group: str) -> list[tuple[str, bytes]]:
        err = self.error
        trace = "".join(traceback.format_exception(err)) if err.__traceback__ else ""
        fields = {
            ORIGINAL_TOPIC: self.topic,
            ORIGINAL_PARTITION: str(self.partition),
            ORIGINAL_OFFSET: str(self.offset),
            ORIGINAL_TIMESTAMP: str(self.timestamp),
            ORIGINAL_GROUP: group,
            EXCEPTION_FQCN: f"{type(err).__module__}.{type(err).__qualname__}",
            EXCEPTION_MESSAGE: err.reason,
            EXCEPTION_STACKTRACE: trace[-8000:],
            STAGE: err.stage,
            ATTEMPTS: str(self.attempts),
            SERVICE_VERSION: __version__,
        }
        return [(k, v.encode()) for k, v in fields.items()]


def decode_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers or []}


def publish(producer: Any, dlq_topic: str, group: str, letters: list[DeadLetter]) -> list[Any]:
    """Send dead letters and wait until the broker has them (before any offset commit)."""
    futures = [
        producer.send(dlq_topic, key=d.key, value=d.value, headers=d.headers(group))
        for d in letters
    ]
    producer.flush()
    return [f.get(timeout=30) for f in futures]
