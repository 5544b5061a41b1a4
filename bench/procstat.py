"""Figures from /proc for the benchmarks in bench/: CPU, memory and percentiles.

A process's stat fields (proc_stat), its descendants, the CPU of one process (cpu_seconds) and
of a process tree (tree_cpu), a KiB figure of a /proc file (proc_kib), PSS summed from
smaps_rollup (pss_kib) and PssSampler, a thread sampling a tree's peak PSS; percentile and
latencies_ms (nearest rank, in milliseconds) and cell (a table cell). bench/ is not a package:
scripts import this module as `procstat` (see common.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Iterable
from pathlib import Path

SAMPLE_EVERY = 0.2  # seconds between two PSS samples
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ----------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (so index 0 is `state`), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it, from the ppid of every process in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cpu_ticks(pid: int, *, reaped: bool = True) -> int:
    fields = proc_stat(pid)
    if fields is None:
        return 0
    return sum(int(value) for value in fields[11 : 15 if reaped else 13])


def cpu_seconds(pid: int, *, reaped: bool = True) -> float:
    """CPU seconds of one process (every thread), 0 when it is gone.

    utime + stime; with `reaped` also cutime + cstime, the time of its children that have
    exited and been reaped, so that a child that exits between two readings still counts.
    """
    return _cpu_ticks(pid, reaped=reaped) / CLK_TCK


def tree_cpu(root: int) -> tuple[float, int]:
    """CPU seconds of a process tree (utime+stime+cutime+cstime of each live member), its size."""
    pids = descendants(root)
    return sum(_cpu_ticks(pid) for pid in pids) / CLK_TCK, len(pids)


def proc_kib(path: str, key: str) -> int:
    """The KiB figure of the line starting with `key` in a /proc file, 0 if absent or gone."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def pss_kib(pids: Iterable[int]) -> int:
    """Proportional set size summed over `pids`, from /proc/<pid>/smaps_rollup, in KiB."""
    return sum(proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)


class PssSampler(threading.Thread):
    """Peak PSS of a process tree (re-read each time), sampled every 0.2 s and at the end.

    Also the first sample, when the peak came (seconds from the start), the most processes
    seen in the tree, and the CPU time of this thread.
    """

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.first_kib: int | None = None
        self.peak_kib = 0
        self.peak_at = 0.0
        self.samples = 0
        self.max_processes = 0
        self.cpu_s = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        cpu_start, started = time.thread_time(), time.monotonic()
        while True:
            halted = self._halt.is_set()
            pids = descendants(self.root)
            kib = pss_kib(pids)
            self.samples += 1
            self.max_processes = max(self.max_processes, len(pids))
            if self.first_kib is None:
                self.first_kib = kib
            if kib > self.peak_kib:
                self.peak_kib, self.peak_at = kib, time.monotonic() - started
            if halted:
                break
            self._halt.wait(SAMPLE_EVERY)
        self.cpu_s = time.thread_time() - cpu_start

    def finish(self) -> None:
        """Take one last sample and stop."""
        self._halt.set()
        self.join(10)


# -- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float, digits: int = 2) -> float | None:
    """Nearest-rank percentile in milliseconds, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
    return round(ordered[rank - 1] * 1000, digits)


def latencies_ms(
    values: list[float], digits: int = 2, *, mean: bool = False
) -> dict[str, float | None]:
    """p50, p99 and max (and with `mean` the mean) of durations in seconds, in milliseconds."""
    figures = {
        "p50": percentile(values, 0.50, digits),
        "p99": percentile(values, 0.99, digits),
        "max": percentile(values, 1.0, digits),
    }
    if mean:
        figures["mean"] = round(statistics.fmean(values) * 1000, digits) if values else None
    return figures


def cell(value: object) -> str:
    """A figure in a table: "-" for None."""
    return "-" if value is None else str(value)
