"""From committed CRM transactions to event records (pure: no database, no broker).

A transaction's row changes become events in commit order. Customer and market-demand rows
give one event per change. An order's header and its lines changed in one transaction give
one ``OrderEvent`` (the header's before/after and the changed lines), so the consumer applies
an order with its lines atomically. Every event gets a deterministic id from its commit LSN
and position, so a change re-sent after a crash is recognisably the same event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from service.cdc.capture import CAPTURED
from service.errors import PgOutputError, UnrepresentableValue

Row = dict[str, Any]

CREATE, UPDATE, DELETE, READ = "CREATE", "UPDATE", "DELETE", "READ"


@dataclass(frozen=True, slots=True)
class RowChange:
    table: str
    op: str  # CREATE, UPDATE, DELETE (READ for snapshot rows)
    before: Row | None
    after: Row | None


@dataclass(slots=True)
class CommittedTxn:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    changes: list[RowChange] = field(default_factory=list)
    # position in ``changes`` -> why that change cannot become an event (its RowChange there
    # is a placeholder without rows); filled by the producer's decoder
    rejected: dict[int, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event ready to encode and send."""

    kind: str
    key: bytes
    event_id: str
    record: dict[str, Any]


# Text output of PostgreSQL types (pgoutput sends text) -> Python values Avro expects.
# PostgreSQL's special values have no counterpart in Python's date/datetime or in an Avro
# decimal: they raise UnrepresentableValue (a capture dead letter), never a guess
# (docs/DESIGN.md, "Special values").
def _special(text: str, kind: str) -> UnrepresentableValue | None:
    if text in ("infinity", "-infinity"):
        return UnrepresentableValue(f"{text} {kind} has no counterpart in the event schema")
    if text.endswith(" BC"):
        return UnrepresentableValue(f"BC {kind} is outside the event schema's range (year 1+)")
    if len(text) > 4 and text[4:5] != "-" and text[:5].isdigit():
        return UnrepresentableValue(f"{kind} past year 9999 is outside the event schema's range")
    return None


def _timestamptz(text: str) -> datetime:
    if (err := _special(text, "timestamp")) is not None:
        raise err
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _date(text: str) -> date:
    if (err := _special(text, "date")) is not None:
        raise err
    return date.fromisoformat(text)


def _numeric(text: str) -> Decimal:
    value = Decimal(text)
    if not value.is_finite():
        raise UnrepresentableValue(f"numeric {text} has no counterpart in an Avro decimal")
    return value


_BY_TYPE_OID: dict[int, Callable[[str], Any]] = {
    16: lambda s: s == "t",
    20: int,
    21: int,
    23: int,
    1700: _numeric,
    1082: _date,
    1114: _timestamptz,
    1184: _timestamptz,
}


def converter_for(type_oid: int) -> Callable[[str], Any]:
    return _BY_TYPE_OID.get(type_oid, str)


def row_key(table: str, row: Row) -> tuple[Any, ...]:
    return tuple(row[c] for c in CAPTURED[table].key)


def _source(txn_lsn: int, seq: int, xid: int, commit_time: datetime, table: str,
            snapshot: bool) -> dict[str, Any]:
    return {"lsn": txn_lsn, "seq": seq, "txid": xid, "commit_time": commit_time,
            "table": table, "snapshot": snapshot}


def event_id(lsn: int, seq: int, snapshot: bool) -> str:
    prefix = "snap/" if snapshot else ""
    return f"{prefix}{lsn:X}/{seq}"


@dataclass(slots=True)
class _OrderGroup:
    seq: int
    order_id: int
    customer_id: int
    header_ops: list[str] = field(default_factory=list)
    before: Row | None = None
    after: Row | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)


def _order_op(ops: list[str]) -> str:
    if not ops:
        return UPDATE  # only lines changed
    if ops[-1] == DELETE:
        return DELETE
    if ops[0] in (CREATE, READ):
        return ops[0]
    return UPDATE


def build_events(
    changes: Iterable[RowChange], *, lsn: int, xid: int, commit_time: datetime,
    snapshot: bool = False, first_seq: int = 0,
) -> list[Outgoing]:
    """Events for the changes of one transaction (or one snapshot chunk), in commit order."""
    out: list[tuple[int, Outgoing]] = []
    orders: dict[int, _OrderGroup] = {}
    for seq, change in enumerate(changes, start=first_seq):
        row = change.after if change.after is not None else change.before
        if row is None:
            raise PgOutputError(f"{change.table}: {change.op} without row data")
        kind = CAPTURED[change.table].kind
        if kind == "order":
            order_id = row["order_id"]
            group = orders.get(order_id)
            if group is None:
                group = orders[order_id] = _OrderGroup(seq, order_id, row["customer_id"])
            if change.table == "crm.sales_orders":
                if not group.header_ops:
                    group.before = change.before
                group.header_ops.append(change.op)
                group.after = change.after
            else:
                group.lines.append({"op": change.op, "before": change.before,
                                    "after": change.after})
            continue
        key_value = row["customer_id"] if kind == "customer" else row["demand_id"]
        eid = event_id(lsn, seq, snapshot)
        record: dict[str, Any] = {
            "event_id": eid,
            "op": change.op,
            "source": _source(lsn, seq, xid, commit_time, change.table, snapshot),
            "before": change.before,
            "after": change.after,
        }
        out.append((seq, Outgoing(kind, str(key_value).encode(), eid, record)))
    for group in orders.values():
        eid = event_id(lsn, group.seq, snapshot)
        order_record: dict[str, Any] = {
            "event_id": eid,
            "op": _order_op(group.header_ops) if group.header_ops or not snapshot else READ,
            "source": _source(lsn, group.seq, xid, commit_time,
                              "crm.sales_orders" if group.header_ops else "crm.order_lines",
                              snapshot),
            "order_id": group.order_id,
            "customer_id": group.customer_id,
            "before": group.before,
            "after": group.after,
            "lines": group.lines,
        }
        out.append((group.seq, Outgoing("order", str(group.customer_id).encode(), eid,
                                        order_record)))
    out.sort(key=lambda pair: pair[0])
    return [o for _, o in out]
