"""Avro contract between producer and consumer: the schemas in ``schemas/`` and the wire format.

Wire format: Avro single-object encoding (spec, "Single object encoding"):
``C3 01`` + the writer schema's CRC-64-AVRO fingerprint (8 bytes, little-endian) + the body.
fastavro has no helper for it; the fingerprint is computed once per schema because it is slow.

Layout: ``schemas/<kind>/v<N>.avsc``. Every released version stays; the producer writes the
newest, the consumer reads any known version and resolves it into the newest.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import (
    SchemaParseException,
    UnknownType,
    fingerprint,
    to_parsing_canonical_form,
)

from service.errors import ConfigError, DecodeError, UnknownSchema
from service.upcast import UPCASTERS

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


@dataclass(frozen=True)
class SchemaVersion:
    kind: str
    version: int
    parsed: Any
    fingerprint: bytes
    path: Path


def schema_fingerprint(parsed: Any) -> bytes:
    # fastavro returns the CRC-64-AVRO value as little-endian hex already.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


@dataclass(frozen=True)
class _Tagging:
    """Which values of a record ``SchemaRegistry.encode`` hands to fastavro as ``(record
    name, value)``: ``unions`` are the fields typed ``["null", <one named record>]`` (field,
    full record name), ``arrays`` the fields typed as an array of records that have such
    fields themselves (an order's ``lines``), with their items' tagging."""

    unions: tuple[tuple[str, str], ...]
    arrays: tuple[tuple[str, _Tagging], ...]


def _tagging(record: Any, named: dict[str, Any]) -> _Tagging | None:
    """The tagging of a parsed record schema; None when it has nothing to tag."""
    unions: list[tuple[str, str]] = []
    arrays: list[tuple[str, _Tagging]] = []
    for f in record.get("fields", []):
        ftype = f["type"]
        if isinstance(ftype, list) and len(ftype) == 2 and ftype[0] == "null":
            branch = ftype[1]
            if isinstance(branch, dict) and branch.get("type") == "record":
                unions.append((f["name"], branch["name"]))
            elif isinstance(branch, str) and branch in named:
                unions.append((f["name"], branch))
        elif isinstance(ftype, dict) and ftype.get("type") == "array":
            items = ftype["items"]
            items = named.get(items, items) if isinstance(items, str) else items
            if isinstance(items, dict) and items.get("type") == "record":
                inner = _tagging(items, named)
                if inner is not None:
                    arrays.append((f["name"], inner))
    if not unions and not arrays:
        return None
    return _Tagging(tuple(unions), tuple(arrays))


def _tagged(record: dict[str, Any], tagging: _Tagging) -> dict[str, Any]:
    """A shallow copy of ``record`` with its record-or-null values tagged (see _Tagging);
    ``record`` and its nested values are not changed."""
    out = dict(record)
    for name, branch in tagging.unions:
        value = out.get(name)
        if isinstance(value, dict):
            out[name] = (branch, value)
    for name, inner in tagging.arrays:
        items = out.get(name)
        if isinstance(items, list) and items:
            out[name] = [_tagged(item, inner) if isinstance(item, dict) else item
                         for item in items]
    return out


class SchemaRegistry:
    """Every schema version found in ``schemas/``, by kind and by fingerprint."""

    def __init__(self, versions: list[SchemaVersion]) -> None:
        self._by_fingerprint = {v.fingerprint: v for v in versions}
        self._latest: dict[str, SchemaVersion] = {}
        for v in sorted(versions, key=lambda v: v.version):
            self._latest[v.kind] = v
        self._tagging = {v.fingerprint: _tagging(v.parsed, v.parsed.get("__named_schemas", {}))
                         for v in self._latest.values()}

    @classmethod
    def load(cls, directory: Path) -> SchemaRegistry:
        versions = []
        for path in sorted(directory.glob("*/v*.avsc")):
            try:
                version = int(path.stem[1:])
                parsed = fastavro.parse_schema(json.loads(path.read_text("utf-8")))
            except (ValueError, KeyError, SchemaParseException, UnknownType) as exc:
                raise ConfigError(str(path), f"not a valid versioned Avro schema: {exc}") from exc
            versions.append(
                SchemaVersion(path.parent.name, version, parsed, schema_fingerprint(parsed), path)
            )
        if not versions:
            raise ConfigError(str(directory), "no schemas found (expected <kind>/v<N>.avsc)")
        return cls(versions)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._latest)

    def latest(self, kind: str) -> SchemaVersion:
        try:
            return self._latest[kind]
        except KeyError:
            raise ConfigError("schemas", f"no schema for event kind {kind!r}") from None

    def encode(self, kind: str, record: dict[str, Any]) -> bytes:
        """The record in single-object encoding with the newest schema of ``kind``.

        Fields typed ``["null", <record>]`` (an event's ``before``/``after``, and a line's in
        an order's ``lines``) are handed to fastavro as ``(record name, value)``: fastavro
        then writes that branch directly instead of validating the value against each branch
        first, which took about 40% of the encoding (a capture burst spent a fifth of the
        producer's time here); for an order event with lines, tagging the lines too took
        another quarter off. A value that does not fit still raises fastavro's
        TypeError/ValueError while writing. ``record`` is not changed."""
        writer = self.latest(kind)
        tagging = self._tagging.get(writer.fingerprint)
        if tagging is not None:
            record = _tagged(record, tagging)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(writer.fingerprint)
        fastavro.schemaless_writer(buf, writer.parsed, record)
        return buf.getvalue()

    def writer_of(self, data: bytes) -> SchemaVersion:
        if data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (missing C3 01 marker)")
        if len(data) < HEADER_LEN:
            raise DecodeError(f"truncated header: {len(data)} bytes, need {HEADER_LEN}")
        fp = bytes(data[2:HEADER_LEN])
        try:
            return self._by_fingerprint[fp]
        except KeyError:
            raise UnknownSchema(fp) from None

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Decode with the writer's schema, resolved into the newest schema of its kind.

        A writer from before a breaking version (a different record name: v1's demo rows vs
        v2's canonical events) is read with its own schema and upcast (``service.upcast``).
        """
        writer = self.writer_of(data)
        reader = self._latest[writer.kind]
        if writer.parsed["name"] != reader.parsed["name"]:
            upcast = UPCASTERS.get((writer.kind, writer.version))
            if upcast is None:
                raise DecodeError(f"{writer.kind} v{writer.version}: no upcast to "
                                  f"v{reader.version}")
            _kind, record = self._read(data, writer, writer)
            try:
                return writer.kind, upcast(record)
            except (KeyError, TypeError) as exc:
                raise DecodeError(f"{writer.kind} v{writer.version}: cannot upcast: "
                                  f"{type(exc).__name__}") from exc
        return self._read(data, writer, reader)

    def _read(self, data: bytes, writer: SchemaVersion, reader: SchemaVersion
              ) -> tuple[str, dict[str, Any]]:
        body = io.BytesIO(data[HEADER_LEN:])
        try:
            record = fastavro.schemaless_reader(
                body,
                writer.parsed,
                None if reader is writer else reader.parsed,
            )
        except Exception as exc:  # fastavro raises many types for corrupt bodies
            raise DecodeError(
                f"body does not match writer schema {writer.kind} v{writer.version}: "
                f"{type(exc).__name__}"
            ) from exc
        if not isinstance(record, dict):
            raise DecodeError(f"{writer.kind}: body is not a record")
        if body.tell() != len(data) - HEADER_LEN:
            raise DecodeError(f"{writer.kind} v{writer.version}: trailing bytes after the body")
        return writer.kind, record
