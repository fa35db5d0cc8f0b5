"""CPU time and peak memory of processes on this machine, from ``/proc`` (Linux).

Why our own code: psutil would do (``cpu_times()``, ``memory_full_info()``), but the benchmarks
need four numbers per process (user + system ticks from ``/proc/<pid>/stat``, ``VmHWM`` from
``/proc/<pid>/status``, ``Pss`` from ``/proc/<pid>/smaps_rollup``) and one reset
(``/proc/<pid>/clear_refs``), which do not earn a dependency. Parsing is kept in pure
functions so it is unit-tested without processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces and parentheses itself,
    so fields are counted after its last ``)``: utime and stime are fields 14 and 15.
    Raises ValueError on text that is not a stat line."""
    close = stat.rfind(")")
    if close < 0:
        raise ValueError("not a /proc/<pid>/stat line")
    fields = stat[close + 2:].split()
    if len(fields) < 13:
        raise ValueError("not a /proc/<pid>/stat line")
    return int(fields[11]) + int(fields[12])


def status_kib(status: str, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``…) in KiB, None if absent
    (kernel threads have no Vm* lines)."""
    prefix = f"{key}:"
    for line in status.splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix):].split()[0])
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far; 0.0 once it is gone."""
    try:
        return stat_cpu_ticks((PROC / str(pid) / "stat").read_text()) / CLK_TCK
    except (OSError, ValueError):
        return 0.0


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def peak_rss_mib(pid: int) -> float:
    """Peak resident set (``VmHWM``) of a process in MiB since it started or since
    :func:`reset_peak_rss`; 0.0 once it is gone."""
    try:
        kib = status_kib((PROC / str(pid) / "status").read_text(), "VmHWM")
    except OSError:
        return 0.0
    return (kib or 0) / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size (``Pss`` of ``/proc/<pid>/smaps_rollup``, Linux 4.14+) in MiB:
    private pages whole, each shared page (libpython, libssl, libpq…) divided by the number
    of processes mapping it, so PSS summed over processes counts shared pages once where RSS
    counts them in every process. 0.0 once the process is gone or not readable. The kernel
    keeps no PSS high-water mark: a peak is the largest of samples (see bench.compare)."""
    try:
        kib = status_kib((PROC / str(pid) / "smaps_rollup").read_text(), "Pss")
    except OSError:
        return 0.0
    return (kib or 0) / 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's ``VmHWM`` to its current RSS (``5`` into ``clear_refs``, Linux 4.0+),
    so that a later :func:`peak_rss_mib` is the peak of a phase. False when not permitted."""
    try:
        (PROC / str(pid) / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def listening_inodes(tcp_table: str, port: int) -> set[int]:
    """Socket inodes listening on `port` in the text of ``/proc/net/tcp`` or ``tcp6``."""
    inodes: set[int] = set()
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: TCP_LISTEN
            inodes.add(int(inode))
    return inodes


def listening_pid(port: int) -> int | None:
    """The process listening on a TCP port of this machine (the broker's JVM), None when it
    is not found or not readable (another user's process without privileges)."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            inodes |= listening_inodes((PROC / "net" / name).read_text(), port)
        except OSError:
            continue
    targets = {f"socket:[{inode}]" for inode in inodes}
    if not targets:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    return int(entry.name)
            except OSError:
                continue  # that descriptor closed meanwhile (a JVM opens and closes many)
    return None
