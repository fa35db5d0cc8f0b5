"""pgoutput decoder against hand-built messages (protocol version 1, PostgreSQL 15 docs)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from service.cdc import pgoutput
from service.cdc.pgoutput import (
    NULL,
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    RelationCache,
    Truncate,
    Type,
    UnchangedToastError,
    Update,
    decode_message,
    fill_unchanged_toast,
    has_unchanged_toast,
    lsn_to_str,
    str_to_lsn,
)
from service.errors import PgOutputError

# --------------------------------------------------------------------------- builder

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
COMMIT_TIME = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=UTC)


def micros(ts: datetime) -> int:
    return (ts - PG_EPOCH) // timedelta(microseconds=1)


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


Value = str | bytes | None | pgoutput.Marker


def tuple_data(*values: Value) -> bytes:
    """TupleData: str -> 't', bytes -> 'b', None/NULL -> 'n', UNCHANGED_TOAST -> 'u'."""
    out = [struct.pack(">H", len(values))]
    for v in values:
        if v is None or v is NULL:
            out.append(b"n")
        elif v is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(v, str):
            raw = v.encode()
            out.append(b"t" + struct.pack(">i", len(raw)) + raw)
        elif isinstance(v, bytes):
            out.append(b"b" + struct.pack(">i", len(v)) + v)
    return b"".join(out)


def begin(final_lsn: int, ts: datetime, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, micros(ts), xid)


def commit(commit_lsn: int, end_lsn: int, ts: datetime, flags: int = 0) -> bytes:
    return b"C" + struct.pack(">BQQq", flags, commit_lsn, end_lsn, micros(ts))


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + cstr(name)


def relation(
    rel_id: int, ns: str, name: str, identity: str, cols: list[tuple[int, str, int, int]]
) -> bytes:
    out = b"R" + struct.pack(">I", rel_id) + cstr(ns) + cstr(name)
    out += struct.pack(">BH", ord(identity), len(cols))
    for flags, col, oid, typmod in cols:
        out += struct.pack(">B", flags) + cstr(col) + struct.pack(">Ii", oid, typmod)
    return out


def type_msg(oid: int, ns: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + cstr(ns) + cstr(name)


def insert(rel_id: int, *new: Value) -> bytes:
    return b"I" + struct.pack(">I", rel_id) + b"N" + tuple_data(*new)


def update(
    rel_id: int,
    new: tuple[Value, ...],
    old: tuple[Value, ...] | None = None,
    key: tuple[Value, ...] | None = None,
) -> bytes:
    out = b"U" + struct.pack(">I", rel_id)
    if old is not None:
        out += b"O" + tuple_data(*old)
    if key is not None:
        out += b"K" + tuple_data(*key)
    return out + b"N" + tuple_data(*new)


def delete(rel_id: int, tag: bytes, *values: Value) -> bytes:
    return b"D" + struct.pack(">I", rel_id) + tag + tuple_data(*values)


def truncate(options: int, *rel_ids: int) -> bytes:
    ids = struct.pack(f">{len(rel_ids)}I", *rel_ids)
    return b"T" + struct.pack(">IB", len(rel_ids), options) + ids


def logical_message(flags: int, lsn: int, prefix: str, content: bytes) -> bytes:
    head = b"M" + struct.pack(">BQ", flags, lsn) + cstr(prefix)
    return head + struct.pack(">i", len(content)) + content


CUSTOMER_COLS = [
    (1, "customer_id", 20, -1),  # int8, key
    (0, "name", 25, -1),  # text
    (0, "address", 1043, 204),  # varchar(200)
    (0, "note", 25, -1),
]
CUSTOMER_REL = relation(16390, "crm", "customer", "f", CUSTOMER_COLS)

# --------------------------------------------------------------------------- messages


def test_begin() -> None:
    msg = decode_message(begin(0x16_B374_D848, COMMIT_TIME, 7_654_321))
    assert msg == Begin(final_lsn=0x16_B374_D848, commit_time=COMMIT_TIME, xid=7_654_321)
    assert msg.commit_time.tzinfo is UTC


def test_commit() -> None:
    msg = decode_message(commit(0x16_B374_D848, 0x16_B374_D878, COMMIT_TIME))
    assert msg == Commit(
        flags=0, commit_lsn=0x16_B374_D848, end_lsn=0x16_B374_D878, commit_time=COMMIT_TIME
    )


def test_timestamp_before_pg_epoch_and_at_epoch() -> None:
    old = datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert decode_message(begin(1, old, 1)) == Begin(1, old, 1)
    assert decode_message(begin(1, PG_EPOCH, 1)) == Begin(1, PG_EPOCH, 1)


def test_origin() -> None:
    assert decode_message(origin(0xABCDEF, "node_北京")) == Origin(0xABCDEF, "node_北京")


def test_relation() -> None:
    msg = decode_message(CUSTOMER_REL)
    assert isinstance(msg, Relation)
    assert msg.relation_id == 16390
    assert (msg.namespace, msg.name, msg.replica_identity) == ("crm", "customer", "f")
    assert msg.columns[0] == Column(1, "customer_id", 20, -1)
    assert msg.columns[2] == Column(0, "address", 1043, 204)
    assert [c.is_key for c in msg.columns] == [True, False, False, False]
    assert msg.column_names == ("customer_id", "name", "address", "note")
    assert msg.qualified_name == "crm.customer"


def test_relation_cjk_identifiers_and_pg_catalog_namespace() -> None:
    msg = decode_message(relation(5, "", "客户", "d", [(1, "编号", 23, -1)]))
    assert msg == Relation(5, "", "客户", "d", (Column(1, "编号", 23, -1),))
    assert isinstance(msg, Relation) and msg.qualified_name == "客户"


def test_type() -> None:
    msg = decode_message(type_msg(16500, "crm", "order_status"))
    assert msg == Type(16500, "crm", "order_status")


def test_insert_cjk_null_and_empty_string() -> None:
    msg = decode_message(insert(16390, "42", "张三", "北京市朝阳区", None))
    assert msg == Insert(16390, ("42", "张三", "北京市朝阳区", NULL))
    msg2 = decode_message(insert(16390, "43", "", NULL, "x"))
    assert isinstance(msg2, Insert) and msg2.new == ("43", "", NULL, "x")


def test_insert_binary_value() -> None:
    msg = decode_message(insert(1, b"\x00\x00\x00\x2a"))
    assert msg == Insert(1, (b"\x00\x00\x00\x2a",))


def test_insert_zero_columns() -> None:
    assert decode_message(insert(9)) == Insert(9, ())


def test_update_new_only() -> None:
    msg = decode_message(update(16390, new=("42", "张三", "上海", NULL)))
    assert msg == Update(16390, old=None, key=None, new=("42", "张三", "上海", NULL))


def test_update_with_old_tuple() -> None:
    msg = decode_message(
        update(
            16390,
            old=("42", "张三", "北京市朝阳区", NULL),
            new=("42", "李四", "北京市朝阳区", NULL),
        )
    )
    assert isinstance(msg, Update)
    assert msg.old == ("42", "张三", "北京市朝阳区", NULL)
    assert msg.key is None
    assert msg.new == ("42", "李四", "北京市朝阳区", NULL)


def test_update_with_key_tuple_and_unchanged_toast() -> None:
    msg = decode_message(
        update(16390, key=("41", NULL, NULL, NULL), new=("42", "张三", "北京", UNCHANGED_TOAST))
    )
    assert isinstance(msg, Update)
    assert msg.old is None
    assert msg.key == ("41", NULL, NULL, NULL)
    assert msg.new[3] is UNCHANGED_TOAST
    assert has_unchanged_toast(msg.new)
    assert not has_unchanged_toast(msg.key)


def test_delete_old_and_key() -> None:
    assert decode_message(delete(16390, b"O", "42", "张三", "北京", NULL)) == Delete(
        16390, old=("42", "张三", "北京", NULL), key=None
    )
    assert decode_message(delete(16390, b"K", "42", NULL, NULL, NULL)) == Delete(
        16390, old=None, key=("42", NULL, NULL, NULL)
    )


def test_truncate() -> None:
    msg = decode_message(
        truncate(pgoutput.TRUNCATE_CASCADE | pgoutput.TRUNCATE_RESTART_IDENTITY, 16390, 16400)
    )
    assert msg == Truncate(options=3, relation_ids=(16390, 16400))


def test_logical_message() -> None:
    content = "水位线".encode()
    msg = decode_message(logical_message(1, 0x1_0000_0010, "crm-erp-sync.heartbeat", content))
    assert msg == Message(1, 0x1_0000_0010, "crm-erp-sync.heartbeat", content)
    assert isinstance(msg, Message) and msg.transactional
    msg2 = decode_message(logical_message(0, 5, "p", b""))
    assert isinstance(msg2, Message) and not msg2.transactional and msg2.content == b""


def test_accepts_memoryview_and_bytearray() -> None:
    raw = insert(1, "张三")
    assert decode_message(memoryview(raw)) == decode_message(bytearray(raw)) == Insert(1, ("张三",))


def test_markers_are_obvious_singletons() -> None:
    assert repr(NULL) == "NULL" and repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    values: tuple[pgoutput.ColumnValue, ...] = (NULL, UNCHANGED_TOAST, "")
    assert len({id(v) for v in values}) == 3  # distinct objects
    assert values[0] != values[2]  # NULL is not the empty string


# --------------------------------------------------------------------------- errors


def test_empty_message() -> None:
    with pytest.raises(PgOutputError, match="empty"):
        decode_message(b"")


def test_unknown_type_byte() -> None:
    with pytest.raises(PgOutputError, match=r"unknown pgoutput message type byte 'Z'"):
        decode_message(b"Z\x00\x00")
    with pytest.raises(PgOutputError, match=r"0xff"):
        decode_message(b"\xff")


def test_streaming_type_byte_names_the_protocol() -> None:
    with pytest.raises(PgOutputError, match=r"Stream Start \(protocol 2\)"):
        decode_message(b"S\x00\x00\x00\x01\x01")


@pytest.mark.parametrize(
    "raw",
    [
        begin(1, COMMIT_TIME, 2),
        commit(1, 2, COMMIT_TIME),
        origin(1, "o"),
        CUSTOMER_REL,
        type_msg(1, "crm", "t"),
        insert(16390, "42", "张三", "北京市朝阳区", None),
        update(16390, old=("1", "张三"), new=("1", "李四")),
        delete(16390, b"K", "42"),
        truncate(0, 1, 2),
        logical_message(1, 5, "p", b"content"),
    ],
    ids=lambda raw: chr(raw[0]),
)
def test_every_truncation_raises_pgoutput_error(raw: bytes) -> None:
    name = {
        "B": "Begin",
        "C": "Commit",
        "O": "Origin",
        "R": "Relation",
        "Y": "Type",
        "I": "Insert",
        "U": "Update",
        "D": "Delete",
        "T": "Truncate",
        "M": "Message",
    }
    decode_message(raw)  # the whole message is fine
    for cut in range(1, len(raw)):
        with pytest.raises(PgOutputError, match=f"pgoutput {name[chr(raw[0])]} message") as info:
            decode_message(raw[:cut])
        assert type(info.value) is PgOutputError  # never IndexError/struct.error


def test_truncated_text_value_message() -> None:
    raw = insert(16390, "北京市朝阳区")
    expected = r"Insert message .*truncated: column 0 of 1 declares 18 bytes, 15 remain"
    with pytest.raises(PgOutputError, match=expected):
        decode_message(raw[:-3])


def test_truncated_begin_is_translated_from_struct_error() -> None:
    expected = r"pgoutput Begin message \(5 bytes\): truncated"
    with pytest.raises(PgOutputError, match=expected) as info:
        decode_message(begin(1, COMMIT_TIME, 2)[:5])
    assert isinstance(info.value.__cause__, struct.error)


def test_trailing_bytes() -> None:
    with pytest.raises(PgOutputError, match=r"Commit message .* 2 trailing bytes"):
        decode_message(commit(1, 2, COMMIT_TIME) + b"\x00\x00")


def test_bad_tuple_kind() -> None:
    raw = bytearray(insert(16390, "42", "张三"))
    second = raw.index(b"t", 8 + 1 + 4 + 2)  # kind byte of column 1
    raw[second] = ord("x")
    expected = r"Insert message .*bad tuple value kind 'x' for column 1 of 2"
    with pytest.raises(PgOutputError, match=expected):
        decode_message(bytes(raw))


def test_bad_tuple_tags() -> None:
    with pytest.raises(PgOutputError, match=r"Insert message .*bad new tuple tag 'O'"):
        decode_message(b"I" + struct.pack(">I", 1) + b"O" + tuple_data("1"))
    with pytest.raises(PgOutputError, match=r"Update message .*bad new tuple tag 'K'"):
        old_then_key = b"O" + tuple_data("1") + b"K" + tuple_data("1")
        decode_message(b"U" + struct.pack(">I", 1) + old_then_key)
    with pytest.raises(PgOutputError, match=r"Delete message .*bad old/key tuple tag 'N'"):
        decode_message(delete(1, b"N", "1"))


def test_negative_length() -> None:
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">i", -1)
    with pytest.raises(PgOutputError, match="declares -1 bytes"):
        decode_message(raw)


def test_invalid_utf8() -> None:
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">i", 2)
    with pytest.raises(PgOutputError, match="not valid UTF-8") as info:
        decode_message(raw + b"\xe5\x8c")  # half of 北
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_missing_string_terminator() -> None:
    with pytest.raises(PgOutputError, match=r"Origin message .*no NUL terminator"):
        decode_message(b"O" + struct.pack(">Q", 1) + b"name")


# --------------------------------------------------------------------------- LSN


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("16/B374D848", 0x16_B374_D848),
        ("0/1", 1),
        ("1/0", 1 << 32),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert str_to_lsn(text) == value
    assert lsn_to_str(value) == text
    assert str_to_lsn(lsn_to_str(value)) == value


def test_lsn_parsing_is_case_insensitive_and_output_upper() -> None:
    assert str_to_lsn("16/b374d848") == 0x16_B374_D848
    assert lsn_to_str(str_to_lsn("a/0000000b")) == "A/B"


@pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "G/1", "123456789/0", "1/2/3", " 1/2"])
def test_bad_lsn_string(bad: str) -> None:
    with pytest.raises(PgOutputError, match="not a PostgreSQL LSN"):
        str_to_lsn(bad)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_lsn_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="uint64"):
        lsn_to_str(bad)


# --------------------------------------------------------------------------- RelationCache


def _cache() -> RelationCache:
    cache = RelationCache()
    rel = decode_message(CUSTOMER_REL)
    cache.observe(rel)
    cache.observe(decode_message(begin(1, COMMIT_TIME, 2)))  # ignored
    return cache


def test_relation_cache_to_dict() -> None:
    cache = _cache()
    assert 16390 in cache and len(cache) == 1
    msg = decode_message(insert(16390, "42", "张三", "北京市朝阳区", None))
    assert isinstance(msg, Insert)
    assert cache.to_dict(msg.relation_id, msg.new) == {
        "customer_id": "42",
        "name": "张三",
        "address": "北京市朝阳区",
        "note": None,
    }
    assert cache.get(16390).name == "customer"


def test_relation_cache_replaces_after_ddl() -> None:
    cache = _cache()
    new_rel = decode_message(relation(16390, "crm", "customer", "f", [(1, "customer_id", 20, -1)]))
    assert isinstance(new_rel, Relation)
    cache.add(new_rel)
    assert cache.to_dict(16390, ("7",)) == {"customer_id": "7"}


def test_relation_cache_unknown_relation() -> None:
    with pytest.raises(PgOutputError, match="unknown relation id 99"):
        RelationCache().to_dict(99, ("1",))
    with pytest.raises(PgOutputError, match="unknown relation id 99"):
        RelationCache().get(99)


def test_relation_cache_unchanged_toast() -> None:
    cache = _cache()
    values = ("42", "张三", UNCHANGED_TOAST, NULL)
    assert has_unchanged_toast(values)
    expected = r"crm\.customer\.address: .*REPLICA IDENTITY FULL"
    with pytest.raises(UnchangedToastError, match=expected) as info:
        cache.to_dict(16390, values)
    assert info.value.column == "address"
    assert isinstance(info.value, PgOutputError)


def test_relation_cache_column_count_mismatch() -> None:
    with pytest.raises(PgOutputError, match="tuple has 2 columns, relation has 4"):
        _cache().to_dict(16390, ("1", "2"))


def test_relation_cache_binary_value() -> None:
    with pytest.raises(PgOutputError, match="binary-format value"):
        _cache().to_dict(16390, ("1", b"\x00", NULL, NULL))


# --------------------------------------------------------------------------- a transaction


def test_big_transaction_stream() -> None:
    cache = RelationCache()
    stream = [begin(0x20_0000_0000, COMMIT_TIME, 900), CUSTOMER_REL]
    stream += [insert(16390, str(i), "张三", "北京市朝阳区", None) for i in range(2000)]
    stream.append(commit(0x20_0000_0000, 0x20_0000_0030, COMMIT_TIME))
    rows = []
    for raw in stream:
        msg = decode_message(raw)
        cache.observe(msg)
        if isinstance(msg, Insert):
            rows.append(cache.to_dict(msg.relation_id, msg.new))
    assert len(rows) == 2000
    assert rows[-1]["customer_id"] == "1999"
    assert lsn_to_str(0x20_0000_0030) == "20/30"


# --------------------------------------------------------------------------- unchanged TOAST


def test_fill_unchanged_toast_from_full_old_tuple() -> None:
    # What PostgreSQL 15 really sends for REPLICA IDENTITY FULL when a TOASTed column is unchanged.
    big = "备注" * 5000
    msg = decode_message(
        update(16390, old=("42", "张三", "北京", big), new=("42", "李四", "北京", UNCHANGED_TOAST))
    )
    assert isinstance(msg, Update)
    filled = fill_unchanged_toast(msg.new, msg.old)
    assert filled == ("42", "李四", "北京", big)
    assert _cache().to_dict(16390, filled)["note"] == big


def test_fill_unchanged_toast_is_identity_without_markers() -> None:
    new = ("1", NULL)
    assert fill_unchanged_toast(new, None) is new


def test_fill_unchanged_toast_cannot_recover() -> None:
    with pytest.raises(PgOutputError, match="no matching old tuple"):
        fill_unchanged_toast(("1", UNCHANGED_TOAST), None)
    with pytest.raises(PgOutputError, match="no matching old tuple"):
        fill_unchanged_toast(("1", UNCHANGED_TOAST), ("1",))
    with pytest.raises(PgOutputError, match="old tuple too"):
        fill_unchanged_toast(("1", UNCHANGED_TOAST), ("1", UNCHANGED_TOAST))
