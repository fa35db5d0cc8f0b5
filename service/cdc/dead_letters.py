"""Capture dead letters: a CRM change that cannot become a valid event, kept instead of lost.

The producer never stops the slot for one change. A change whose value has no counterpart in
the event schema (NaN, infinity, a BC date), whose event does not fit its Avro schema or the
broker's size limit, or that lacks its old row becomes two records:

1. on the dead-letter topic, the letter itself: a UTF-8 JSON document with table, primary key,
   commit LSN, xid, event id, column, reason, and the row's column values as text (the raw
   values an operator needs to fix the CRM row; each capped at ``MAX_VALUE_CHARS``). Headers
   follow the consumer's conventions (``service/consumer/dlq.py``): Spring Kafka's
   ``kafka_dlt-*`` names plus ``crm_erp_sync-stage: capture``. It was never on a topic, so
   ``kafka_dlt-original-partition``/``-offset`` are ``-1`` and ``-original-topic`` is the
   topic the event was bound for.
2. on that topic, with the event's key (so on its partition, in commit order), a *marker*:
   ``MARKER`` followed by JSON naming the letter's place on the dead-letter topic, table,
   key, position and reason, without values. The consumer records it in
   ``sync.dead_letters`` (stage ``capture``) and holds the key behind it, exactly where the
   event would have been.

The values are in the letter's value only: never in a log line, a header or the marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service import __version__
from service.consumer import dlq
from service.errors import CaptureRejected

MARKER = b"crm-erp-sync/capture-dead-letter/v1\n"
MAX_VALUE_CHARS = 32 * 1024
TABLE = "crm_erp_sync-table"
COMMIT_LSN = "crm_erp_sync-commit-lsn"
XID = "crm_erp_sync-xid"
COLUMN = "crm_erp_sync-column"
EVENT_ID = "crm_erp_sync-event-id"

TextRow = dict[str, str | None]


def as_text(value: Any) -> str | None:
    """A column value as text: what pgoutput sent, or the converted value rendered back."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def text_row(row: dict[str, Any] | None) -> TextRow | None:
    return None if row is None else {k: as_text(v) for k, v in row.items()}


def _capped(row: TextRow | None) -> TextRow | None:
    if row is None:
        return None
    out: TextRow = {}
    for name, value in row.items():
        if value is not None and len(value) > MAX_VALUE_CHARS:
            value = (value[:MAX_VALUE_CHARS]
                     + f"... [cut: {len(value)} characters in the CRM row]")
        out[name] = value
    return out


@dataclass(frozen=True)
class CaptureLetter:
    """One change that could not become an event (see the module docstring)."""

    topic: str  # the topic its event was bound for
    key: bytes | None  # that event's key
    table: str
    op: str
    primary_key: TextRow
    commit_lsn: int
    xid: int
    commit_time: datetime
    event_id: str
    error: CaptureRejected
    before: TextRow | None
    after: TextRow | None
    # the event kind it would have been (customer, order, ...): the consumer records it so
    # that a later event of that kind and key can supersede the letter like any other
    kind: str = ""

    def _identity(self) -> dict[str, Any]:
        return {"table": self.table, "op": self.op, "primary_key": self.primary_key,
                "commit_lsn": f"{self.commit_lsn >> 32:X}/{self.commit_lsn & 0xFFFFFFFF:X}",
                "xid": self.xid, "event_id": self.event_id, "column": self.error.column,
                "error_class": type(self.error).__name__, "reason": self.error.detail,
                "kind": self.kind}

    def value(self) -> bytes:
        """The dead-letter record's value: identity and the row's values as text."""
        doc = {**self._identity(), "before": _capped(self.before), "after": _capped(self.after)}
        return json.dumps(doc, ensure_ascii=False).encode()

    def headers(self) -> list[tuple[str, bytes]]:
        err = self.error
        fields = {
            dlq.ORIGINAL_TOPIC: self.topic,
            dlq.ORIGINAL_PARTITION: "-1",
            dlq.ORIGINAL_OFFSET: "-1",
            dlq.ORIGINAL_TIMESTAMP: str(int(self.commit_time.timestamp() * 1000)),
            dlq.ORIGINAL_GROUP: "",
            dlq.EXCEPTION_FQCN: f"{type(err).__module__}.{type(err).__qualname__}",
            dlq.EXCEPTION_MESSAGE: err.reason,
            dlq.EXCEPTION_STACKTRACE: "",
            dlq.STAGE: err.stage,
            dlq.ATTEMPTS: "1",
            dlq.SERVICE_VERSION: __version__,
            TABLE: self.table,
            COMMIT_LSN: self._identity()["commit_lsn"],
            XID: str(self.xid),
            COLUMN: err.column or "",
            EVENT_ID: self.event_id,
        }
        return [(k, v.encode()) for k, v in fields.items()]

    def marker(self, dlq_partition: int, dlq_offset: int) -> bytes:
        """The marker on the event's own topic: where the letter is, and why; no values."""
        doc = {**self._identity(), "dlq_partition": dlq_partition, "dlq_offset": dlq_offset}
        return MARKER + json.dumps(doc, ensure_ascii=False).encode()


class CaptureDeadLetter(CaptureRejected):
    """A marker read back by the consumer: the letter is already on the dead-letter topic
    at (``dlq_partition``, ``dlq_offset``); the consumer records it and holds the key."""

    def __init__(self, reason: str, column: str | None, dlq_partition: int,
                 dlq_offset: int, error_class: str, table: str = "",
                 primary_key: str = "", event_id: str = "", kind: str = "") -> None:
        super().__init__(reason, column)
        self.dlq_partition = dlq_partition
        self.dlq_offset = dlq_offset
        self.error_class = error_class
        # the CRM row it is about (for `status` and `dlq list`): table, primary key as text
        self.table = table
        self.primary_key = primary_key
        # the event id the change would have had: stable when the producer re-sends it
        self.event_id = event_id
        # the event kind the change would have been; "" in markers written before it was
        # recorded (such a letter waits for the operator, as it always did)
        self.kind = kind


def is_marker(value: bytes | None) -> bool:
    return value is not None and value.startswith(MARKER)


def read_marker(value: bytes) -> CaptureDeadLetter:
    """The marker's letter; raises ValueError when the marker is malformed."""
    doc = json.loads(value[len(MARKER):])
    return CaptureDeadLetter(str(doc["reason"]), doc.get("column"), int(doc["dlq_partition"]),
                             int(doc["dlq_offset"]), str(doc.get("error_class", "")),
                             str(doc.get("table") or ""), key_text(doc.get("primary_key")),
                             str(doc.get("event_id") or ""), str(doc.get("kind") or ""))


def key_text(primary_key: Any) -> str:
    """A letter's primary key ({column: text}) as the project spells keys: one column its
    text, several a compact JSON array of their texts (DESIGN "Topics and keys")."""
    if not isinstance(primary_key, dict) or not primary_key:
        return ""
    values = [None if v is None else str(v) for v in primary_key.values()]
    if len(values) == 1:
        return values[0] or ""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))
