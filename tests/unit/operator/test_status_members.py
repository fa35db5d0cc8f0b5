"""status.outside_group_line / pid_gone_here (newcomer8 N6): a consumer the broker does not
list is called running only while its reports keep coming; a SIGKILLed one is not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from service.operator.status import Member, outside_group_line, pid_gone_here


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
