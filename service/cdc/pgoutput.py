"""Decoder for PostgreSQL's ``pgoutput`` logical replication messages, protocol version 1.

Written against "Logical Replication Message Formats" of PostgreSQL 15
(https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html). Pure: bytes in,
frozen dataclasses out; no database access.

The producer feeds it from ``service/cdc/source.py``: the payload of each XLogData message of
the streaming replication protocol (``START_REPLICATION ... LOGICAL``, psycopg2), or each
``data`` of ``pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1',
'publication_names', 'p')`` (the SQL fallback). Either is exactly one pgoutput message starting
with its type byte, which is what :func:`decode_message` takes.
Protocol version 1 has no streaming (``S``/``E``/``c``/``A``) or two-phase messages, and
no per-message xid; those are reported as errors rather than guessed at.

Column values in :data:`TupleData` are one of:

* :data:`NULL` -- the column is SQL NULL (tuple kind ``'n'``);
* :data:`UNCHANGED_TOAST` -- an out-of-line TOASTed value an UPDATE did not change, so the
  server did not send it (kind ``'u'``). Verified against PostgreSQL 15: this happens in the
  *new* tuple even with ``REPLICA IDENTITY FULL`` (the *old* tuple then has the full value);
  see :func:`has_unchanged_toast` and :func:`fill_unchanged_toast`;
* ``str`` -- the column's text output, decoded as UTF-8 (kind ``'t'``);
* ``bytes`` -- the column's binary send format (kind ``'b'``, only with the ``binary`` option).

Every malformed input raises :class:`service.errors.PgOutputError` naming the message type and
the problem; ``struct.error``/``IndexError``/``UnicodeDecodeError`` never escape.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

from service.errors import PgOutputError

__all__ = [
    "NULL",
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "ColumnValue",
    "Commit",
    "Delete",
    "Insert",
    "Marker",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "RelationCache",
    "Truncate",
    "TupleData",
    "Type",
    "UnchangedToastError",
    "Update",
    "decode_message",
    "fill_unchanged_toast",
    "has_unchanged_toast",
    "lsn_to_str",
    "pg_timestamp_to_datetime",
    "str_to_lsn",
]


# --------------------------------------------------------------------------- column values


class Marker(enum.Enum):
    """The two non-text column values; compare with ``is``."""

    NULL = "n"
    UNCHANGED_TOAST = "u"

    def __repr__(self) -> str:
        return self.name


NULL: Final = Marker.NULL
"""The column is SQL NULL (tuple kind ``'n'``)."""

UNCHANGED_TOAST: Final = Marker.UNCHANGED_TOAST
"""An unchanged TOASTed value the server did not send (tuple kind ``'u'``)."""

ColumnValue: TypeAlias = str | bytes | Literal[Marker.NULL, Marker.UNCHANGED_TOAST]
TupleData: TypeAlias = tuple[ColumnValue, ...]


def has_unchanged_toast(values: TupleData) -> bool:
    """Whether any column of ``values`` is :data:`UNCHANGED_TOAST` (its value is unknown)."""
    return UNCHANGED_TOAST in values


def fill_unchanged_toast(new: TupleData, old: TupleData | None) -> TupleData:
    """``new`` with every :data:`UNCHANGED_TOAST` replaced by the same column of ``old``.

    Even with REPLICA IDENTITY FULL, PostgreSQL 15 sends an UPDATE's unchanged out-of-line
    TOASTed columns as ``'u'`` in the *new* tuple; the *old* tuple (FULL) carries them in
    full. Returns ``new`` itself when nothing is missing. Raises PgOutputError when a value
    cannot be recovered (no old tuple, a column-count mismatch, or old lacks it too).
    """
    if UNCHANGED_TOAST not in new:
        return new
    if old is None or len(old) != len(new):
        raise PgOutputError(
            "unchanged TOASTed value in new tuple and no matching old tuple to take it from "
            "(the table needs REPLICA IDENTITY FULL)"
        )
    merged = tuple(o if n is UNCHANGED_TOAST else n for n, o in zip(new, old, strict=True))
    if UNCHANGED_TOAST in merged:
        raise PgOutputError("unchanged TOASTed value missing from the old tuple too")
    return merged


# --------------------------------------------------------------------------- LSNs and time

_LSN_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def lsn_to_str(lsn: int) -> str:
    """``0x16B374D848`` -> ``'16/B374D848'`` (PostgreSQL's ``pg_lsn`` text form)."""
    if not 0 <= lsn <= _LSN_MAX:
        raise ValueError(f"LSN out of uint64 range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFF_FFFF:X}"


def str_to_lsn(text: str) -> int:
    """``'16/B374D848'`` -> ``0x16B374D848``; accepts what ``pg_lsn`` input accepts."""
    match = _LSN_RE.fullmatch(text)
    if match is None:
        raise PgOutputError(f"not a PostgreSQL LSN (expected 'X/Y' in hex): {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


def pg_timestamp_to_datetime(micros: int) -> datetime:
    """Microseconds since 2000-01-01 00:00 UTC (PostgreSQL's epoch) -> aware UTC datetime."""
    return _PG_EPOCH + timedelta(microseconds=micros)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: start of a transaction."""

    final_lsn: int  # LSN of the transaction's commit record
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: end of a transaction."""

    flags: int  # currently unused, 0
    commit_lsn: int
    end_lsn: int  # end of the commit record: where to advance the slot to
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction was replicated from another node."""

    commit_lsn: int  # the commit LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int  # bit 0: part of the replica identity key
    name: str
    type_oid: int
    type_modifier: int  # atttypmod, -1 if none

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: a table's shape, sent before its first change in each session/after DDL."""

    relation_id: int
    namespace: str  # empty for pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class Type:
    """``Y``: a non-built-in data type used by a following Relation."""

    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``."""

    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: ``old`` with REPLICA IDENTITY FULL, ``key`` if the key changed (identity DEFAULT/
    INDEX), neither otherwise."""

    relation_id: int
    old: TupleData | None
    key: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: exactly one of ``old`` (REPLICA IDENTITY FULL) and ``key`` is set."""

    relation_id: int
    old: TupleData | None
    key: TupleData | None


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: ``options`` bits are TRUNCATE_CASCADE and TRUNCATE_RESTART_IDENTITY."""

    options: int
    relation_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """``M``: a logical decoding message (``pg_logical_emit_message``)."""

    flags: int  # bit 0: transactional
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


PgOutputMessage: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
)


# --------------------------------------------------------------------------- decoding

_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_I32: Final = struct.Struct(">i")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_BEGIN: Final = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT: Final = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_MESSAGE_HEAD: Final = struct.Struct(">BQ")  # flags, LSN
_RELATION_TAIL: Final = struct.Struct(">BH")  # replica identity, number of columns
_COLUMN_TYPE: Final = struct.Struct(">Ii")  # type OID, type modifier
_TRUNCATE_HEAD: Final = struct.Struct(">IB")  # number of relations, options

_KIND_TEXT: Final = ord("t")
_KIND_NULL: Final = ord("n")
_KIND_UNCHANGED: Final = ord("u")
_KIND_BINARY: Final = ord("b")
_NEW: Final = ord("N")
_KEY: Final = ord("K")
_OLD: Final = ord("O")


class _Malformed(Exception):
    """Internal: what is wrong, without the message type (decode_message adds it)."""


def _string(data: bytes, off: int, what: str) -> tuple[str, int]:
    """A NUL-terminated string at ``off``; returns it and the offset after the NUL."""
    end = data.find(0, off)
    if end < 0:
        raise _Malformed(f"truncated: {what} string at offset {off} has no NUL terminator")
    try:
        return data[off:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise _Malformed(f"{what} string at offset {off} is not valid UTF-8") from exc


def _tuple(data: bytes, off: int) -> tuple[TupleData, int]:
    """TupleData at ``off`` (starting with Int16 column count); returns it and the end offset."""
    (ncols,) = _U16.unpack_from(data, off)
    off += 2
    size = len(data)
    unpack_i32 = _I32.unpack_from
    values: list[ColumnValue] = []
    append = values.append
    for i in range(ncols):
        if off >= size:
            raise _Malformed(f"truncated: tuple ends before column {i} of {ncols}")
        kind = data[off]
        off += 1
        if kind == _KIND_TEXT:  # the hot path, kept inline
            if off + 4 > size:
                raise _Malformed(f"truncated: no length for column {i} of {ncols}")
            (length,) = unpack_i32(data, off)
            start = off + 4
            off = start + length
            if length < 0 or off > size:
                raise _Malformed(_bad_length(i, ncols, length, size - start))
            try:
                append(data[start:off].decode())
            except UnicodeDecodeError as exc:
                raise _Malformed(f"column {i} of {ncols}: text is not valid UTF-8") from exc
        elif kind == _KIND_NULL:
            append(NULL)
        elif kind == _KIND_UNCHANGED:
            append(UNCHANGED_TOAST)
        elif kind == _KIND_BINARY:
            if off + 4 > size:
                raise _Malformed(f"truncated: no length for column {i} of {ncols}")
            (length,) = unpack_i32(data, off)
            start = off + 4
            off = start + length
            if length < 0 or off > size:
                raise _Malformed(_bad_length(i, ncols, length, size - start))
            append(data[start:off])
        else:
            raise _Malformed(
                f"bad tuple value kind {_show(kind)} for column {i} of {ncols} "
                "(expected 'n', 'u', 't' or 'b')"
            )
    return tuple(values), off


def _bad_length(i: int, ncols: int, length: int, remaining: int) -> str:
    return f"truncated: column {i} of {ncols} declares {length} bytes, {remaining} remain"


def _show(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"0x{byte:02x}"


def _tuple_tag(data: bytes, off: int, allowed: bytes, what: str) -> int:
    if off >= len(data):
        raise _Malformed(f"truncated: no {what} tuple tag at offset {off}")
    tag = data[off]
    if tag not in allowed:
        expected = " or ".join(repr(chr(b)) for b in allowed)
        raise _Malformed(f"bad {what} tuple tag {_show(tag)} at offset {off} (expected {expected})")
    return tag


def _begin(data: bytes, off: int) -> tuple[Begin, int]:
    final_lsn, ts, xid = _BEGIN.unpack_from(data, off)
    return Begin(final_lsn, pg_timestamp_to_datetime(ts), xid), off + _BEGIN.size


def _commit(data: bytes, off: int) -> tuple[Commit, int]:
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, off)
    return Commit(flags, commit_lsn, end_lsn, pg_timestamp_to_datetime(ts)), off + _COMMIT.size


def _origin(data: bytes, off: int) -> tuple[Origin, int]:
    (lsn,) = _U64.unpack_from(data, off)
    name, off = _string(data, off + 8, "origin name")
    return Origin(lsn, name), off


def _relation(data: bytes, off: int) -> tuple[Relation, int]:
    (relation_id,) = _U32.unpack_from(data, off)
    namespace, off = _string(data, off + 4, "namespace")
    name, off = _string(data, off, "relation name")
    identity, ncols = _RELATION_TAIL.unpack_from(data, off)
    off += _RELATION_TAIL.size
    columns: list[Column] = []
    for _ in range(ncols):
        (flags,) = _U8.unpack_from(data, off)
        col_name, off = _string(data, off + 1, "column name")
        type_oid, typmod = _COLUMN_TYPE.unpack_from(data, off)
        off += _COLUMN_TYPE.size
        columns.append(Column(flags, col_name, type_oid, typmod))
    return Relation(relation_id, namespace, name, chr(identity), tuple(columns)), off


def _type(data: bytes, off: int) -> tuple[Type, int]:
    (type_oid,) = _U32.unpack_from(data, off)
    namespace, off = _string(data, off + 4, "namespace")
    name, off = _string(data, off, "type name")
    return Type(type_oid, namespace, name), off


def _insert(data: bytes, off: int) -> tuple[Insert, int]:
    (relation_id,) = _U32.unpack_from(data, off)
    _tuple_tag(data, off + 4, b"N", "new")
    new, off = _tuple(data, off + 5)
    return Insert(relation_id, new), off


def _update(data: bytes, off: int) -> tuple[Update, int]:
    (relation_id,) = _U32.unpack_from(data, off)
    off += 4
    old: TupleData | None = None
    key: TupleData | None = None
    tag = _tuple_tag(data, off, b"KON", "old/key/new")
    if tag == _OLD:
        old, off = _tuple(data, off + 1)
    elif tag == _KEY:
        key, off = _tuple(data, off + 1)
    if tag != _NEW:
        _tuple_tag(data, off, b"N", "new")
    new, off = _tuple(data, off + 1)
    return Update(relation_id, old, key, new), off


def _delete(data: bytes, off: int) -> tuple[Delete, int]:
    (relation_id,) = _U32.unpack_from(data, off)
    tag = _tuple_tag(data, off + 4, b"KO", "old/key")
    values, off = _tuple(data, off + 5)
    if tag == _OLD:
        return Delete(relation_id, values, None), off
    return Delete(relation_id, None, values), off


def _truncate(data: bytes, off: int) -> tuple[Truncate, int]:
    count, options = _TRUNCATE_HEAD.unpack_from(data, off)
    off += _TRUNCATE_HEAD.size
    ids = struct.unpack_from(f">{count}I", data, off)
    return Truncate(options, ids), off + 4 * count


def _message(data: bytes, off: int) -> tuple[Message, int]:
    flags, lsn = _MESSAGE_HEAD.unpack_from(data, off)
    prefix, off = _string(data, off + _MESSAGE_HEAD.size, "prefix")
    (length,) = _I32.unpack_from(data, off)
    start = off + 4
    end = start + length
    if length < 0 or end > len(data):
        raise _Malformed(f"truncated: content declares {length} bytes, {len(data) - start} remain")
    return Message(flags, lsn, prefix, data[start:end]), end


_Decoder: TypeAlias = Callable[[bytes, int], tuple[PgOutputMessage, int]]

_DECODERS: Final[dict[int, tuple[str, _Decoder]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _message),
}

# Known to PostgreSQL 15 but not part of protocol version 1.
_LATER_PROTOCOL: Final[dict[int, str]] = {
    ord("S"): "Stream Start (protocol 2)",
    ord("E"): "Stream Stop (protocol 2)",
    ord("c"): "Stream Commit (protocol 2)",
    ord("A"): "Stream Abort (protocol 2)",
    ord("b"): "Begin Prepare (protocol 3)",
    ord("P"): "Prepare (protocol 3)",
    ord("K"): "Commit Prepared (protocol 3)",
    ord("r"): "Rollback Prepared (protocol 3)",
    ord("p"): "Stream Prepare (protocol 3)",
}


def decode_message(data: bytes | bytearray | memoryview) -> PgOutputMessage:
    """Decode one pgoutput (protocol version 1) message; ``data[0]`` is the type byte.

    Raises PgOutputError for an empty, truncated or over-long message, an unknown type byte,
    or a bad tuple/column kind.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    if not buf:
        raise PgOutputError("empty pgoutput message (no type byte)")
    type_byte = buf[0]
    entry = _DECODERS.get(type_byte)
    if entry is None:
        later = _LATER_PROTOCOL.get(type_byte)
        if later is not None:
            raise PgOutputError(
                f"pgoutput message type {_show(type_byte)} is {later}, not protocol version 1"
            )
        raise PgOutputError(f"unknown pgoutput message type byte {_show(type_byte)}")
    name, decoder = entry
    what = f"pgoutput {name} message ({len(buf)} bytes)"
    try:
        msg, end = decoder(buf, 1)
    except _Malformed as exc:  # chain the underlying error (if any), not the internal one
        raise PgOutputError(f"{what}: {exc}") from exc.__cause__
    except (struct.error, IndexError) as exc:
        raise PgOutputError(f"{what}: truncated ({exc})") from exc
    except (OverflowError, ValueError) as exc:  # e.g. a timestamp out of datetime's range
        raise PgOutputError(f"{what}: {exc}") from exc
    if end != len(buf):
        raise PgOutputError(f"{what}: {len(buf) - end} trailing bytes after offset {end}")
    return msg


# --------------------------------------------------------------------------- relations


class UnchangedToastError(PgOutputError):
    """A column value was not sent (unchanged TOAST): fill it from the old tuple first."""

    def __init__(self, relation: Relation, column: str) -> None:
        super().__init__(
            f"{relation.qualified_name}.{column}: unchanged TOASTed value was not sent; take it "
            "from the old tuple (fill_unchanged_toast; needs REPLICA IDENTITY FULL)"
        )
        self.relation = relation
        self.column = column


class RelationCache:
    """Remembers Relation messages by id; turns TupleData into ``{column name: text or None}``."""

    __slots__ = ("_relations",)

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}

    def add(self, relation: Relation) -> None:
        """Remember (or replace, after DDL) a relation."""
        self._relations[relation.relation_id] = relation

    def observe(self, msg: PgOutputMessage) -> None:
        """Feed any decoded message; Relation messages are remembered, others ignored."""
        if isinstance(msg, Relation):
            self._relations[msg.relation_id] = msg

    def get(self, relation_id: int) -> Relation:
        try:
            return self._relations[relation_id]
        except KeyError:
            raise PgOutputError(
                f"change for unknown relation id {relation_id} (no Relation message seen)"
            ) from None

    def __contains__(self, relation_id: object) -> bool:
        return relation_id in self._relations

    def __len__(self) -> int:
        return len(self._relations)

    def to_dict(self, relation_id: int, values: TupleData) -> dict[str, str | None]:
        """Column name -> text value (None for NULL).

        Raises PgOutputError for an unknown relation id, a column-count mismatch or a binary
        value, and UnchangedToastError (a PgOutputError) for an unsent TOASTed value; check
        :func:`has_unchanged_toast` first to handle that case instead.
        """
        relation = self.get(relation_id)
        columns = relation.columns
        if len(columns) != len(values):
            raise PgOutputError(
                f"{relation.qualified_name}: tuple has {len(values)} columns, "
                f"relation has {len(columns)}"
            )
        row: dict[str, str | None] = {}
        for column, value in zip(columns, values, strict=True):
            if isinstance(value, str):
                row[column.name] = value
            elif value is NULL:
                row[column.name] = None
            elif value is UNCHANGED_TOAST:
                raise UnchangedToastError(relation, column.name)
            else:
                raise PgOutputError(
                    f"{relation.qualified_name}.{column.name}: binary-format value; "
                    "decode with proto option binary off"
                )
        return row
