"""Prometheus metrics of one process, in a registry of its own (not the global one), so that
several producers and consumers can live in one process (the tests do) without clashing.

Names follow Prometheus conventions (``_total`` counters, base units: seconds, bytes). The
metrics worth alerting on, and thresholds, are in the README's "Deployment" section.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "crm_erp_sync"
CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_KIND = "unknown"  # a message that could not be decoded has no kind

# Batches take milliseconds to seconds; the delay from a CRM commit to the ERP commit is
# sub-second when all is well, minutes when something is behind.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
                 3600.0)


class ProcessMetrics:
    """What every long-running process has: its registry and a loop-iteration timestamp."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.up = Gauge(f"{PREFIX}_up", "1 while the process runs, labelled with its role",
                        ["role"], registry=self.registry)
        self.up.labels(role).set(1)
        self.last_loop = Gauge(f"{PREFIX}_last_loop_timestamp_seconds",
                               "Unix time of the main loop's last iteration",
                               registry=self.registry)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class ConsumerMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__("consume")
        r = self.registry
        self.consumed = Counter(f"{PREFIX}_events_consumed", "Events taken from Kafka and "
                                "processed in a committed batch", ["topic", "kind"], registry=r)
        self.applied = Counter(f"{PREFIX}_events_applied", "Events applied to the ERP",
                               ["topic", "kind"], registry=r)
        self.held = Counter(f"{PREFIX}_events_held", "Events held back (their customer is not "
                            "in the ERP yet, or their key is blocked by a dead letter)",
                            ["topic", "kind"], registry=r)
        self.dead_lettered = Counter(f"{PREFIX}_events_dead_lettered", "Events sent to the "
                                     "dead-letter topic", ["topic", "kind", "stage"], registry=r)
        self.batch_duration = Histogram(f"{PREFIX}_apply_batch_duration_seconds",
                                        "Time to apply one batch to the ERP (one transaction)",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.end_to_end = Histogram(f"{PREFIX}_end_to_end_delay_seconds",
                                    "From the CRM commit (event source.commit_time) to the ERP "
                                    "commit that applied the event", ["topic"],
                                    buckets=DELAY_BUCKETS, registry=r)
        self.lag = Gauge(f"{PREFIX}_consumer_lag", "Messages behind the partition's high "
                         "watermark, per assigned partition", ["topic", "partition"], registry=r)
        self.assigned = Gauge(f"{PREFIX}_consumer_assigned_partitions",
                              "Partitions assigned to this group member", registry=r)
        self.open_dead_letters = Gauge(f"{PREFIX}_dead_letters_open", "Dead letters not yet "
                                       "redriven or discarded (open or failed again)",
                                       registry=r)
        self.retries = Counter(f"{PREFIX}_transient_failures", "Batches retried after a "
                               "transient failure", registry=r)
        self.events_lost = Counter(f"{PREFIX}_events_lost", "Offsets deleted from the topic "
                                   "(retention, delete-records) before the group applied "
                                   "them: skipped, recorded in sync.offset_gaps until "
                                   "`crm-erp-sync reconcile --repair`", ["topic", "partition"],
                                   registry=r)
        self.breaker_open = Gauge(f"{PREFIX}_breaker_open", "1 while the dead-letter circuit "
                                  "breaker keeps this partition paused (until `crm-erp-sync "
                                  "resume`)", ["topic", "partition"], registry=r)
        self.breaker_trips = Counter(f"{PREFIX}_breaker_trips", "Times this consumer tripped "
                                     "the dead-letter circuit breaker of a partition",
                                     ["topic", "partition"], registry=r)
        self.group_member = Gauge(f"{PREFIX}_group_member", "1 while the broker lists this "
                                  "consumer as a member of its group, 0 while it is outside "
                                  "(it rejoins by itself)", registry=r)
        self.group_rejoins = Counter(f"{PREFIX}_group_rejoins", "Times this consumer found "
                                     "itself outside its group and rejoined", registry=r)
        self.paused = Gauge(f"{PREFIX}_partition_paused", "1 while an operator's `crm-erp-sync "
                            "pause` keeps this partition paused", ["topic", "partition"],
                            registry=r)
        # The mappings file (service/consumer/mappings_watch.py): which version is applied,
        # and whether a newer file was refused.
        self.mappings_info = Gauge(f"{PREFIX}_mappings_info", "1 for the mappings file "
                                   "version this consumer applies (version: the first 12 hex "
                                   "digits of the SHA-256 of the file's bytes)", ["version"],
                                   registry=r)
        self.mappings_reloads = Counter(f"{PREFIX}_mappings_reloads", "Changed mappings files "
                                        "read by a running consumer, by outcome: applied, or "
                                        "refused (invalid; the loaded version is kept)",
                                        ["outcome"], registry=r)
        self.mappings_reload_failing = Gauge(f"{PREFIX}_mappings_reload_failing", "1 while "
                                             "the mappings file on disk is refused (invalid) "
                                             "and an older version is applied", registry=r)
        # Protecting the ERP (CRM_ERP_SYNC_APPLY_WINDOW, _APPLY_MAX_RATE).
        self.apply_window_open = Gauge(f"{PREFIX}_apply_window_open", "1 while changes may "
                                       "be applied (inside CRM_ERP_SYNC_APPLY_WINDOW, or no "
                                       "window set), 0 while every partition is paused until "
                                       "the window opens", registry=r)
        self.apply_throttled = Counter(f"{PREFIX}_apply_throttled_seconds", "Seconds this "
                                       "consumer waited because CRM_ERP_SYNC_APPLY_MAX_RATE "
                                       "was spent", registry=r)
        # Written by `crm-erp-sync reconcile` into sync.reconcile_runs, exported by every
        # consumer (service/operator/reconcile.py, read every 60 s).
        self.drift = Gauge(f"{PREFIX}_reconcile_drift", "Keys that differ between CRM and "
                           "ERP as the last `crm-erp-sync reconcile` found them, by entity and "
                           "kind (missing, extra, differing, unmappable, held)",
                           ["entity", "kind"], registry=r)
        self.reconcile_last = Gauge(f"{PREFIX}_reconcile_last_run_timestamp_seconds",
                                    "Unix time at which the last `crm-erp-sync reconcile` "
                                    "finished (0: never)", registry=r)
        self.reconcile_last_drift = Gauge(f"{PREFIX}_reconcile_last_run_drift", "Keys "
                                          "drifting in total in the last reconcile run "
                                          "(held keys not counted)", registry=r)
        self._lag_labels: set[tuple[str, str]] = set()

    def count(self, counter: Counter, items: Iterable[tuple[str, ...]]) -> None:
        """Increment by label tuple, one call per distinct tuple (cheap for big batches)."""
        for labels, n in Tally(items).items():
            counter.labels(*labels).inc(n)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        current = {(t, str(p)) for t, p in lags}
        for gone in self._lag_labels - current:
            self.lag.remove(*gone)
        for (topic, partition), value in lags.items():
            self.lag.labels(topic, str(partition)).set(value)
        self._lag_labels = current
        self.assigned.set(len(lags))


class ProducerMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__("produce")
        r = self.registry
        self.published = Counter(f"{PREFIX}_events_published", "Events acknowledged by the "
                                 "broker", ["topic", "kind"], registry=r)
        self.transactions = Counter(f"{PREFIX}_transactions_published", "CRM transactions "
                                    "whose events were all acknowledged", registry=r)
        self.active = Gauge(f"{PREFIX}_producer_active", "1 while this producer holds the "
                            "capture lock, 0 while it stands by", registry=r)
        self.retained_wal = Gauge(f"{PREFIX}_slot_retained_wal_bytes", "WAL the replication "
                                  "slot keeps on the CRM server (current LSN - restart_lsn)",
                                  registry=r)
        self.unconfirmed_wal = Gauge(f"{PREFIX}_slot_unconfirmed_wal_bytes", "WAL not yet "
                                     "published and confirmed (current LSN - "
                                     "confirmed_flush_lsn)", registry=r)
        self.safe_wal = Gauge(f"{PREFIX}_slot_safe_wal_bytes", "WAL the CRM can still write "
                              "before the slot is in danger of losing WAL (pg_replication_slots"
                              ".safe_wal_size); -1 when max_slot_wal_keep_size is unlimited",
                              registry=r)
        self.slot_wal_danger = Gauge(
            f"{PREFIX}_slot_wal_in_danger", "1 while the slot is about to lose WAL: wal_status "
            "unreserved, or safe_wal_size under 20% of max_slot_wal_keep_size "
            "(service.ops.slot_wal_danger)", registry=r)
        self.retries = Counter(f"{PREFIX}_transient_failures", "Producer steps retried after "
                               "a transient failure", registry=r)
        self.capture_dead_letters = Counter(
            f"{PREFIX}_capture_dead_letters", "CRM changes that could not become an event "
            "and went to the dead-letter topic (stage capture)", ["table", "error"],
            registry=r)
        self.truncates = Counter(
            f"{PREFIX}_crm_truncates", "TRUNCATEs of captured CRM tables, by what became of "
            "them (CRM_ERP_SYNC_ON_TRUNCATE): propagated, skipped, stopped", ["table",
                                                                            "outcome"],
            registry=r)
        self.capture_stopped = Gauge(
            f"{PREFIX}_capture_stopped", "1 while capture is stopped before a TRUNCATE "
            "(CRM_ERP_SYNC_ON_TRUNCATE=stop)", registry=r)

        # Long transactions (issue #11 item 8): what pins the slot, and what a peek costs.
        self.oldest_xact_age = Gauge(f"{PREFIX}_oldest_transaction_age_seconds", "Age of the "
                                     "oldest CRM transaction holding an xid (it pins the "
                                     "slot's restart_lsn); 0 when none", registry=r)
        self.oldest_xact = Gauge(f"{PREFIX}_oldest_transaction_info", "1 for the oldest CRM "
                                 "transaction holding an xid: its backend pid (empty for a "
                                 "prepared transaction) and state; never its query",
                                 ["pid", "state"], registry=r)
        self.peek_seconds = Gauge(f"{PREFIX}_sql_peek_seconds", "What the last "
                                  "pg_logical_slot_peek_binary_changes took (SQL transport: "
                                  "it re-decodes the WAL since restart_lsn)", registry=r)
        self.peek_backoff = Gauge(f"{PREFIX}_sql_peek_backoff_seconds", "The wait after the "
                                  "last empty peek (longer when peeks are expensive)",
                                  registry=r)
        self._oldest_labels: tuple[str, str] | None = None
        self.contract_violations = Gauge(
            f"{PREFIX}_source_contract_violations", "1 while a captured table breaks the "
            "source contract on this column ('*': the table itself) and capture is stopped",
            ["table", "column"], registry=r)

    def set_oldest_transaction(self, xact: dict[str, object] | None) -> None:
        labels = None if xact is None else (
            "" if xact["pid"] is None else str(xact["pid"]), str(xact["state"]))
        if self._oldest_labels is not None and self._oldest_labels != labels:
            self.oldest_xact.remove(*self._oldest_labels)
        if labels is not None:
            self.oldest_xact.labels(*labels).set(1)
        self._oldest_labels = labels
        age = 0.0 if xact is None else xact["age_s"]
        self.oldest_xact_age.set(age if isinstance(age, float) else 0.0)

    def count_published(self, items: Iterable[tuple[str, str]]) -> None:
        for (topic, kind), n in Tally(items).items():
            self.published.labels(topic, kind).inc(n)
