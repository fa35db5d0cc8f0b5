"""status.outside_group_line / pid_gone_here (newcomer8 N6): a consumer the broker does not
list is called running only while its reports keep coming; a SIGKILLed one is not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

from service.operator.status import (
    Member,
    hung_producer_line,
    outside_group_line,
    pid_gone_here,
    producer_silent_after_s,
    silent_member_line,
)
from service.settings import Settings


def member(age_s: float) -> Member:
    return Member("crm-erp-sync-consumer-vm-6928", "vm", [], "m-1", False, 6928, age_s,
                  None, "abc", 0)


def test_a_fresh_report_says_when_it_was_made_and_that_a_running_consumer_rejoins() -> None:
    line = outside_group_line(member(4.2), "g", 10.0, pid_gone=False)
    assert line.startswith("consumer crm-erp-sync-consumer-vm-6928 (host vm, pid 6928) "
                           "reported 4s ago that it is NOT in group g")
    assert "rejoins by itself" in line and "is running" not in line


def test_a_consumer_that_missed_its_reports_is_stopped_or_stuck_not_running() -> None:
    line = outside_group_line(member(18.6), "g", 5.0, pid_gone=False)
    assert "not seen for 19s (it reports every 5s): stopped or stuck" in line
    assert "running" not in line and "rejoins by itself" not in line


def test_a_consumer_whose_pid_is_gone_on_this_host_no_longer_runs() -> None:
    line = outside_group_line(member(3.0), "g", 10.0, pid_gone=True)
    assert "no longer runs (pid 6928 is gone on this host" in line
    assert "rejoins by itself" not in line and "is running" not in line


def test_pid_gone_here_only_for_a_dead_pid_on_this_host() -> None:
    here = socket.gethostname()
    assert not pid_gone_here(here, os.getpid())
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)  # exited and reaped by run()
    assert pid_gone_here(here, dead)
    assert not pid_gone_here(here + "-elsewhere", dead)  # another host's pid: unknown
    assert not pid_gone_here(here, None)


def test_a_frozen_consumer_the_broker_dropped_is_not_said_to_have_reported_being_out() -> None:
    """newcomer9 nit: a SIGSTOPped consumer's last report said "in group"; once the broker
    drops it, it did not *report* being out: it stopped reporting."""
    frozen = replace(member(18.0), reported_in_group=True)
    line = outside_group_line(frozen, "g", 10.0, pid_gone=False)
    assert "reported 18s ago that it is NOT in group" not in line
    assert "NOT in group g as the broker lists it" in line
    assert "stopped reporting" in line and "(18s ago; it reports every 10s) said it was" in line
    out = replace(member(4.0), reported_in_group=False)  # it did say so itself
    assert "reported 4s ago that it is NOT in group g" in outside_group_line(
        out, "g", 10.0, pid_gone=False)


def test_a_silent_member_is_named_with_its_partitions_their_lag_and_where_to_look() -> None:
    stuck = Member("crm-erp-sync-consumer-vm-8094", "vm", ["s[2]", "m[0]"], "m-1", True, 8094,
                   132.0, None, "abc", 0, True)
    line = silent_member_line(stuck, "g", 30.0, 10.0, {"s[2]": 101, "s[0]": 0})
    assert line.startswith("consumer crm-erp-sync-consumer-vm-8094 (host vm, pid 8094) is in "
                           "group g but has not reported from its loop for 2 min (over 30s")
    assert "s[2] (lag 101), m[0]" in line
    assert "pg_stat_activity" in line and "/readyz" in line


def test_the_producer_silence_bound_covers_a_broker_flush_and_has_a_floor() -> None:
    assert producer_silent_after_s(Settings()) == 6 * Settings().heartbeat_interval_s + 1.0
    assert producer_silent_after_s(Settings(heartbeat_interval_s=0.5)) == 30.0


def test_a_hung_producer_is_named_with_its_session_and_the_way_out() -> None:
    holder = {"pid": 4711, "application_name": "", "client": "10.0.0.5:51000",
              "backend_start": datetime(2026, 11, 30, 5, 30, tzinfo=UTC), "state": "idle",
              "wait_event_type": "Client", "wait_event": "ClientRead", "silent_s": 95.0}
    line = hung_producer_line(holder, "crm_slot", False, 61.0)
    assert ("CRM backend pid 4711, client 10.0.0.5:51000, connected 2026-11-30 05:30:00+0000"
            in line)
    assert "has not used its session for 95s (idle; " in line and "over 61s" in line
    assert "ClientRead" not in line  # idle: waiting for its client is what idle means
    assert "slot crm_slot has no active reader" in line
    assert "pg_terminate_backend(4711)" in line and "standby takes over" in line
