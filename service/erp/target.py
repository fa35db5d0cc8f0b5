"""The consumer's apply stage talks to an ERP through one interface, ``ErpTarget``.

Two targets implement it (``CRM_ERP_SYNC_ERP_TARGET``):
- ``sql`` (the default, :mod:`service.erp.sql_target`): the project's own schema
  (``service/erp/schema.sql``) in the sync-state database itself, written in the consumer's
  transaction, so ERP rows, held events, dead letters and positions commit together.
- ``tryton`` (:mod:`service.erp.tryton_target`): a Tryton server over JSON-RPC. Its writes
  cannot share the sync-state transaction; every step is keyed and monotonic instead, and
  positions live in the sync-state database (README "Guarantees per target").

The sync-state database is ``CRM_ERP_SYNC_ERP_DSN`` for both: ``sync.*`` (held events, dead
letters, breaker; ``service/erp/sync_schema.sql``) lives there; with the ``sql`` target the
``erp.*`` tables too (`setup` creates them for that target only).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from service.erp.changes import ErpChange, OrderCurrency
from service.erp.mappings import Mappings
from service.errors import ConfigError, ErpNotSetUp
from service.pg import PgConn
from service.settings import Settings


class Status(enum.StrEnum):
    APPLIED = "applied"
    STALE = "stale"      # at or below the position the target holds: nothing done
    HELD = "held"        # waits for something else (the customer): retry later
    REFUSED = "refused"  # the ERP cannot take it: dead letter with the reason


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one change did. ``reason`` is ours (safe to log); ``detail`` is the ERP's own
    message when it refused a call (it may name records: for the dead letter, not logs)."""

    kind: str  # "customer" | "order" | "market_demand"
    key: str
    status: Status
    reason: str | None = None
    detail: str | None = None


# In a ``view``: True when the ERP holding no record of the key is what the CRM asks for (an
# order cancelled before it reached an ERP that only creates live sales).
ABSENT_OK = "_absent_ok"

# Kinds `read` knows: the reconcile entities.
KINDS = ("customer", "order", "market_demand")


@dataclass(frozen=True, slots=True)
class LastApplied:
    """When the target last applied a change (`status`): all None before the first one.

    ``applied_at``: the newest apply; ``crm_commit_time``: the newest CRM commit applied;
    ``seconds_since``: seconds from ``applied_at`` to now (the database's clock);
    ``end_to_end_delay_s``: seconds from CRM commit to apply of the newest change that was
    not a snapshot row (None when unknown)."""

    applied_at: datetime | None = None
    crm_commit_time: datetime | None = None
    seconds_since: float | None = None
    end_to_end_delay_s: float | None = None

    @classmethod
    def from_rows(cls, last: Sequence[Any] | None, delay: Sequence[Any] | None
                  ) -> LastApplied:
        """From a target's two queries: ``last`` = (max applied_at, max CRM commit time,
        seconds since; None when nothing was applied), ``delay`` = (seconds,) of the newest
        non-snapshot change, or None."""
        if last is None:
            return cls()
        return cls(last[0], last[1], float(last[2]) if last[2] is not None else None,
                   float(delay[0]) if delay and delay[0] is not None else None)


class ErpTarget(Protocol):
    """Where the consumer applies changes. Implementations are used by one thread.

    Transaction hooks: ``attach`` is called (inside a transaction on ``conn``) whenever the
    consumer (re)connects to the sync-state database; ``apply``, ``present_customers`` and
    ``order_currencies`` are called inside the consumer's open transaction on that
    connection. The ``sql`` target writes through it (atomic with the sync state); others
    ignore it.

    Errors: ``apply`` and ``read`` raise ``Retryable`` subclasses (TargetUnavailable,
    psycopg's transient errors) when the whole batch should be retried, and ``SyncError``
    for configuration problems; a change the ERP refuses is an Outcome, not an exception.
    """

    name: str
    kinds: tuple[str, ...]  # the kinds this target keeps (reconcile checks only these)
    # Why `stock recount` has nothing to recount with this target (None: the sync keeps the
    # ERP's stock totals itself and recounts them).
    stock_unavailable: str | None

    def attach(self, conn: PgConn) -> None: ...

    def use_mappings(self, mappings: Mappings) -> None:
        """The mappings file was reloaded: map with this one from now on (``attach`` follows,
        and may raise ConfigError when the ERP's state disagrees with it)."""
        ...

    def apply(self, changes: Sequence[ErpChange]) -> list[Outcome]:
        """One Outcome per change, in order."""
        ...

    def present_customers(self, keys: Iterable[str]) -> set[str]:
        """The CRM customer keys the ERP holds (deleted/inactive included)."""
        ...

    def order_currencies(self, keys: Iterable[str]) -> dict[str, OrderCurrency]:
        """CRM order key -> the order's currency as the ERP holds it (ISO 4217 code, and
        the position of the newest change applied to it), for the orders it holds
        (deleted/cancelled included; an order it does not hold is absent). One round trip
        to the ERP for all the keys, inside the consumer's open transaction (the lines-only
        events of a batch are checked against it). Raises as ``apply``."""
        ...

    def read(self, kind: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """key -> what the ERP holds for it, as ``view(kind, mapped)`` spells it, plus
        ``deleted`` (bool) and ``position`` ((lsn, seq) or None when unknown)."""
        ...

    def view(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """The mapped field values (``reconcile``'s "expected") as this ERP can compare them."""
        ...

    def live_keys(self, kind: str, after: str | None, limit: int) -> list[str]:
        """Keys the ERP holds live, in ascending order, after ``after`` (keyset pages)."""
        ...

    def mark_deleted(self, kind: str, positions: dict[str, tuple[int, int] | None]
                     ) -> list[str]:
        """Mark ERP rows whose CRM row is gone deleted, each only if it still has the
        position compared (a newer event wins); returns the keys marked."""
        ...

    def close(self) -> None: ...

    # ---- operator reads (`status`, `trace`, `stock recount`, `reconcile --repair`) ---------
    # ``conn`` is a connection to the sync-state database (autocommit); nothing is written.

    def last_applied(self, conn: PgConn) -> LastApplied:
        """When this target last applied a change, from where it keeps its positions."""
        ...

    def key_records(self, conn: PgConn, key: str, orders: Sequence[str]
                    ) -> list[dict[str, Any]]:
        """What the ERP holds for the CRM key ``key`` (`trace`): the record keyed by it (a
        customer, an order, a demand signal), the orders of a customer with that key, and
        for ``orders`` (the orders an order line ``key`` belongs to) those orders and the
        line. Each {"table": where it is, "as": what it is to the key, "row": its values
        with ``source_lsn``, ``source_seq``, ``event_id``, ``applied_at`` (None when no
        position is stored) and ``deleted``, and ``record`` (a short text naming the
        record: id, state) where the table alone does not}. The rows hold personal data:
        for the operator's screen only."""
        ...

    def not_set_up(self, conn: PgConn) -> ErpNotSetUp | None:
        """Why a consumer would refuse to start on this ERP (exit 2): a table or column of
        this version that `setup` creates or adds is missing (an ERP set up by an older
        version); None when nothing is. `status` names it. Reads only."""
        ...

    def unretired_extra(self, kind: str) -> str | None:
        """None when ``mark_deleted`` retires records of ``kind`` the CRM no longer has;
        otherwise the sentence `reconcile --repair` prints before such keys (what the
        operator does about them: the target leaves them by design)."""
        ...


TARGETS = ("sql", "tryton")


def make_target(settings: Settings, mappings: Mappings | None) -> ErpTarget:
    """The target ``settings.erp_target`` names. ``mappings`` None: a target for the
    operator reads alone (``last_applied``, ``key_records``, ``stock_unavailable``), which
    need no mappings file (a broken one must not stop an operator looking); ``attach``
    then raises ConfigError. Raises ConfigError for an unknown name or missing Tryton
    settings (``Settings.validate`` checks them too)."""
    if settings.erp_target == "sql":
        from service.erp.sql_target import SqlTarget

        return SqlTarget(settings, mappings)
    if settings.erp_target == "tryton":
        from service.erp.tryton_target import TrytonErpTarget

        return TrytonErpTarget.from_settings(settings)
    raise ConfigError(Settings.env_var("erp_target"), f"must be one of {', '.join(TARGETS)}")
