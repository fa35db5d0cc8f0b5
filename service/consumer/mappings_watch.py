"""Mappings reload without a restart (issue #12 item 6).

A running consumer asks its :class:`MappingsWatcher` once per loop iteration (``poll``). Every
``mappings_check_s`` (and at once after SIGHUP) the watcher looks at the file's metadata
(mtime, size, inode: a Kubernetes ConfigMap update swaps a symlink, which changes the inode);
only when that changed, and then stayed the same until the next check, does it read the bytes
and hash them (a file written in place, `cat > mappings.toml`, can be caught half-written, and
a half that parses, a [products] table cut short, would be applied; SIGHUP means "written":
read at once), and only a new hash is validated with ``Mappings.parse``:

- valid: it becomes the applied version (the caller swaps it into its stages) and is logged
  with the old and new version;
- invalid: refused, logged once per distinct bad content (the ``ConfigError`` names the file
  and the key), the old version stays applied, ``crm_erp_sync_mappings_reload_failing`` is 1
  and ``crm_erp_sync_mappings_reloads_total{outcome="refused"}`` counts it.

The version is the first 12 hex digits of the SHA-256 of the file's bytes: the same file gives
the same version on every host, so ``status`` can tell whether the group's members agree.
Each member reports its version here in the ERP, ``sync.consumers`` (one row per member,
refreshed every ``REPORT_INTERVAL_S``), which ``crm-erp-sync status`` reads; ``/metrics`` has
``crm_erp_sync_mappings_info{version="..."} 1``.

Hand-written rather than a file-watching library (watchdog, inotify): a poll of one file's
metadata every few seconds is portable, works across the symlink swap of a mounted ConfigMap
(inotify on the old path misses it), and needs no thread beside the consumer's loop.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import structlog

from service.erp.mappings import Mappings
from service.erp.units import release_registry
from service.errors import ConfigError, Retryable
from service.metrics import ConsumerMetrics
from service.pg import PgConn

log = structlog.get_logger("mappings")

VERSION_HEX_DIGITS: Final = 12
REPORT_INTERVAL_S: Final = 10.0
"""How often a member refreshes its row in ``sync.consumers`` (at once after a reload)."""
STALE_AFTER_S: Final = 60.0
"""A member row not refreshed for this long is taken for a stopped consumer by ``status``."""
FORGET_AFTER_S: Final = 86_400.0
"""Rows of stopped members older than this are deleted by the next report of their group."""


def mappings_version(content: bytes) -> str:
    """The version of a mappings file: 12 lower-case hex digits of its bytes' SHA-256."""
    return hashlib.sha256(content).hexdigest()[:VERSION_HEX_DIGITS]


def member_id() -> str:
    """``host:pid:random``: unique per consumer object (a process may run several)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A mappings file on disk that was refused: its version and why (file and key)."""

    version: str | None  # None when the file could not be read at all
    error: str


_Stat = tuple[int, int, int] | None
_NONE_PENDING: Final[_Stat] = (-1, -1, -1)  # no os.stat result looks like this


class MappingsWatcher:
    """The applied mappings and the file they came from; see the module docstring.

    ``clock`` (monotonic seconds) is injectable for tests. The constructor loads the file
    and raises ``ConfigError`` when it is invalid (a consumer does not start on a bad file).
    """

    def __init__(self, path: str | Path, *, check_interval_s: float = 5.0,
                 metrics: ConsumerMetrics | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self.metrics = metrics
        self._clock = clock or time.monotonic
        self._stat = self._stat_now()
        self._pending = _NONE_PENDING  # metadata seen changed at the last check, not yet read
        content = self._read()
        self.mappings = self._parse(content)
        self.version = mappings_version(content)
        self.loaded_at = datetime.now(UTC)
        self.refusal: Refusal | None = None
        self._requested = False
        self._next_check = self._clock() + check_interval_s
        self._report_dirty = True
        self._last_report = float("-inf")
        self._reporting = True
        self.member_id = member_id()
        if metrics is not None:
            metrics.mappings_info.labels(self.version).set(1)
            metrics.mappings_reload_failing.set(0)

    def request_reload(self) -> None:
        """Check the file at the next ``poll``, whatever its metadata says (SIGHUP).

        Safe in a signal handler: it only stores a flag."""
        self._requested = True

    def poll(self) -> Mappings | None:
        """Once per loop iteration; a clock read unless a check is due. Returns the new
        mappings when a changed, valid file was loaded (the caller must apply them), else
        None (nothing changed, changed since the last check only, or the file was refused
        and the old mappings stay). A change is read at the first check that finds the file
        as the check before it found it (so two checks after the write at most), or at once
        after ``request_reload``."""
        now = self._clock()
        forced = self._requested
        if not forced and now < self._next_check:
            return None
        self._requested = False
        self._next_check = now + self.check_interval_s
        stat = self._stat_now()
        if not forced and stat == self._stat:
            self._pending = _NONE_PENDING
            return None
        if not forced and stat != self._pending:  # changed: read once it stays so a check
            self._pending = stat
            return None
        self._pending = _NONE_PENDING
        self._stat = stat
        trigger = "SIGHUP" if forced else "file_changed"
        try:
            content = self._read()
        except ConfigError as exc:
            self._refuse(None, exc, trigger)
            return None
        version = mappings_version(content)
        if version == self.version:  # touched, or put back as it was
            self._clear_refusal()
            return None
        if not forced and self.refusal is not None and self.refusal.version == version:
            return None  # the same bad content: refused and logged already
        try:
            mappings = self._parse(content)
        except ConfigError as exc:
            self._refuse(version, exc, trigger)
            return None
        old = self.version
        self.mappings, self.version, self.loaded_at = mappings, version, datetime.now(UTC)
        self._clear_refusal()
        if self.metrics is not None:
            self.metrics.mappings_info.remove(old)
            self.metrics.mappings_info.labels(version).set(1)
            self.metrics.mappings_reloads.labels("applied").inc()
        self._report_dirty = True
        log.info("mappings_reloaded", file=str(self.path), old_version=old, version=version,
                 trigger=trigger)
        return mappings

    def _parse(self, content: bytes) -> Mappings:
        """``Mappings.parse`` of the file, then pint's unit registry released: it is needed
        only while a file is read and held ~2.6 MiB of the consumer for life (see
        :func:`service.erp.units.release_registry`). Raises what ``Mappings.parse`` raises."""
        try:
            return Mappings.parse(content, str(self.path))
        finally:
            release_registry()

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(self.path), f"cannot read the mappings file: "
                                              f"{exc.strerror or exc}") from exc

    def _stat_now(self) -> _Stat:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refuse(self, version: str | None, exc: ConfigError, trigger: str) -> None:
        # one line (status shows it in a row): every problem found, "; "-separated
        self.refusal = Refusal(version, "; ".join(f"{v}: {p}" for v, p in exc.problems))
        self._report_dirty = True
        if self.metrics is not None:
            self.metrics.mappings_reloads.labels("refused").inc()
            self.metrics.mappings_reload_failing.set(1)
        # The error names the file and the section.key; mappings hold no personal data.
        log.error("mappings_reload_refused", file=str(self.path), refused_version=version,
                  where=exc.variable, problem=exc.problem, kept_version=self.version,
                  trigger=trigger, problems=[f"{v}: {p}" for v, p in exc.problems])

    def _clear_refusal(self) -> None:
        if self.refusal is not None:
            self.refusal = None
            self._report_dirty = True
        if self.metrics is not None:
            self.metrics.mappings_reload_failing.set(0)

    # ---- the member's row in sync.consumers, read by `crm-erp-sync status` ----------------
    def report_due(self) -> bool:
        return self._reporting and (self._report_dirty or
                                    self._clock() - self._last_report >= REPORT_INTERVAL_S)

    def report(self, connect: Callable[[], PgConn], consumer_group: str) -> None:
        """Upsert this member's row (version, refusal, seen_at) in its own ERP transaction.

        Raises ``Retryable`` when the ERP is unreachable. An ERP whose schema predates the
        table (``setup`` not re-run), or a role without a grant on it, is logged once and not
        reported to again: the consumer runs on, ``status`` just does not list it."""
        conn = connect()
        refusal = self.refusal or Refusal(None, "")
        try:
            with conn.transaction():
                conn.execute(_UPSERT, {
                    "group": consumer_group, "member": self.member_id,
                    "host": socket.gethostname(), "pid": os.getpid(),
                    "file": str(self.path), "version": self.version,
                    "loaded_at": self.loaded_at, "refused_version": refusal.version,
                    "refused_error": refusal.error or None})
                conn.execute("DELETE FROM sync.consumers WHERE consumer_group = %s AND "
                             "seen_at < clock_timestamp() - make_interval(secs => %s)",
                             (consumer_group, FORGET_AFTER_S))
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege) as exc:
            self._reporting = False
            log.warning("mappings_version_not_reported", error=type(exc).__name__,
                        reason="the ERP has no sync.consumers table (run `crm-erp-sync setup`)"
                               " or the consumer's role may not write it (grant SELECT, "
                               "INSERT, UPDATE, DELETE on it)")
            return
        except psycopg.OperationalError as exc:
            raise Retryable(f"ERP: {type(exc).__name__}") from exc
        self._report_dirty = False
        self._last_report = self._clock()

    def forget(self, conn: PgConn | None, consumer_group: str) -> None:
        """On a clean stop: delete this member's row, so that ``status`` stops listing it at
        once (not after ``STALE_AFTER_S``). Best effort: an ERP that is gone is no error."""
        if conn is None or conn.closed or conn.broken or not self._reporting:
            return
        try:
            with conn.transaction():
                conn.execute("DELETE FROM sync.consumers WHERE consumer_group = %s "
                             "AND member_id = %s", (consumer_group, self.member_id))
        except psycopg.Error:  # the root class: whatever failed, the row goes stale anyway
            pass


_UPSERT = """
INSERT INTO sync.consumers (consumer_group, member_id, host, pid, mappings_file,
    mappings_version, mappings_loaded_at, refused_version, refused_error)
VALUES (%(group)s, %(member)s, %(host)s, %(pid)s, %(file)s, %(version)s, %(loaded_at)s,
    %(refused_version)s, %(refused_error)s)
ON CONFLICT (consumer_group, member_id) DO UPDATE SET
    mappings_file = EXCLUDED.mappings_file, mappings_version = EXCLUDED.mappings_version,
    mappings_loaded_at = EXCLUDED.mappings_loaded_at,
    refused_version = EXCLUDED.refused_version, refused_error = EXCLUDED.refused_error,
    seen_at = clock_timestamp()
"""


def live_members(conn: Any, consumer_group: str) -> list[dict[str, Any]]:
    """The group's members that reported within ``STALE_AFTER_S``, oldest first: member_id,
    host, pid, mappings_file, mappings_version, mappings_loaded_at, refused_version,
    refused_error, seen_s_ago (float seconds)."""
    cur = conn.execute(
        "SELECT member_id, host, pid, mappings_file, mappings_version, mappings_loaded_at, "
        "refused_version, refused_error, extract(epoch FROM clock_timestamp() - seen_at) "
        "FROM sync.consumers WHERE consumer_group = %s "
        "AND seen_at > clock_timestamp() - make_interval(secs => %s) ORDER BY started_at",
        (consumer_group, STALE_AFTER_S))
    names = ("member_id", "host", "pid", "mappings_file", "mappings_version",
             "mappings_loaded_at", "refused_version", "refused_error", "seen_s_ago")
    return [{**dict(zip(names, row, strict=True)), "seen_s_ago": float(row[8])}
            for row in cur.fetchall()]
