"""From committed CRM transactions to canonical event records (pure: no database, no broker).

A transaction's row changes become events in commit order, mapped by the source profile
(``service.cdc.profile``) from the CRM's columns to canonical fields (``schemas/*/v2.avsc``).
Customer and market-demand rows give one event per change. An order's header and its lines
changed in one transaction give one order event (the header's before/after and the changed
lines), so the consumer applies an order with its lines atomically. Every event gets a
deterministic id from its commit LSN and position, so a change re-sent after a crash is
recognisably the same event.

Lines are partitioned by their order's customer: from the header when it changed in the same
transaction, else through ``References`` (the producer's order -> customer map, fed by every
order event and snapshot read, falling back to a read of the CRM's order row).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal
from typing import Any

from service.cdc.profile import (
    CANONICAL_FIELDS,
    DATE,
    TEXT,
    TIMESTAMP,
    Const,
    EntityMapping,
    Reference,
    SourceProfile,
    text_of,
)
from service.errors import (
    PgOutputError,
    SourceContractError,
    UnrepresentableValue,
    UnresolvedReference,
)

Row = dict[str, Any]

CREATE, UPDATE, DELETE, READ = "CREATE", "UPDATE", "DELETE", "READ"
# A TRUNCATE of a captured table: a RowChange without rows, in its place in the transaction
# (the producer turns it into a truncate event, a stop or a skip: CRM_ERP_SYNC_ON_TRUNCATE).
TRUNCATE = "TRUNCATE"

# Kafka headers of the two events a primary-key change becomes (Debezium's
# __debezium.newkey / __debezium.oldkey): the delete of the old key names the new key, the
# create of the new key names the old one.
NEW_KEY_HEADER = "crm_erp_sync-newkey"
OLD_KEY_HEADER = "crm_erp_sync-oldkey"


@dataclass(frozen=True, slots=True)
class RowChange:
    table: str
    op: str  # CREATE, UPDATE, DELETE (READ for snapshot rows)
    before: Row | None
    after: Row | None


@dataclass(slots=True)
class CommittedTxn:
    """A committed CRM transaction, or a piece of one (``complete`` False): a big
    transaction is handed out in pieces of at most ``producer_max_changes`` changes as pgoutput
    sends it (it sends only committed transactions, so ``commit_lsn``/``commit_time`` are
    known from its Begin), and only its last piece has ``end_lsn`` (the slot may be confirmed
    past it once every piece reached the broker). ``first_change`` is the position of the
    piece's first change in the whole transaction."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    changes: list[RowChange] = field(default_factory=list)
    # position in ``changes`` -> why that change cannot become an event (its RowChange there
    # is a placeholder without rows); filled by the producer's decoder
    rejected: dict[int, Any] = field(default_factory=dict)
    first_change: int = 0
    complete: bool = True


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event ready to encode and send."""

    kind: str
    key: bytes
    event_id: str
    record: dict[str, Any]
    # extra Kafka headers (name, UTF-8 value): a primary-key change's old/new key
    headers: tuple[tuple[str, bytes], ...] = ()


# Text output of PostgreSQL types (pgoutput sends text) -> Python values. Anything else stays
# text (uuid, varchar, json …), which is what a canonical text field carries anyway.
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


def _naive_timestamp(zone: tzinfo) -> Callable[[str], datetime]:
    """``timestamp without time zone``: the CRM's wall-clock time, read in ``zone`` (the
    CRM session's own time zone, ``service.cdc.zone``). A time that a DST change skips or
    repeats takes the earlier offset (``fold=0``)."""
    def convert(text: str) -> datetime:
        if (err := _special(text, "timestamp")) is not None:
            raise err
        return datetime.fromisoformat(text).replace(tzinfo=zone).astimezone(UTC)
    return convert


def _date(text: str) -> date:
    if (err := _special(text, "date")) is not None:
        raise err
    return date.fromisoformat(text)


def _numeric(text: str) -> Decimal:
    value = Decimal(text)
    if not value.is_finite():
        raise UnrepresentableValue(f"numeric {text} is not a finite number: no event carries it")
    return value


_BY_TYPE_OID: dict[int, Callable[[str], Any]] = {
    16: lambda s: s in ("t", "true"),  # pgoutput sends t/f; a boolean cast to text is true
    20: int,
    21: int,
    23: int,
    1700: _numeric,
    1082: _date,
    1184: _timestamptz,
}


_NAIVE_IN_UTC = _naive_timestamp(UTC)


def converter_for(type_oid: int, naive_zone: tzinfo = UTC) -> Callable[[str], Any]:
    """The converter of a PostgreSQL type's text; ``naive_zone`` is the zone a
    ``timestamp without time zone`` (oid 1114) is read in."""
    if type_oid == 1114:
        return _NAIVE_IN_UTC if naive_zone is UTC else _naive_timestamp(naive_zone)
    return _BY_TYPE_OID.get(type_oid, str)


class References:
    """What lines need of orders and products they name by key: an order's customer key
    (the line's partition) and a product's canonical record.

    Fed in commit order by ``build_events`` (every order/product change and snapshot read);
    a miss asks ``loader`` (the producer reads the CRM's current row). Bounded: past
    ``capacity`` entries of one entity the oldest are forgotten (a miss is only a read, never
    a wrong value).

    An order is kept as its customer key alone, as that is all a lookup of an order reads:
    a producer following a CRM holds up to ``capacity`` of them, and whole canonical records
    made a producer's memory grow by ~35 MiB over the demo's 50,000 orders (issue #13). A
    lookup returns ``{"customer_key": ...}`` for an order, the whole record for a product.
    """

    def __init__(self, loader: Callable[[str, str], Row | None] | None = None,
                 capacity: int = 200_000) -> None:
        self._loader = loader
        self._capacity = capacity
        # entity -> key -> record (an order: its customer key), least recently fed first
        self._known: dict[str, OrderedDict[str, Any]] = {}

    def remember(self, entity: str, key: str, record: Row) -> None:
        known = self._known.get(entity)
        if known is None:
            known = self._known[entity] = OrderedDict()
        known[key] = record["customer_key"] if entity == "order" else record
        known.move_to_end(key)
        while len(known) > self._capacity:
            known.popitem(last=False)

    def lookup(self, entity: str, key: str) -> Row | None:
        known = self._known.get(entity)
        found = None if known is None else known.get(key)
        if found is None:
            record = None if self._loader is None else self._loader(entity, key)
            if record is None:
                return None
            self.remember(entity, key, record)
            found = record["customer_key"] if entity == "order" else record
        return {"customer_key": found} if entity == "order" else found


def _value(ent: EntityMapping, name: str, kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == DATE:
        if isinstance(value, datetime):
            return value.date()
        if isinstance(value, date):
            return value
    elif kind == TIMESTAMP:
        if isinstance(value, datetime):
            return value
        if isinstance(value, date):
            return datetime.combine(value, time(), UTC)
    else:
        return text_of(value)
    raise SourceContractError(ent.table, str(ent.fields[name]),
                              f"feeds canonical {ent.entity}.{name} ({kind}) but holds "
                              f"{type(value).__name__} values")


def canonical(ent: EntityMapping, row: Row, refs: References) -> Row:
    """The canonical record (schemas/<kind>/v2.avsc) of one CRM row.

    Raises SourceContractError when a mapped column is missing or holds an incompatible type,
    UnresolvedReference when a referenced row (a line's product) cannot be found.
    """
    try:
        record: Row = {"key": ent.key_text(row)}
        fields = ent.fields
        for name, kind in CANONICAL_FIELDS[ent.entity].items():
            source = fields.get(name)
            if type(source) is str:  # a column: most fields; text as it comes, no calls
                value = row[source]
                if value is None or (type(value) is str and kind == TEXT):
                    record[name] = value
                else:
                    record[name] = _value(ent, name, kind, value)
            elif source is None:
                record[name] = None
            elif isinstance(source, Const):
                record[name] = source.value
            elif isinstance(source, Reference):
                ref_key = row[source.column]
                if ref_key is None:
                    record[name] = None
                    continue
                target = refs.lookup(source.entity, text_of(ref_key))
                if target is None:
                    raise UnresolvedReference(ent.table, source.column, source.entity)
                record[name] = target.get(source.field)
            else:
                record[name] = _value(ent, name, kind, row[source])
        if ent.entity == "order" and ent.customer_column is not None:
            record["customer_key"] = _required_key(ent, ent.customer_column, row)
        if ent.order_column is not None:
            record["order_key"] = _required_key(ent, ent.order_column, row)
    except KeyError as exc:
        raise SourceContractError(ent.table, str(exc.args[0]),
                                  "column is missing from the captured row") from None
    return record


def _required_key(ent: EntityMapping, column: str, row: Row) -> str:
    value = row[column]
    if value is None:
        raise SourceContractError(ent.table, column, "reference key is NULL")
    return text_of(value)


def _source(txn_lsn: int, seq: int, xid: int, commit_time: datetime, table: str,
            snapshot: bool, profile: str) -> dict[str, Any]:
    return {"lsn": txn_lsn, "seq": seq, "txid": xid, "commit_time": commit_time,
            "table": table, "snapshot": snapshot, "profile": profile}


def event_id(lsn: int, seq: int, snapshot: bool, old_key: bool = False) -> str:
    """``<lsn hex>/<seq>`` (``snap/`` first for snapshot reads). The delete of the old key
    that a primary-key change becomes shares the change's position (a different ERP row)
    and is told apart by ``/oldkey``."""
    prefix = "snap/" if snapshot else ""
    return f"{prefix}{lsn:X}/{seq}{'/oldkey' if old_key else ''}"


def truncate_event(ent: EntityMapping, *, lsn: int, seq: int, xid: int,
                   commit_time: datetime, profile: str) -> Outgoing:
    """The truncate event (schemas/truncate/v1.avsc) of a TRUNCATE of ``ent``'s table.

    Keyed by ``truncate/<table>``: one event per truncated table, on one partition of the
    entity's topic (the consumer's watermark, not the partition, orders it against the
    entity's other events: docs/DESIGN.md "TRUNCATE")."""
    assert ent.kind is not None
    eid = event_id(lsn, seq, False)
    record = {"event_id": eid, "op": TRUNCATE, "entity": ent.entity,
              "source": _source(lsn, seq, xid, commit_time, ent.table, False, profile)}
    return Outgoing("truncate", f"truncate/{ent.table}".encode(), eid, record)


def split_key_change(ent: EntityMapping, change: RowChange) -> list[RowChange]:
    """An UPDATE whose primary key changed -> [DELETE of the old key, CREATE of the new key]
    (what Debezium does): the ERP row of the old key must not stay live. Anything else is
    returned as it is. Raises KeyError when a key column is missing from a row."""
    if (change.op != UPDATE or change.before is None or change.after is None
            or ent.key_text(change.before) == ent.key_text(change.after)):
        return [change]
    return [RowChange(change.table, DELETE, change.before, None),
            RowChange(change.table, CREATE, None, change.after)]


@dataclass(slots=True)
class _OrderGroup:
    seq: int
    order_key: str
    customer_key: str
    table: str
    header_ops: list[str] = field(default_factory=list)
    before: Row | None = None
    after: Row | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    # the header's primary key changed: the other key (headers), and whether this group is
    # the old key's (its delete)
    other_key: str | None = None
    old_key: bool = False


def _key_headers(other_key: str | None, is_old: bool) -> tuple[tuple[str, bytes], ...]:
    if other_key is None:
        return ()
    return ((NEW_KEY_HEADER if is_old else OLD_KEY_HEADER, other_key.encode()),)


def _order_op(ops: list[str]) -> str:
    if not ops:
        return UPDATE  # only lines changed
    if ops[-1] == DELETE:
        return DELETE
    if ops[0] in (CREATE, READ):
        return ops[0]
    return UPDATE


def _effective(ent: EntityMapping, change: RowChange) -> RowChange:
    """Apply the profile's soft-delete flag: a row that now counts as deleted is a DELETE."""
    flag = ent.deleted_when
    if flag is None or change.after is None:
        return change
    if flag.column not in change.after:
        raise SourceContractError(ent.table, flag.column,
                                  "the delete flag column is missing from the captured row")
    if not flag.matches(change.after):
        return change
    before = change.before if change.before is not None else change.after
    return RowChange(change.table, DELETE, before, None)


def build_events(
    changes: Iterable[RowChange], *, profile: SourceProfile, refs: References, lsn: int,
    xid: int, commit_time: datetime, snapshot: bool = False, first_seq: int = 0,
) -> list[Outgoing]:
    """Events for the changes of one transaction (or one snapshot chunk), in commit order.

    ``changes`` are of the profile's tables only. Raises SourceContractError /
    UnresolvedReference (see ``canonical``) and PgOutputError for a change without a row.
    """
    listed = [(seq, c) for seq, c in enumerate(changes, start=first_seq)]
    # Orders and products first: a line may precede its header (or product) in the log.
    txn_orders: dict[str, str] = {}
    for _seq, change in listed:
        ent = profile.table(change.table)
        row = change.after if change.after is not None else change.before
        if ent is None or row is None:
            continue
        if ent.entity == "product":
            # A deleted product is remembered too: a line deleted with it still names it.
            refs.remember("product", ent.key_text(row), canonical(ent, row, refs))
        elif ent.entity == "order":
            # the old row too when the key changed: the old key's delete is partitioned by it
            for version in (change.before, row) if change.before is not None \
                    and ent.key_text(change.before) != ent.key_text(row) else (row,):
                record = canonical(ent, version, refs)
                txn_orders[record["key"]] = record["customer_key"]
                if profile.lines_need_orders:
                    refs.remember("order", record["key"], record)
    out: list[tuple[int, Outgoing]] = []
    orders: dict[str, _OrderGroup] = {}
    expanded: list[tuple[int, RowChange, str | None]] = []
    for seq, raw in listed:
        ent = profile.table(raw.table)
        if ent is None or ent.entity == "product":
            continue
        try:
            halves = split_key_change(ent, raw)
        except KeyError as exc:
            raise SourceContractError(ent.table, str(exc.args[0]),
                                      "column is missing from the captured row") from None
        if len(halves) == 1:
            expanded.append((seq, raw, None))
        else:  # a primary-key change: the old key's delete, then the new key's create
            old, new = halves
            assert old.before is not None and new.after is not None
            expanded.append((seq, old, ent.key_text(new.after)))
            expanded.append((seq, new, ent.key_text(old.before)))
    for seq, raw, other_key in expanded:
        ent = profile.table(raw.table)
        assert ent is not None
        change = _effective(ent, raw)
        row = change.after if change.after is not None else change.before
        if row is None:
            raise PgOutputError(f"{change.table}: {change.op} without row data")
        before = canonical(ent, change.before, refs) if change.before is not None else None
        after = canonical(ent, change.after, refs) if change.after is not None else None
        current = after if after is not None else before
        assert current is not None
        if ent.entity in ("order", "order_line"):
            order_key = current["key"] if ent.entity == "order" else current["order_key"]
            group = orders.get(order_key)
            if group is None:
                customer = txn_orders.get(order_key)
                if customer is None and ent.entity == "order_line" \
                        and ent.customer_column is not None:
                    customer = _required_key(ent, ent.customer_column, row)
                if customer is None:
                    known = refs.lookup("order", order_key)
                    if known is None:
                        raise UnresolvedReference(ent.table, ent.order_column or "", "order")
                    customer = str(known["customer_key"])
                group = orders[order_key] = _OrderGroup(seq, order_key, customer, ent.table)
            if ent.entity == "order":
                if not group.header_ops:
                    group.before = before
                group.header_ops.append(change.op)
                group.after = after
                group.table = ent.table
                if other_key is not None:
                    group.other_key, group.old_key = other_key, raw.op == DELETE
            else:
                group.lines.append({"op": change.op, "before": before, "after": after})
            continue
        assert ent.kind is not None
        is_old = other_key is not None and raw.op == DELETE
        eid = event_id(lsn, seq, snapshot, old_key=is_old)
        event: dict[str, Any] = {
            "event_id": eid,
            "op": change.op,
            "source": _source(lsn, seq, xid, commit_time, change.table, snapshot, profile.name),
            "key": current["key"],
            "before": before,
            "after": after,
        }
        out.append((seq, Outgoing(ent.kind, current["key"].encode(), eid, event,
                                  _key_headers(other_key, is_old))))
    for group in orders.values():
        eid = event_id(lsn, group.seq, snapshot, old_key=group.old_key)
        order_record: dict[str, Any] = {
            "event_id": eid,
            "op": _order_op(group.header_ops) if group.header_ops or not snapshot else READ,
            "source": _source(lsn, group.seq, xid, commit_time, group.table, snapshot,
                              profile.name),
            "key": group.order_key,
            "customer_key": group.customer_key,
            "before": group.before,
            "after": group.after,
            "lines": group.lines,
        }
        out.append((group.seq, Outgoing("order", group.customer_key.encode(), eid,
                                        order_record,
                                        _key_headers(group.other_key, group.old_key))))
    out.sort(key=lambda pair: pair[0])
    return [o for _, o in out]
