"""Output for operators: aligned tables (CJK-aware widths), JSON, a progress line."""

from __future__ import annotations

import dataclasses
import json
import sys
import unicodedata
from base64 import b64encode
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO


def jsonable(value: Any) -> Any:
    """Plain JSON types for dataclasses, datetimes, decimals and bytes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + b64encode(value).decode()
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), ensure_ascii=False, indent=2)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def when(value: datetime) -> str:
    """An instant as operators read it: ``2026-11-29 07:30:00+0000``, always in UTC with the
    offset, whatever zone the database session that read it runs in (a CRM database may be
    set to Asia/Shanghai, the ERP's to another zone). A naive value is printed as it is."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S%z")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], max_width: int = 60) -> str:
    texts = [[cell(v) for v in row] for row in rows]
    texts = [[t if _width(t) <= max_width else t[: max_width - 1] + "…" for t in row]
             for row in texts]
    widths = [max([_width(h)] + [_width(r[i]) for r in texts]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v + " " * (w - _width(v)) for v, w in zip(values, widths, strict=True))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in texts]
    return "\n".join(s.rstrip() for s in out)


class Progress:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            text = f"\r{self.label} [{bar}] {self.done}/{self.total} {note}"
        else:
            text = f"\r{self.label} {self.done} {note}"
        self.stream.write(text[:120].ljust(80))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()
