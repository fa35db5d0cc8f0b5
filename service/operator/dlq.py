"""Dead letters for operators: list, show, redrive, discard.

State lives in ``sync.dead_letters`` (open -> redriven | discarded | failed_again; a letter
that failed again can be redriven again); the original bytes live in the dead-letter topic
at (dlq_partition, dlq_offset). Every redrive and discard is audited in
``sync.dead_letter_actions`` (who, when, why, outcome).

Redrive re-processes the original bytes through the consumer's own stages (decode ->
transform -> apply, ``ErpApplier.redrive_message``) with the mappings file as it is NOW, so
a letter that failed on an unknown product succeeds once the product is added. Per key, the
letters go in their original (partition, offset) order, and a letter is never applied while
an earlier one of its key is unresolved; once a key has no unresolved letter, the events
held behind it ('key_blocked') are applied, in order, in the same transaction.
"""

from __future__ import annotations

import difflib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from kafka import TopicPartition

from service.avro import SchemaRegistry
from service.cdc.capture import missing_keys, request_snapshot
from service.consumer import dlq as dlq_headers
from service.consumer.mappings_watch import STALE_AFTER_S, live_members, mappings_version
from service.consumer.pipeline import STILL_BLOCKED, Envelope, ErpApplier, Message, prepare
from service.erp.mappings import Mappings
from service.errors import (
    ApplyError,
    CaptureRejected,
    ConfigError,
    DecodeError,
    MappingError,
    Permanent,
    SyncError,
)
from service.kafka_io import make_consumer
from service.operator.common import PgConn, connect
from service.settings import Settings

UNRESOLVED = ("open", "failed_again")
STATES = ("open", "redriven", "discarded", "failed_again", "superseded")

_COLUMNS = ('dead_letter_id, topic, partition, "offset", msg_key, stage, error_class, '
            "error_message, state, dlq_partition, dlq_offset, created_at, resolved_at, "
            "last_error, redrive_attempts")


@dataclass(frozen=True)
class Letter:
    dead_letter_id: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    stage: str
    error_class: str
    error_message: str
    state: str
    dlq_partition: int | None
    dlq_offset: int | None
    created_at: datetime
    resolved_at: datetime | None
    last_error: str | None
    redrive_attempts: int

    @property
    def key_text(self) -> str:
        return self.key.decode("utf-8", "replace") if self.key is not None else "-"


@dataclass
class Outcome:
    dead_letter_id: int
    key: str
    outcome: str  # redriven | held | failed_again | discarded | refused | skipped | would_*
    detail: str = ""
    released: int = 0


@dataclass
class ActionReport:
    action: str
    dry_run: bool
    outcomes: list[Outcome] = field(default_factory=list)
    mappings_version: str | None = None
    """redrive: the version of the mappings file it maps with (12 hex digits, as the
    consumers report theirs: ``mappings_watch.mappings_version``)"""
    consumer_versions: list[str] = field(default_factory=list)
    """redrive: the versions the group's running consumers report (``sync.consumers``)"""
    warnings: list[str] = field(default_factory=list)
    """redrive: what the operator must know (a version no consumer runs, with --force)"""

    @property
    def ok(self) -> bool:
        return all(o.outcome in ("redriven", "held", "discarded", "would_redrive",
                                 "would_discard")
                   for o in self.outcomes)


def _letter(row: Any) -> Letter:
    values = list(row)
    values[4] = bytes(values[4]) if values[4] is not None else None
    return Letter(*values)


def list_letters(settings: Settings, *, since: datetime | None = None,
                 error_type: str | None = None, topic: str | None = None,
                 key: str | None = None, states: list[str] | None = None,
                 field: str | None = None) -> list[Letter]:
    """Dead letters, oldest first; ``states`` None means the unresolved ones; ``field``
    keeps the mapping failures of that CRM field."""
    states = list(UNRESOLVED) if states is None else states
    bad = sorted(set(states) - set(STATES))
    if bad:
        raise ConfigError("--state", f"unknown state {', '.join(bad)}: choose from "
                                     f"{', '.join(STATES)} or all")
    where, params = ["state = ANY(%s)"], [states]
    if since is not None:
        where.append("created_at >= %s")
        params.append(since)  # type: ignore[arg-type]
    if error_type:
        where.append("(error_class = %s OR stage = %s)")
        params += [error_type, error_type]  # type: ignore[list-item]
    if topic:
        where.append("topic = %s")
        params.append(topic)  # type: ignore[arg-type]
    if key is not None:
        where.append("msg_key = %s")
        params.append(key.encode())  # type: ignore[arg-type]
    if field:
        where.append(_FIELD_CLAUSE)
        params.append(field + ": ")  # type: ignore[arg-type]
    with connect(settings, "erp") as conn:
        if error_type:
            check_filter("--error-type", error_type, known_error_types(conn))
        if field:
            check_filter("--field", field, known_fields(conn, settings))
        if topic:
            check_filter("--topic", topic, known_topics(conn, settings))
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM sync.dead_letters WHERE {' AND '.join(where)} "
            "ORDER BY created_at, dead_letter_id", params).fetchall()
    return [_letter(r) for r in rows]


def _permanent_classes(cls: type[Permanent] = Permanent) -> set[str]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub.__name__} | _permanent_classes(sub)
    return out


def known_error_types(conn: PgConn) -> list[str]:
    """Every error class and stage a dead letter can have, and those recorded."""
    recorded = conn.execute("SELECT error_class FROM sync.dead_letters UNION "
                            "SELECT stage FROM sync.dead_letters").fetchall()
    stages = {c.stage for c in (DecodeError, MappingError, ApplyError, CaptureRejected)}
    return sorted(_permanent_classes() | stages | {r[0] for r in recorded})


# Fields a MappingError names that are not a profile's canonical field (service.erp.*).
_OTHER_MAPPING_FIELDS = {"entity", "kind", "full_name", "observed_at", "order_date"}


def known_fields(conn: PgConn, settings: Settings) -> list[str]:
    """Every field a mapping failure can name: the source profile's canonical fields (an
    order line's as ``lines.<field>``), the transforms' own, and those recorded. Raises
    ConfigError when the source profile is broken."""
    from service.cdc.profile import load_profile

    fields = set(_OTHER_MAPPING_FIELDS)
    for entity in load_profile(settings.source_profile).entities.values():
        if entity.order_column is not None:
            # An order line: its letters name the field inside its order, always as
            # lines.<field>; the bare name would be accepted and match nothing.
            fields |= {f"lines.{f}" for f in entity.fields}
        else:
            fields |= set(entity.fields)
    recorded = conn.execute("SELECT DISTINCT split_part(error_message, ': ', 1) "
                            "FROM sync.dead_letters WHERE error_class = 'MappingError'"
                            ).fetchall()
    return sorted(fields | {r[0] for r in recorded})


def known_topics(conn: PgConn, settings: Settings) -> list[str]:
    recorded = conn.execute("SELECT DISTINCT topic FROM sync.dead_letters").fetchall()
    return sorted({settings.sales_topic, settings.market_topic} | {r[0] for r in recorded})


def check_filter(option: str, value: str, known: list[str]) -> None:
    """A filter value that matches nothing we know is a typo, not an empty result: refused
    with the known values and the closest one. Raises ConfigError."""
    if value in known:
        return
    close = difflib.get_close_matches(value, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(option, f"unknown value {value!r}{hint}; known: {', '.join(known)}")


def get_letters(conn: PgConn, ids: list[int]) -> dict[int, Letter]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM sync.dead_letters "
                        "WHERE dead_letter_id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: _letter(r) for r in rows}


def actions_of(conn: PgConn, letter_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        # to_jsonb: NULL, not an error, on an ERP set up before the column existed
        "SELECT action, actor, reason, outcome, detail, at, "
        "to_jsonb(a) ->> 'mappings_version' FROM sync.dead_letter_actions a "
        "WHERE dead_letter_id = %s ORDER BY action_id", (letter_id,)).fetchall()
    return [dict(zip(("action", "actor", "reason", "outcome", "detail", "at", "mappings"), r,
                     strict=True)) for r in rows]


def fetch_records(settings: Settings, topic: str, wanted: set[tuple[int, int]],
                  timeout_s: float = 30.0) -> dict[tuple[int, int], Any]:
    """Records of a topic at the given (partition, offset) pairs; missing ones are absent."""
    if not wanted:
        return {}
    by_partition: dict[int, list[int]] = defaultdict(list)
    for p, o in wanted:
        by_partition[p].append(o)
    consumer = make_consumer(settings, group_id=None, isolation_level="read_uncommitted")
    found: dict[tuple[int, int], Any] = {}
    try:
        tps = [TopicPartition(topic, p) for p in sorted(by_partition)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        pending = set()
        for tp in tps:
            consumer.seek(tp, min(by_partition[tp.partition]))
            top = max(by_partition[tp.partition])
            if top < ends[tp]:
                pending.add(tp)
        last = {tp: max(by_partition[tp.partition]) for tp in tps}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
                for r in records:
                    if (r.partition, r.offset) in wanted:
                        found[(r.partition, r.offset)] = r
                if records and records[-1].offset >= last[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
    finally:
        consumer.close()
    return found


def _original_bytes(settings: Settings, letters: list[Letter]) -> dict[int, Any]:
    """The dead-lettered records (key, value, timestamp, headers) by letter id: from the DLQ
    topic, or from the original topic when the DLQ no longer has them."""
    dlq = fetch_records(settings, settings.dlq_topic,
                        {(d.dlq_partition, d.dlq_offset) for d in letters
                         if d.dlq_partition is not None and d.dlq_offset is not None})
    out: dict[int, Any] = {}
    missing: dict[str, list[Letter]] = defaultdict(list)
    for d in letters:
        rec = dlq.get((d.dlq_partition, d.dlq_offset))  # type: ignore[arg-type]
        if rec is not None:
            out[d.dead_letter_id] = rec
        else:
            missing[d.topic].append(d)
    for topic, group in missing.items():
        originals = fetch_records(settings, topic, {(d.partition, d.offset) for d in group})
        for d in group:
            if (d.partition, d.offset) in originals:
                out[d.dead_letter_id] = originals[(d.partition, d.offset)]
    return out


def show(settings: Settings, letter_id: int) -> dict[str, Any]:
    """Everything about one letter: state, error, all headers, the payload as JSON, audit."""
    with connect(settings, "erp") as conn:
        letters = get_letters(conn, [letter_id])
        if letter_id not in letters:
            raise ConfigError("ID", f"no dead letter {letter_id} (see `crm-erp-sync dlq list "
                                    "--state all`)")
        letter = letters[letter_id]
        actions = actions_of(conn, letter_id)
    record = _original_bytes(settings, [letter]).get(letter_id)
    out: dict[str, Any] = {"letter": letter, "actions": actions, "headers": {},
                           "payload": None, "payload_error": None}
    if record is None:
        out["payload_error"] = "the record is no longer in the dead-letter or original topic"
        return out
    out["headers"] = dlq_headers.decode_headers(record.headers)
    if record.value is None:
        out["payload_error"] = "the record has no value"
        return out
    if out["headers"].get(dlq_headers.STAGE) == "capture":
        # a capture dead letter is JSON (the change never became an Avro event), its values
        # as text: shown to the operator who asked, never logged
        try:
            out["kind"], out["payload"] = "capture_dead_letter", json.loads(record.value)
        except ValueError as exc:
            out["payload_error"] = f"capture dead letter is not JSON: {type(exc).__name__}"
        return out
    registry = SchemaRegistry.load(settings.schemas_dir)
    try:
        kind, payload = registry.decode(record.value)
        out["kind"], out["payload"] = kind, payload
    except SyncError as exc:
        out["payload_error"] = f"{type(exc).__name__}: {exc}"
        out["payload_raw"] = record.value
    return out


# A MappingError's message is "<field>: <reason>" (service.errors.MappingError).
_FIELD_CLAUSE = "(error_class = 'MappingError' AND starts_with(error_message, %s))"


def select_letters(settings: Settings, ids: list[int] | None, error_type: str | None,
                   all_open: bool, *, field: str | None = None, key: str | None = None
                   ) -> tuple[list[Letter], list[Outcome]]:
    """The letters an action targets, and refusals for ids that do not exist."""
    with connect(settings, "erp") as conn:
        if ids:
            found = get_letters(conn, ids)
            missing = [str(i) for i in ids if i not in found]
            if missing:  # the same condition, and exit code, as `dlq show` of a missing ID
                raise ConfigError("ID", f"no dead letter {', '.join(missing)} (see "
                                        "`crm-erp-sync dlq list --state all`)")
            return [found[i] for i in ids], []
        where, params = "state = ANY(%s)", [list(UNRESOLVED)]
        if error_type and not all_open:
            check_filter("--error-type", error_type, known_error_types(conn))
            where += " AND (error_class = %s OR stage = %s)"
            params += [error_type, error_type]  # type: ignore[list-item]
        if field and not all_open:
            check_filter("--field", field, known_fields(conn, settings))
            where += " AND " + _FIELD_CLAUSE
            params.append(field + ": ")  # type: ignore[arg-type]
        if key is not None and not all_open:
            where += " AND msg_key = %s"
            params.append(key.encode())  # type: ignore[arg-type]
        rows = conn.execute(f"SELECT {_COLUMNS} FROM sync.dead_letters WHERE {where}",
                            params).fetchall()
    return [_letter(r) for r in rows], []


def _audit(conn: PgConn, letter_id: int, action: str, actor: str, reason: str | None,
           outcome: str, detail: str | None, *, mappings: str | None = None) -> None:
    if mappings is None:
        conn.execute("INSERT INTO sync.dead_letter_actions (dead_letter_id, action, actor, "
                     "reason, outcome, detail) VALUES (%s, %s, %s, %s, %s, %s)",
                     (letter_id, action, actor, reason, outcome, detail))
        return
    conn.execute("INSERT INTO sync.dead_letter_actions (dead_letter_id, action, actor, reason, "
                 "outcome, detail, mappings_version) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                 (letter_id, action, actor, reason, outcome, detail, mappings))


def _lock(conn: PgConn, letter_id: int) -> str | None:
    row = conn.execute("SELECT state FROM sync.dead_letters WHERE dead_letter_id = %s "
                       "FOR UPDATE", (letter_id,)).fetchone()
    return None if row is None else str(row[0])


def _refusal(letter_id: int, state: str | None) -> str:
    if state is None:
        return "no such dead letter"
    return f"already {state}; nothing to do (see `crm-erp-sync dlq show {letter_id}`)"


def _earlier_unresolved(conn: PgConn, d: Letter) -> int | None:
    row = conn.execute(
        "SELECT dead_letter_id FROM sync.dead_letters WHERE topic = %s "
        "AND msg_key IS NOT DISTINCT FROM %s AND state IN ('open', 'failed_again') "
        'AND (partition, "offset") < (%s, %s) ORDER BY partition, "offset" LIMIT 1',
        (d.topic, d.key, d.partition, d.offset)).fetchone()
    return None if row is None else int(row[0])


def _key_groups(letters: list[Letter]) -> list[list[Letter]]:
    groups: dict[tuple[str, bytes | None], list[Letter]] = defaultdict(list)
    for d in sorted(letters, key=lambda d: (d.topic, d.partition, d.offset)):
        groups[(d.topic, d.key)].append(d)
    return list(groups.values())


def mappings_mismatch(version: str, running: list[str], path: str) -> str | None:
    """Why redriving with mappings ``version`` (of the file at ``path``) is not what the
    running consumers do, or None: no consumer runs (nothing to compare), or one applies
    this version. ``running``: the versions the running consumers report."""
    if not running or version in running:
        return None
    return (f"the mappings file {path} is version {version}, which no running consumer "
            f"applies (consumers that reported in the last {STALE_AFTER_S:g} s apply "
            f"{', '.join(sorted(running))}): what it redrives, the "
            "consumers would refuse or map otherwise for the key's next event. Give the "
            "consumers this file (they re-read it every CRM_ERP_SYNC_MAPPINGS_CHECK_S "
            "seconds, at once on SIGHUP; `crm-erp-sync status` lists their versions), or "
            "point CRM_ERP_SYNC_MAPPINGS_FILE at theirs; --force redrives anyway")


def _running_versions(settings: Settings) -> list[str]:
    """The mappings versions the consumer group's running consumers report; none for an
    ERP set up before ``sync.consumers`` existed (nothing to compare with)."""
    with connect(settings, "erp") as erp:
        try:
            members = live_members(erp, settings.consumer_group)
        except psycopg.errors.UndefinedTable:
            return []
    return sorted({str(m["mappings_version"]) for m in members})


def redrive(settings: Settings, letters: list[Letter], *, actor: str, reason: str | None = None,
            dry_run: bool = False, force: bool = False) -> ActionReport:
    """Re-process ``letters`` with the mappings file as it is now. Its version is in the
    report and in each audit row (``sync.dead_letter_actions.mappings_version``). Raises
    ConfigError naming CRM_ERP_SYNC_MAPPINGS_FILE, before touching anything, when consumers
    run and none applies that version (a dry run and ``force`` warn in the report
    instead): a redrive writes to the ERP at once, so a warning afterwards would be late."""
    report = ActionReport("redrive", dry_run)
    registry = SchemaRegistry.load(settings.schemas_dir)
    path = str(settings.mappings_file)
    try:
        content = settings.mappings_file.read_bytes()
    except OSError as exc:
        raise ConfigError(path, f"cannot read the mappings file: "
                                f"{exc.strerror or exc}") from exc
    mappings = Mappings.parse(content, path)
    report.mappings_version = version = mappings_version(content)
    report.consumer_versions = _running_versions(settings)
    mismatch = mappings_mismatch(version, report.consumer_versions, path)
    if mismatch is not None:
        if not (dry_run or force):
            raise ConfigError(settings.env_var("mappings_file"), mismatch)
        report.warnings.append(mismatch)
    todo: list[Letter] = []
    for d in letters:
        if d.state in UNRESOLVED:
            todo.append(d)
        else:
            report.outcomes.append(Outcome(d.dead_letter_id, d.key_text, "refused",
                                           _refusal(d.dead_letter_id, d.state)))
    records = _original_bytes(settings, todo)
    if dry_run:
        for group in _key_groups(todo):
            for d in group:
                report.outcomes.append(_dry_run(registry, mappings, d,
                                                records.get(d.dead_letter_id)))
        return report
    applier = ErpApplier(settings, registry, mappings)
    # Capture letters of one CRM row re-read it once: (table, key) -> the first's detail.
    rereads: dict[tuple[str, str], str] = {}
    try:
        conn = applier.connect()
        audit = _Audit(version, _has_version_column(conn))
        for group in _key_groups(todo):
            for d in group:
                report.outcomes.append(_redrive_one(applier, conn, d,
                                                    records.get(d.dead_letter_id), actor,
                                                    reason, rereads, audit))
        _sweep(applier, conn)
    finally:
        _close(applier)
    return report


def _dry_run(registry: SchemaRegistry, mappings: Mappings, d: Letter, record: Any) -> Outcome:
    if record is None:
        return Outcome(d.dead_letter_id, d.key_text, "would_fail_again",
                       "the original bytes are no longer in the dead-letter or original topic")
    if d.stage == "capture":
        return Outcome(d.dead_letter_id, d.key_text, "would_redrive",
                       "re-reads the CRM row (an ad-hoc snapshot of its key)")
    batch = prepare(registry, mappings, [Message(d.topic, d.partition, d.offset,
                                                 record.timestamp, d.key, record.value)])
    err = batch.envelopes[0].error
    if err is not None:
        return Outcome(d.dead_letter_id, d.key_text, "would_fail_again",
                       f"{type(err).__name__}: {err.reason}")
    return Outcome(d.dead_letter_id, d.key_text, "would_redrive",
                   "decodes and maps with the current mappings (the ERP may still refuse it)")


def _held_count(conn: PgConn, d: Letter) -> int:
    row = conn.execute("SELECT count(*) FROM sync.held_events WHERE reason = 'key_blocked' "
                       "AND topic = %s AND msg_key IS NOT DISTINCT FROM %s",
                       (d.topic, d.key)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class _Audit:
    """The mappings version a redrive records, and where: its own column, or the detail
    text of an ERP set up before the column (``setup`` adds it)."""

    version: str | None = None
    column: bool = False


def _has_version_column(conn: PgConn) -> bool:
    # its own transaction: on the applier's connection (not autocommit) a bare query would
    # leave one open, and every redrive after it would be a savepoint rolled back at close
    with conn.transaction():
        row = conn.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = 'sync' "
                           "AND table_name = 'dead_letter_actions' "
                           "AND column_name = 'mappings_version'").fetchone()
    return row is not None


def _redrive_one(applier: ErpApplier, conn: PgConn, d: Letter, record: Any, actor: str,
                 reason: str | None, rereads: dict[tuple[str, str], str] | None = None,
                 audit: _Audit | None = None) -> Outcome:
    with conn.transaction():
        state = _lock(conn, d.dead_letter_id)
        if state not in UNRESOLVED:
            return Outcome(d.dead_letter_id, d.key_text, "refused",
                           _refusal(d.dead_letter_id, state))
        earlier = _earlier_unresolved(conn, d)
        if earlier is not None:
            return Outcome(d.dead_letter_id, d.key_text, "skipped",
                           f"dead letter {earlier} of the same key comes first and is "
                           "unresolved: redrive or discard it first")
        conn.execute("UPDATE sync.dead_letters SET state = 'redriven', resolved_at = "
                     "clock_timestamp(), redrive_attempts = redrive_attempts + 1 "
                     "WHERE dead_letter_id = %s", (d.dead_letter_id,))
        held_before = _held_count(conn, d)
        error: str | None = None
        held: str | None = None
        if record is None:
            error = "the original bytes are no longer in the dead-letter or original topic"
        elif d.stage == "capture":
            resnapshot = ""
            try:
                error, resnapshot = None, _resnapshot(applier.settings, record,
                                                      {} if rereads is None else rereads)
            except CaptureRedriveError as exc:
                error, resnapshot = str(exc), ""
            if error is None:
                # the row's state now comes as a READ event; what was held follows
                applier.release_key(conn, d.topic, d.key)
        else:
            env = applier.redrive_message(conn, Message(d.topic, d.partition, d.offset,
                                                        record.timestamp, d.key, record.value))
            held = env.held
            if env.error is not None:
                error = (f"{type(env.error).__name__}: {env.error.reason} "
                         f"{_failed_again_advice(env)}")
        released = 0
        if error is not None:
            outcome = "failed_again"
            conn.execute("UPDATE sync.dead_letters SET state = 'failed_again', "
                         "resolved_at = NULL, last_error = %s WHERE dead_letter_id = %s",
                         (error, d.dead_letter_id))
        else:
            outcome = "held" if held else "redriven"
            released = max(0, held_before - _held_count(conn, d)
                           + (1 if held == "key_blocked" else 0))
        detail = error or (f"held: {held}" if held else "")
        if d.stage == "capture" and error is None:
            detail = resnapshot
        if released:
            detail = (detail + "; " if detail else "") + \
                f"released {released} held event(s) of the key"
        recorded = audit or _Audit()
        if recorded.version is not None and recorded.column:
            _audit(conn, d.dead_letter_id, "redrive", actor, reason, outcome, detail or None,
                   mappings=recorded.version)
        else:
            shown = (detail + "; " if detail else "") + (
                f"mappings {recorded.version}" if recorded.version else "")
            _audit(conn, d.dead_letter_id, "redrive", actor, reason, outcome, shown or None)
    return Outcome(d.dead_letter_id, d.key_text, outcome, detail, released)


class CaptureRedriveError(SyncError):
    """A capture dead letter whose row cannot be re-read (says why)."""


def _resnapshot(settings: Settings, record: Any, rereads: dict[tuple[str, str], str]) -> str:
    """Redrive of a capture dead letter: its change never became an event, so there are no
    bytes to re-run; the CRM row is read again instead (an ad-hoc snapshot of that key, the
    producer publishes it as a READ event positioned after everything held). A row still
    unrepresentable becomes a new capture dead letter. Several letters of one row (a bad
    value, then the UPDATE that fixed it: its old row held the value) share one re-read:
    ``rereads`` remembers (entity, key) -> detail within one redrive. Returns the detail."""
    from service.cdc.profile import load_profile

    try:
        doc = json.loads(record.value)
        table, primary_key = str(doc["table"]), dict(doc["primary_key"])
        row = doc.get("after") or doc.get("before") or {}
    except (ValueError, KeyError, TypeError) as exc:
        raise CaptureRedriveError(f"not a capture dead letter ({type(exc).__name__})") from exc
    profile = load_profile(settings.source_profile)
    ent = profile.table(table)
    if ent is None:
        raise CaptureRedriveError(f"{table} is not captured by profile {profile.name}")
    try:
        if ent.entity == "order_line":  # lines are read with their order
            column = ent.order_column or ""
            key = str(row[column])
            ent = profile.entity("order") or ent
        elif "key" in primary_key:  # a letter for an event that was built but not sent
            column, key = "key", str(primary_key["key"])
        else:
            column, key = ",".join(ent.key), ent.key_text(row or primary_key)
    except (KeyError, TypeError) as exc:
        raise CaptureRedriveError(f"{table}: no usable key in the letter") from exc
    if (ent.entity, key) in rereads:
        return rereads[(ent.entity, key)] + " (one re-read for this row's letters)"
    with connect(settings, "crm") as crm:
        try:
            if missing_keys(crm, profile, ent.entity, [key]):
                # A snapshot reads rows, so a deleted row would be "re-read" as nothing and
                # its ERP row would stay live: say so instead of reporting success.
                raise CaptureRedriveError(
                    f"no {ent.table} row with key {key} any more (deleted since): a re-read "
                    "cannot carry the delete; discard this letter and run `crm-erp-sync "
                    "reconcile --repair`")
            snapshot_id = request_snapshot(crm, profile, ent.entity, [key], reason="redrive")
        except ValueError as exc:
            raise CaptureRedriveError(str(exc)) from exc
    table = ent.table
    detail = (f"re-read of {table} {column}={key} requested (snapshot {snapshot_id}); "
              "its current state follows as a READ event")
    rereads[(ent.entity, key)] = detail
    return detail


def _failed_again_advice(env: Envelope) -> str:
    """What to do when a redrive fails again. A redrive re-runs the event as the CRM sent it
    then; a fix made in the CRM since comes as a newer event, held behind this letter. For a
    customer or a market demand that newer event is the whole row. An order's event carries
    only the lines its transaction changed: a line that failed in this event and was not
    changed since would never reach the ERP once the letter is discarded, so the advice adds
    a re-read of the order (a snapshot READ of it as the CRM has it now, held behind the
    letter until the discard, then applied or lettered line by line)."""
    if env.kind == "order" and env.record is not None:
        order_key = str(env.record.get("key", ""))
        return ("(the letter holds the event as the CRM sent it, and an order's event only "
                "the lines its transaction changed; once the CRM row is fixed, `dlq discard` "
                "this letter and re-read the order, `crm-erp-sync snapshot --table order "
                f"--key {order_key}`, so that the ERP gets every line as the CRM has it)")
    return ("(the letter holds the event as the CRM sent it; if the CRM row was fixed since, "
            "`dlq discard` this letter and the newer events held behind it apply)")


def discard(settings: Settings, letters: list[Letter], *, actor: str,
            reason: str, dry_run: bool = False) -> ActionReport:
    """Mark letters discarded (audited) and release the events held behind their keys.
    With dry_run: only the outcomes each would have ("would_discard", or refused), nothing
    changed. Raises ConfigError without a reason."""
    if not reason or not reason.strip():
        raise ConfigError("--reason", "say why the dead letters are discarded")
    report = ActionReport("discard", dry_run)
    if dry_run:
        for d in sorted(letters, key=lambda d: (d.topic, d.partition, d.offset)):
            if d.state in UNRESOLVED:
                report.outcomes.append(Outcome(d.dead_letter_id, d.key_text, "would_discard",
                                               f"{d.error_class}: {d.error_message}"))
            else:
                report.outcomes.append(Outcome(d.dead_letter_id, d.key_text, "refused",
                                               _refusal(d.dead_letter_id, d.state)))
        return report
    registry = SchemaRegistry.load(settings.schemas_dir)
    applier = ErpApplier(settings, registry, Mappings.load(settings.mappings_file))
    try:
        conn = applier.connect()
        for d in sorted(letters, key=lambda d: (d.topic, d.partition, d.offset)):
            with conn.transaction():
                state = _lock(conn, d.dead_letter_id)
                if state not in UNRESOLVED:
                    report.outcomes.append(Outcome(d.dead_letter_id, d.key_text, "refused",
                                                   _refusal(d.dead_letter_id, state)))
                    continue
                conn.execute("UPDATE sync.dead_letters SET state = 'discarded', resolved_at = "
                             "clock_timestamp() WHERE dead_letter_id = %s", (d.dead_letter_id,))
                released = applier.release_key(conn, d.topic, d.key)
                detail = f"released {released} held event(s) of the key" if released else ""
                _audit(conn, d.dead_letter_id, "discard", actor, reason, "discarded",
                       detail or None)
                report.outcomes.append(Outcome(d.dead_letter_id, d.key_text, "discarded",
                                               detail, released))
        _sweep(applier, conn)
    finally:
        _close(applier)
    return report


def _sweep(applier: ErpApplier, conn: PgConn) -> int:
    """Release events held behind keys that have no unresolved dead letter before them (a
    consumer that held one while an operator resolved its letter)."""
    with conn.transaction():
        keys = conn.execute(
            "SELECT DISTINCT h.topic, h.msg_key FROM sync.held_events h "
            f"WHERE h.reason = 'key_blocked' AND NOT {STILL_BLOCKED}").fetchall()
        return sum(applier.release_key(conn, t, bytes(k) if k is not None else None)
                   for t, k in keys)


def _close(applier: ErpApplier) -> None:
    applier.target.close()
    if applier.conn is not None:
        applier.conn.close()
    if applier._dlq_producer is not None:
        applier._dlq_producer.close()
