"""`crm-erp-sync trace KEY`: one key through the system.

The CRM row(s) with that key (every entity of the source profile whose key can read it), its
events on Kafka (topic, partition, offset, kind, op, position), the ERP's records and their
positions (read through the ERP target, ``ErpTarget.key_records``: the ``erp.*`` rows, or
Tryton's party, sales and sale line with their positions in ``tryton_positions``), the
events held for it and its dead letters with what was done to them.

An order line has no events of its own: its changes travel in its order's events. A key that
reads an order line row is followed to its order (the profile's ``[order_line] order``
column): the order's CRM row, events, ERP row, and the events held and dead letters at those
events' positions are shown too (``follows`` names the order keys followed).

Keys are text as everywhere (``42``, a UUID, a composite key as a JSON array). An event
belongs to the key when its message key, its ``key`` or its ``customer_key`` is the key (an
order's events are keyed by their customer on Kafka). Finding them reads the topics from
their beginning and decodes every event: seconds per million events; ``--topic`` limits it.
The output holds personal data (the CRM row, the events): it is for the operator's screen,
never logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import TopicPartition

from service.avro import SchemaRegistry
from service.cdc.dead_letters import is_marker, read_marker
from service.erp.target import make_target
from service.errors import BrokerUnreachable, Permanent, StackUnavailable
from service.operator.common import broker_consumer, connect
from service.settings import Settings


@dataclass
class Trace:
    key: str
    crm: list[dict[str, Any]] = field(default_factory=list)  # {entity, table, row}
    events: list[dict[str, Any]] = field(default_factory=list)
    # What the ERP target holds for the key (ErpTarget.key_records): {table, as, row}
    erp: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    scanned: int = 0  # Kafka records decoded
    follows: list[str] = field(default_factory=list)  # order keys an order line led to
    # Why the topics could not be read (None: they were): the events are then unknown, and
    # the held events and dead letters are found by message key only.
    broker_unreachable: str | None = None


def crm_rows(settings: Settings, key: str, *, entities: tuple[str, ...] | None = None
             ) -> list[dict[str, Any]]:
    """The CRM rows whose key is ``key``, through the source profile (columns it maps):
    {entity, table, row}, and for an order line's row ``order_key``, its order's key as text
    (the profile's ``[order_line] order`` column). ``entities``: only these (None: all)."""
    from service.cdc.capture import chunk_query, read_table_info
    from service.cdc.profile import key_values, load_profile, text_of

    profile = load_profile(settings.source_profile)
    out: list[dict[str, Any]] = []
    with connect(settings, "crm") as conn:
        info = read_table_info(conn, profile)
        for ent in profile.entities.values():
            if ent.table not in info or (entities is not None and ent.entity not in entities):
                continue
            try:
                key_values(ent, key)
                query, params = chunk_query(info[ent.table], after=None, keys=[key], limit=1)
                rows = conn.execute(query, params).fetchall()
            except (ValueError, psycopg.errors.DataError):
                continue  # not a key of this table's type (a UUID is not an integer)
            for r in rows:
                row = dict(zip(ent.columns, r, strict=False))
                found = {"entity": ent.entity, "table": ent.table, "row": row}
                if ent.order_column and row.get(ent.order_column) is not None:
                    found["order_key"] = text_of(row[ent.order_column])
                out.append(found)
    return out


def _marker_row(topic: str, partition: int, offset: int, value: bytes) -> dict[str, Any]:
    """A capture dead letter's marker (service/cdc/dead_letters.py) where the event would
    have been: named as such, with the letter's reason, not as an undecodable record."""
    try:
        letter = read_marker(value)
        what = f"capture dead letter ({letter.error_class or 'capture'}): {letter}"
    except (ValueError, KeyError, TypeError):
        what = "capture dead letter (marker unreadable)"
    return {"topic": topic, "partition": partition, "offset": offset, "kind": "capture",
            "op": "-", "error": what}


def kafka_events(settings: Settings, key: str, topics: list[str], *,
                 orders: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], int]:
    """Every event of the key on these topics, and every order event whose ``key`` is one of
    ``orders`` (an order line's order), in (topic, partition, offset) order; and how many
    records were decoded."""
    registry = SchemaRegistry.load(settings.schemas_dir)
    raw = key.encode()
    consumer = broker_consumer(settings, "events on Kafka unknown", group_id=None,
                               enable_auto_commit=False)
    out: list[dict[str, Any]] = []
    scanned = 0
    try:
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not tps:
            return [], 0
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + 600
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise StackUnavailable("trace: could not read the topics to their end in 600s")
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                for r in records:
                    scanned += 1
                    if is_marker(r.value):
                        if r.key == raw:
                            out.append(_marker_row(r.topic, r.partition, r.offset, r.value))
                        continue
                    try:
                        kind, ev = registry.decode(r.value) if r.value else ("?", {})
                    except Permanent as exc:
                        if r.key == raw:
                            out.append({"topic": r.topic, "partition": r.partition,
                                        "offset": r.offset, "kind": "?", "op": "?",
                                        "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    if (r.key != raw and ev.get("key") != key
                            and ev.get("customer_key") != key
                            and not (kind == "order" and ev.get("key") in orders)):
                        continue
                    src = ev.get("source") or {}
                    out.append({"topic": r.topic, "partition": r.partition,
                                "offset": r.offset, "kind": kind, "op": ev.get("op"),
                                "event_key": ev.get("key"), "lsn": src.get("lsn"),
                                "seq": src.get("seq"), "commit_time": src.get("commit_time"),
                                "snapshot": src.get("snapshot"),
                                "event_id": ev.get("event_id")})
    finally:
        consumer.close()
    out.sort(key=lambda e: (e["topic"], e["partition"], e["offset"]))
    return out, scanned


def trace(settings: Settings, key: str, *, topics: list[str] | None = None) -> Trace:
    """Raises StackUnavailable when a database cannot be reached. A broker that does not
    answer within ``BROKER_CHECK_S`` is not an error here: ``broker_unreachable`` says so and
    everything the databases hold about the key is still collected."""
    t = Trace(key)
    t.crm = crm_rows(settings, key)
    t.follows = sorted({c["order_key"] for c in t.crm
                        if "order_key" in c and c["order_key"] != key})
    for order in t.follows:  # an order line: its order's row too
        t.crm += crm_rows(settings, order, entities=("order",))
    try:
        t.events, t.scanned = kafka_events(settings, key, topics or [settings.sales_topic,
                                                                     settings.market_topic],
                                           orders=tuple(t.follows))
    except BrokerUnreachable as exc:
        t.broker_unreachable = str(exc)
    at = [(e["topic"], e["partition"], e["offset"]) for e in t.events]
    target = make_target(settings, None)
    try:
        with connect(settings, "erp") as erp:
            t.erp = target.key_records(erp, key, t.follows)
    finally:
        target.close()
    with connect(settings, "erp") as erp:
        where = ('(msg_key = %s OR (topic, partition, "offset") IN (SELECT * FROM unnest('
                 '%s::text[], %s::int[], %s::bigint[])))')
        params = (key.encode(), [a[0] for a in at], [a[1] for a in at], [a[2] for a in at])
        t.held = [dict(zip(("held_id", "topic", "partition", "offset", "reason", "waits_for",
                            "held_at"), r, strict=True)) for r in erp.execute(
            'SELECT held_id, topic, partition, "offset", reason, waits_for, held_at FROM '
            f"sync.held_events WHERE {where} OR waits_for = %s ORDER BY held_id",
            (*params, key)).fetchall()]
        # A capture letter of an order (or its line) is on its customer's Kafka key at an
        # offset of its own: found by the CRM row it names (source_key), as the key itself
        # and an order line's order are.
        for r in erp.execute(
                'SELECT dead_letter_id, topic, partition, "offset", state, error_class, '
                f"error_message, created_at, resolved_at FROM sync.dead_letters WHERE {where} "
                "OR (stage = 'capture' AND source_key = ANY(%s)) ORDER BY dead_letter_id",
                (*params, [key, *t.follows])).fetchall():
            letter = dict(zip(("dead_letter_id", "topic", "partition", "offset", "state",
                               "error_class", "reason", "created_at", "resolved_at"), r,
                              strict=True))
            letter["actions"] = [dict(zip(("at", "action", "actor", "outcome", "reason"), a,
                                          strict=True)) for a in erp.execute(
                "SELECT at, action, actor, outcome, reason FROM sync.dead_letter_actions "
                "WHERE dead_letter_id = %s ORDER BY action_id", (r[0],)).fetchall()]
            t.dead_letters.append(letter)
    return t
