"""Long CRM transactions (issue #11 item 8): an idle-in-transaction session holding an xid pins
the slot; `status` and the producer's /metrics name it (pid, age, state; never its query) and
`status` needs attention (exit 1) once it is older than the configured threshold, and no more
once the session ends. On the SQL transport the peek's cost is shown and judged too.

The CRM cluster is shared: another session's transaction may be older than ours for a while,
so the checks are about our session's pid."""

from __future__ import annotations

from typing import Any

import psycopg

from service.settings import Settings
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running

THRESHOLD_S = 5.0


def _pinning_items(st: Any, pid: int) -> list[str]:
    return [a for a in st.json["attention"] if f"CRM transaction pid {pid} " in a]


def _capturing(sync_env: SyncEnv) -> bool:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                          (sync_env.settings.slot_name,)).fetchone()
        pending = crm.execute("SELECT count(*) FROM crm_erp_sync.snapshots "
                              "WHERE state = 'pending'").fetchone() if row == (1,) else None
    return row == (1,) and pending == (0,)


def _oldest_labels(producer: Any) -> set[tuple[str, str]]:
    return {(s.labels["pid"], s.labels["state"])
            for metric in producer.metrics.oldest_xact.collect() for s in metric.samples
            if s.value == 1}


def test_an_idle_transaction_is_named_and_needs_attention_over_the_threshold_until_it_ends(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.with_(pinning_xact_max_s=THRESHOLD_S)
    producer = running.start_producer(settings)
    wait_until(lambda: _capturing(sync_env), message="slot and initial snapshot")

    with psycopg.connect(settings.crm_dsn) as idle:
        idle.execute("SELECT txid_current()")  # holds an xid; stays idle in transaction
        pid = idle.info.backend_pid
        early = cli(settings, "status", "--json")
        ox = early.json["oldest_transaction"]
        if ox is not None and ox["pid"] == pid and ox["age_s"] < THRESHOLD_S:
            assert not _pinning_items(early, pid)  # shown, not yet a concern

        def over() -> Any:
            st = cli(settings, "status", "--json")
            return st if st.code == 1 and _pinning_items(st, pid) else None

        st = wait_until(over, timeout=90, interval=0.5,
                        message="status exit 1 naming the idle transaction")
        assert st.json["oldest_transaction"]["pid"] == pid
        assert st.json["oldest_transaction"]["state"] == "idle in transaction"
        assert st.json["oldest_transaction"]["age_s"] > THRESHOLD_S
        [item] = _pinning_items(st, pid)
        assert "idle in transaction" in item and "pg_terminate_backend" in item
        assert "txid_current" not in st.out  # never the query text
        text = cli(settings, "status")
        assert text.code == 1 and f"pid {pid} (idle in transaction" in text.out
        assert "txid_current" not in text.out
        # /metrics: the producer reports it too
        wait_until(lambda: (str(pid), "idle in transaction") in _oldest_labels(producer),
                   timeout=30, message="the producer's oldest_transaction metric")
        assert producer.metrics.oldest_xact_age._value.get() > 0
        idle.rollback()

    after = cli(settings, "status", "--json")
    assert not _pinning_items(after, pid)
    assert (after.json["oldest_transaction"] or {}).get("pid") != pid
    assert after.code == (1 if after.json["attention"] else 0)
    wait_until(lambda: (str(pid), "idle in transaction") not in _oldest_labels(producer),
               timeout=30, message="the metric forgets the ended transaction")


def test_sql_peek_cost_is_shown_and_judged(sync_env: SyncEnv, cli: Cli,
                                           running: Running) -> None:
    settings: Settings = sync_env.with_(capture_transport="sql", sql_peek_max_s=0.000001)
    producer = running.start_producer(settings)
    wait_until(lambda: _capturing(sync_env), message="slot and initial snapshot")
    wait_until(lambda: producer.metrics.peek_seconds._value.get() > 0, timeout=30,
               message="the producer's peek cost metric")

    def judged() -> Any:
        st = cli(settings, "status", "--json")
        return st if st.json["peek"] is not None else None

    st = wait_until(judged, timeout=30, interval=0.5, message="status shows the peek cost")
    assert st.json["peek"]["peek_s"] > 0 and st.json["peek"]["backoff_s"] >= 0
    assert st.code == 1
    assert any(a.startswith("each SQL peek of the slot takes") for a in st.json["attention"])
    assert "SQL peek:" in cli(settings, "status").out
    relaxed = cli(sync_env.with_(capture_transport="sql", sql_peek_max_s=60.0),
                  "status", "--json")
    assert not any(a.startswith("each SQL peek") for a in relaxed.json["attention"])
