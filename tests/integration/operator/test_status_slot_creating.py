"""`status` while the producer is blocked creating its slot: a logical slot's creation waits
for every transaction holding an xid anywhere in the CRM's cluster when it began (here one in
another database, the ERP's), and its confirmed_flush_lsn is NULL meanwhile. Status says the
slot is being created (never "None bytes") and needs attention once that lasts, naming the
oldest transaction; it does not say OK while the producer cannot make progress."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running


def _creating(sync_env: SyncEnv) -> bool:
    with sync_env.crm() as crm:
        row = crm.execute("SELECT confirmed_flush_lsn IS NULL FROM pg_replication_slots "
                          "WHERE slot_name = %s", (sync_env.settings.slot_name,)).fetchone()
    return row == (True,)


def test_status_flags_a_producer_blocked_creating_its_slot(sync_env: SyncEnv, cli: Cli,
                                                           running: Running) -> None:
    settings = sync_env.settings
    with psycopg.connect(settings.erp_dsn) as other:  # another database of the cluster
        other.execute("SELECT txid_current()")  # holds an xid; stays idle in transaction
        pid = other.info.backend_pid
        running.start_producer(settings)
        wait_until(lambda: _creating(sync_env), timeout=60, message="slot creation to begin")

        def flagged() -> Any:
            st = cli(settings, "status")
            return st if st.code == 1 and "still being created" in st.out else None

        # status.SLOT_CREATING_MAX_S (10 s) after the creation began, with room for a slow CI
        st = wait_until(flagged, timeout=60, interval=1.0,
                        message="status to flag the slot being created")
        assert _creating(sync_env)  # still blocked by our transaction
        assert "None bytes" not in st.out
        assert f"slot {settings.slot_name}: being created for " in st.out
        assert "\nOK" not in st.out and "NEEDS ATTENTION" in st.out
        [item] = [line for line in st.out.splitlines() if "still being created" in line]
        assert "the producer captures nothing until then" in item
        if f"pid {pid}," in item:  # the cluster is shared: an older transaction may lead
            assert "database " + settings.erp_dsn.rsplit("/", 1)[-1].split("?")[0] in item
        other.rollback()
    # Once the transaction ended, the slot exists and nothing about creating remains.
    wait_until(lambda: not _creating(sync_env), timeout=120, message="slot created")
    st = cli(settings, "status")
    assert "being created" not in st.out
