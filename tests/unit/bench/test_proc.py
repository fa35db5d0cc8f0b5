"""The benchmarks' /proc parsing and peak-memory reset (bench/proc.py)."""

from __future__ import annotations

import os
import time

import pytest

from bench.proc import (
    CLK_TCK,
    cpu_seconds,
    listening_inodes,
    peak_rss_mib,
    pss_mib,
    reset_peak_rss,
    stat_cpu_ticks,
    status_kib,
)

# A postgres backend's stat line; its command name holds spaces and a parenthesis.
STAT = ("4242 (postgres: sync crm (x) idle) S 31 4242 4242 0 -1 4194560 1093 0 0 0 "
        "250 37 0 0 20 0 1 0 1187233 229339136 3380 18446744073709551615 1 1 0 0 0 0 "
        "4194304 19935232 536888839 0 0 0 17 1 0 0 0 0 0")


def test_cpu_ticks_are_utime_plus_stime_counted_after_the_command_name() -> None:
    assert stat_cpu_ticks(STAT) == 250 + 37


@pytest.mark.parametrize("text", ["", "4242 postgres S 1 2 3", "4242 (x) S 1 2"])
def test_text_that_is_not_a_stat_line_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        stat_cpu_ticks(text)


def test_status_fields_in_kib_and_absent_ones() -> None:
    status = "Name:\tjava\nVmPeak:\t 4000000 kB\nVmHWM:\t  524288 kB\nVmRSS:\t  400000 kB\n"
    assert status_kib(status, "VmHWM") == 524288
    assert status_kib(status, "VmRSS") == 400000
    assert status_kib("Name:\tkthreadd\nState:\tS (sleeping)\n", "VmHWM") is None


def test_this_process_has_cpu_time_and_a_peak_rss_that_a_reset_can_lower() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.monotonic() + 10
    while cpu_seconds(os.getpid()) < before + 2 / CLK_TCK:  # burn two clock ticks
        assert time.monotonic() < deadline, "CPU time did not grow in 10 s of spinning"
        sum(range(10_000))
    ballast = bytearray(64 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page: resident
    with_ballast = peak_rss_mib(os.getpid())
    del ballast
    if not reset_peak_rss(os.getpid()):
        pytest.skip("clear_refs is not writable here")
    assert peak_rss_mib(os.getpid()) < with_ballast - 32


def test_this_process_has_a_pss_that_counts_its_private_pages_and_is_at_most_its_rss() -> None:
    before = pss_mib(os.getpid())
    if before == 0.0:
        pytest.skip("smaps_rollup is not readable here")
    ballast = bytearray(64 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # private, resident: counted whole in PSS
    assert pss_mib(os.getpid()) > before + 48
    assert pss_mib(os.getpid()) <= peak_rss_mib(os.getpid())
    del ballast


def test_a_process_that_is_gone_counts_nothing() -> None:
    gone = 2**22 + 1  # above the default pid_max
    assert cpu_seconds(gone) == 0.0
    assert peak_rss_mib(gone) == 0.0
    assert pss_mib(gone) == 0.0
    assert reset_peak_rss(gone) is False


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4AA4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 91234 1 0
   1: 0100007F:4AA4 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 91240 1 0
   2: 0100007F:3C50 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 55555 1 0
"""


def test_only_listening_sockets_on_the_port_are_found() -> None:
    assert listening_inodes(TCP, 0x4AA4) == {91234}  # 19108; the connected one is not listening
    assert listening_inodes(TCP, 15440) == {55555}
    assert listening_inodes(TCP, 1) == set()
