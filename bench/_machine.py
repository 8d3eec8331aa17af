"""How busy the machine is while a benchmark measures, and a deliberate CPU hog to measure a slower machine.

Figures taken while something outside the benchmark used the CPU are not figures of ours: each benchmark level
runs inside a `CpuWindow`, and one where other processes used more than a threshold (20% by default) is measured
again or reported as disturbed. `cpu_hog(n)` starts n busy loops as children of the benchmark: their CPU counts as
the benchmark's own (they are wanted), and on a 2-core machine two of them halve what the server gets, i.e. a
machine about twice as slow, which is what a rated load must still be served on without refusals. Before each
level, `settle()` waits for the machine to go quiet; `run_record()` heads each benchmark's JSON (when, the command,
the machine and how busy it was at the start).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

FOREIGN_MAX_PCT = 20.0


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks of it and its reaped children) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # utime + stime + cutime + cstime: a child that exited and was waited for counts in its parent.
        table[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def descendants(ancestor: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """`ancestor` and every process below it."""
    table = table if table is not None else _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours, stack = set(), [ancestor]
    while stack:
        pid = stack.pop()
        ours.add(pid)
        stack.extend(children.get(pid, []))
    return ours


def _our_ticks() -> int:
    """CPU ticks used so far by this process and all its descendants (servers, Ray, the limit child, hogs)."""
    table = _proc_table()
    return sum(table.get(pid, (0, 0))[1] for pid in descendants(os.getpid(), table))


def _machine_ticks() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(interval_s: float = 1.0) -> float:
    """Share of all CPUs busy over the next interval_s (from /proc/stat), 0-100."""
    busy0, total0 = _machine_ticks()
    time.sleep(interval_s)
    busy1, total1 = _machine_ticks()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def settle(max_wait_s: float = 30.0, threshold: float = 15.0) -> float:
    """Wait (up to max_wait_s) until the machine is quiet; return the last busy % seen.

    Figures taken while something else runs (another test suite, a server still busy with the previous load)
    are not comparable: this records how quiet it was, so the JSON says which figures to distrust."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def machine_busy() -> str:
    """One line on how busy the machine is right now."""
    load1 = os.getloadavg()[0]
    return f"load1={load1:.2f} cpu_busy={cpu_busy():.0f}%"


def run_record() -> dict[str, Any]:
    """What a benchmark's JSON starts with: when, the command, and the machine as it was before measuring."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "busy_at_start": machine_busy(),
        },
    }


def cpu_probe_ms() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 3): a machine-speed check taken before each measurement.

    The machine is a VM: its speed drifts by tens of percent with nothing of ours running, and this shows it."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sum(i * i for i in range(300_000))
        best = min(best, time.perf_counter() - t0)
    return best * 1000


class CpuWindow:
    """Busy % of the whole machine over a window, and the part of it that was not this benchmark."""

    def __enter__(self) -> CpuWindow:  # noqa: PYI034
        self._busy0, self._total0 = _machine_ticks()
        self._ours0 = _our_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, total1 = _machine_ticks()
        ours1 = _our_ticks()
        total = max(1, total1 - self._total0)
        self.busy_pct = 100.0 * (busy1 - self._busy0) / total
        # Ticks of processes that exited inside the window are lost on both sides; clamp at 0.
        self.foreign_pct = max(0.0, 100.0 * ((busy1 - self._busy0) - (ours1 - self._ours0)) / total)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """A measured window in which the garbage collector leaves this process's older objects alone. The load clients
    run in this process, so a full collection of everything the run had kept (its earlier passes' results) paused
    every stream's reading mid-level, and the server measured took the blame: in the third of three passes of
    `bench/chat.py --only glm --only peer --concurrency 16,32 --rates '' --repeat 1 --passes 3`, a 214 ms
    collection in the client gave glm-serve a gap p99 of 230 ms instead of 68-81 ms."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def reported(level: dict[str, Any], figure: str) -> float | None:
    """A measured level's figure, or None when other processes used the CPU while it was measured (`disturbed`):
    such figures stay in the JSON, never in a table or a ratio."""
    return None if level.get("disturbed") else level.get(figure)


def hog_note(results: dict[str, Any]) -> str | None:
    """The line a table starts with when the run had busy loops beside it."""
    if not results.get("cpu_hog"):
        return None
    return f"  (with {results['cpu_hog']} busy loop(s) beside the servers: a machine about that much slower)"


@contextmanager
def cpu_hog(processes: int) -> Iterator[list[int]]:
    """`processes` busy loops (children of this process) for the block; yields their PIDs. 0: none."""
    # Each loop also ends on its own once its parent is gone, should the benchmark be killed outright.
    loop = f"import os\nwhile os.getppid() == {os.getpid()}:\n    for _ in range(200_000): pass"
    hogs = [
        subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.DEVNULL) for _ in range(processes)
    ]
    try:
        yield [hog.pid for hog in hogs]
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def add_hog_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hog",
        type=int,
        default=0,
        metavar="N",
        help="N busy loops beside everything measured (on 2 cores, 2 make a machine about twice as slow)",
    )


def hog_until_closed(processes: int) -> ExitStack:
    """`cpu_hog(processes)` from now until the returned stack is closed, or the interpreter exits however the
    benchmark ends (each loop also ends with this process)."""
    hogs = ExitStack()
    atexit.register(hogs.close)
    hogs.enter_context(cpu_hog(processes))
    return hogs
