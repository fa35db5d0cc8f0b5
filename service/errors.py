"""One exception root for the package; errors are control signals that carry identity.

Library errors (kafka-python, psycopg, fastavro) are translated at the boundary with
``raise ... from exc`` so callers only ever catch these classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class SyncError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SyncError):
    """A setting is missing or malformed; the message names the variable (or the file and
    key). ``problems``: every (variable, problem) found in one go, in the order found; the
    first is also ``variable``/``problem``. With several, str lists them one per line."""

    def __init__(self, variable: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((variable, problem), *more)
        super().__init__("\n".join(f"{v}: {p}" for v, p in self.problems))
        self.variable = variable
        self.problem = problem


class ErpNotSetUp(ConfigError):
    """The ERP (sync-state) database lacks a table or column of this version (exit 2): a new
    database nobody ran ``setup`` on, or one set up by an older version. ``missing`` names
    the object (``sync.breaker_trips table``); the message says what to run, for both."""

    def __init__(self, missing: str) -> None:
        super().__init__("CRM_ERP_SYNC_ERP_DSN", f"the ERP database has no {missing}: run "
                         "`crm-erp-sync setup` (idempotent) against it: a new ERP database "
                         "needs it before any consumer or command uses it, and one set up "
                         "by an older version needs it after the upgrade")


class ConfigProblems:
    """Gathers the ConfigErrors of one validation so that a file with several mistakes is
    reported in one go (one ConfigError listing all) rather than one fix-and-rerun at a
    time. Checks that depend on an earlier part being valid should be skipped when it was
    not (``clean_since``), so that one mistake is not reported again as its consequences."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, variable: str, problem: str) -> None:
        self.found.append((variable, problem))

    @contextmanager
    def gather(self) -> Iterator[None]:
        """Runs a check that raises ConfigError; its problems are kept, not raised."""
        try:
            yield
        except ConfigError as exc:
            self.found.extend(exc.problems)

    def clean_since(self, mark: int) -> bool:
        """No problem was added since ``mark`` (an earlier ``len(self.found)``)."""
        return len(self.found) == mark

    def raise_if_any(self) -> None:
        """Raises one ConfigError listing every problem gathered, if any."""
        if self.found:
            (variable, problem), *more = self.found
            raise ConfigError(variable, problem, more)


class StackUnavailable(SyncError):
    """The broker or a database cannot be reached."""


class BrokerUnreachable(StackUnavailable):
    """No Kafka broker answered within an operator command's bound (``BROKER_CHECK_S``): what
    needs the broker is unknown, what the databases say can still be shown."""


class DatabaseUnreachable(StackUnavailable):
    """No PostgreSQL server answered at the DSN's host and port, or it is starting up or
    shutting down: transient, a consumer retries it."""


class DatabaseAuthFailed(ConfigError):
    """The server answered but refused the DSN's user (password, pg_hba.conf, or no CONNECT
    privilege on the database): retrying cannot help."""


class DatabaseTlsFailed(ConfigError):
    """The server answers, but not over the TLS the DSN demands: it offers no TLS at all
    (``sslmode=require`` or stricter against a server with ``ssl=off``), its certificate
    did not verify against ``sslrootcert`` (``verify-ca``/``verify-full``), or the handshake
    failed. Retrying cannot help until the DSN or the server is fixed."""


class DatabaseMissing(ConfigError):
    """The server accepted the credentials but the DSN's database does not exist."""


class PrivilegeMissing(ConfigError):
    """PostgreSQL refused a statement for lack of a privilege (SQLSTATE 42501,
    ``psycopg.errors.InsufficientPrivilege``): retrying cannot help until someone grants it.
    ``what``: CRM or ERP; ``role``: the DSN's user; ``action``: what was refused, naming the
    object; ``fix``: the GRANT to run, or who must run the command instead. ``variable`` is
    the DSN's setting."""

    def __init__(self, variable: str, what: str, role: str, action: str, fix: str) -> None:
        super().__init__(variable, f"the {what} role {role} cannot {action}: {fix}")
        self.role = role
        self.action = action
        self.fix = fix


class PublicationNotRepaired(PrivilegeMissing):
    """The publication lacks a captured table or filters one otherwise than the source
    profile, and the role may not alter it (not the publication's and the table's owner,
    nor a superuser). ``drifts``: ``service.cdc.capture.PublicationDrift`` (table, the two
    filters as SQL text, the fix; never values). The producer stops capture on it (a source
    contract problem) instead of exiting; `setup` reports it as the PrivilegeMissing it is."""

    def __init__(self, missing: PrivilegeMissing, drifts: list[Any]) -> None:
        super().__init__(missing.variable, "CRM", missing.role, missing.action, missing.fix)
        self.drifts = list(drifts)


class CaptureBroken(SyncError):
    """The slot or publication the producer captured through is gone or was replaced
    (``service.cdc.slot_guard``): changes made meanwhile cannot be read. Capture stops until
    ``command`` (``crm-erp-sync resync``) ran. ``kind``: slot_dropped, slot_replaced,
    publication_dropped, publication_replaced, slot_lost. Names objects only, never a value."""

    def __init__(self, kind: str, detail: str, command: str) -> None:
        super().__init__(f"{kind}: {detail}. Recover with `{command}`")
        self.kind = kind
        self.detail = detail
        self.command = command


class SlotLost(CaptureBroken):
    """PostgreSQL removed WAL the replication slot still needed (max_slot_wal_keep_size):
    changes in the gap cannot be read any more; only a new snapshot can resync."""

    def __init__(self, slot: str) -> None:
        super().__init__(
            "slot_lost",
            f"replication slot {slot!r} is lost: PostgreSQL removed WAL it still needed, so "
            "changes it had not confirmed yet cannot be read (or restart the producer "
            "with CRM_ERP_SYNC_ON_SLOT_LOST=resnapshot for a new slot and full snapshot, then "
            "run `crm-erp-sync reconcile --repair` for rows deleted in the gap)",
            "crm-erp-sync resync")
        self.slot = slot


class Retryable(SyncError):
    """A transient failure: retry with backoff, pause the partition, never dead-letter."""


class ConnectionLost(Retryable):
    """The broker or a database went away (restart, kill, network): reconnect with backoff.

    Unlike other transient failures it makes ``/readyz`` answer 503 at once, with ``reason``
    (the exception class and what was lost, never a value).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Permanent(SyncError):
    """A failure no retry can fix: the message goes to the dead-letter topic.

    ``stage`` names the pipeline stage that failed (decode, transform, apply).
    """

    stage = "unknown"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeError(Permanent):
    """Bytes that are not our Avro single-object encoding, or do not match their schema."""

    stage = "decode"


class UnknownSchema(DecodeError):
    """The writer-schema fingerprint is not among the schemas in ``schemas/``."""

    def __init__(self, fingerprint: bytes) -> None:
        super().__init__(f"unknown writer schema fingerprint {fingerprint.hex()}")
        self.fingerprint = fingerprint


class MappingError(Permanent):
    """A value cannot be translated to the ERP's vocabulary; names the field.

    The message is ``"<field>: <reason>"``, or ``"<field>: line <line>: <reason>"`` for an
    order line's field (``lines.<field>``), ``line`` being the line's CRM key as text (an
    id, as ``trace`` takes it); ``dlq list --field`` matches the ``"<field>: "`` prefix.
    ``detail`` is the reason alone."""

    stage = "transform"

    def __init__(self, field: str, value: object, reason: str, *,
                 line: str | None = None) -> None:
        # The value is deliberately not rendered: it may be personal data.
        super().__init__(f"{field}: line {line}: {reason}" if line is not None
                         else f"{field}: {reason}")
        self.field = field
        self.value = value
        self.detail = reason
        self.line = line

    def in_line(self, line: str) -> MappingError:
        """The same failure named inside its order: the field under ``lines.`` (a product
        code's too, as quantity and unit price are), with the line's CRM key."""
        field = self.field if self.field.startswith("lines.") else f"lines.{self.field}"
        return MappingError(field, self.value, self.detail, line=line)


class ApplyError(Permanent):
    """The ERP refused the change in a way retries cannot fix (a constraint, say)."""

    stage = "apply"


class CaptureRejected(Permanent):
    """A CRM change that cannot become a valid event (a value Avro or Python cannot hold,
    an event over the broker's size limit, a change without its row): the producer turns it
    into a capture dead letter and moves on. ``column`` names the culprit when there is one;
    the reason never quotes a value."""

    stage = "capture"

    def __init__(self, reason: str, column: str | None = None) -> None:
        super().__init__(f"{column}: {reason}" if column else reason)
        self.column = column
        self.detail = reason


class UnrepresentableValue(CaptureRejected):
    """A column value with no counterpart in the event schema (NaN, infinity, a BC date):
    raised by the value converters, the column filled in by the decoder."""


def field_of(error: Permanent) -> str | None:
    """The field a failure is about, for log lines: a MappingError's field, a capture
    letter's column (names, never values); None for the others."""
    if isinstance(error, MappingError):
        return error.field
    if isinstance(error, CaptureRejected):
        return error.column
    return None


class TargetError(SyncError):
    """An ERP target (Tryton over JSON-RPC, say) failed a call; ``method`` names the call."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"{method}: {reason}")
        self.method = method


class TargetUnavailable(TargetError, Retryable):
    """Transient: the target cannot be reached, answered 5xx, timed out or reported a
    concurrent access; retrying the same call later can succeed."""


class TargetRefused(TargetError, ApplyError):
    """Permanent: the target's business rules refused the call (Tryton UserError,
    ValidationError, SQLConstraintError).

    ``detail`` is the target's own message for the dead letter; it may name records (a
    party's name), so ``str()`` and ``reason`` carry only the error class and the call.
    """

    def __init__(self, method: str, error_class: str, detail: str) -> None:
        TargetError.__init__(self, method, f"refused by the ERP ({error_class})")
        self.reason = f"{method}: refused by the ERP ({error_class})"
        self.error_class = error_class
        self.detail = detail


class InvalidMessage(SyncError):
    """A consumed message that must go to the dead-letter topic, with its identity."""

    def __init__(self, topic: str, partition: int, offset: int, cause: Permanent) -> None:
        super().__init__(f"{topic}[{partition}]@{offset}: {cause.stage}: {cause.reason}")
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.cause = cause


class PgOutputError(SyncError):
    """A pgoutput message that does not follow the documented format."""


class SourceContractError(SyncError):
    """The CRM no longer matches the source profile (a table, column or type the events need).

    Carries identity only (table, column, problem), never row values: capture stops with it
    rather than publish a wrong value.
    """

    def __init__(self, table: str, column: str, problem: str) -> None:
        self.table, self.column, self.problem = table, column, problem
        super().__init__(f"source contract broken: {table}.{column}: {problem}")


class SourceContractBroken(SourceContractError):
    """Capture stops: a captured table breaks the source contract now (service.cdc.contract).

    ``violations`` are ``service.cdc.contract.Violation`` (table, column, problem, fix SQL;
    never values); the first gives the message. The producer does not exit on it: it stays
    up, not ready, and re-checks the table with backoff until it is fixed.
    """

    def __init__(self, violations: list[Any]) -> None:
        first = violations[0]
        super().__init__(first.table, first.column, first.problem)
        self.violations = list(violations)
        self.fix = first.fix


class UnresolvedReference(SyncError):
    """A row names another entity by key (a line's order or product) that cannot be found."""

    def __init__(self, table: str, column: str, entity: str) -> None:
        self.table, self.column, self.entity = table, column, entity
        super().__init__(f"{table}.{column}: the {entity} it names is not in the CRM")


class CaptureStoppedAtTruncate(SyncError):
    """Capture stopped before a TRUNCATE of a captured CRM table, as
    CRM_ERP_SYNC_ON_TRUNCATE=stop asks; the slot is not advanced past it. Carries identity
    only (tables, commit LSN)."""

    def __init__(self, tables: list[str], commit_lsn: str) -> None:
        self.tables, self.commit_lsn = tables, commit_lsn
        super().__init__(
            f"capture stopped before TRUNCATE of {', '.join(tables)} (commit LSN {commit_lsn})"
            " because CRM_ERP_SYNC_ON_TRUNCATE=stop: set CRM_ERP_SYNC_ON_TRUNCATE=propagate "
            "(mark the ERP rows deleted) or skip (keep them), then restart the producer")
