"""What the decode steps of an engine have cost so far: counters a benchmark reads twice and subtracts.

The serving path's share of a chat replica's time shows up in two ways: fewer sequences per step (a stream's next
request reaches the engine later than an in-process client's would) and slower steps (the replica's event loop and
the other processes on its CPU take turns with the forward pass). `rows / steps` is the first; the forward pass's
wall time against its thread's CPU time is the second: waiting (for the GIL, for the CPU) is their difference,
extra work (caches another process evicted, hand-overs of the GIL) is CPU time above what the engine alone spends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass
class DecodeTally:
    steps: int = 0
    rows: int = 0  # sequences decoded, summed over the steps
    forward_s: float = 0.0  # wall time in the model's forward passes
    forward_cpu_s: float = 0.0  # the worker thread's CPU time in them

    @contextmanager
    def forward(self, rows: int) -> Iterator[None]:
        """Time one decode step's forward pass over `rows` sequences (from the thread that runs it)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.forward_s += time.perf_counter() - wall
            self.forward_cpu_s += time.thread_time() - cpu
            self.steps += 1
            self.rows += rows

    def snapshot(self) -> dict[str, float]:
        return asdict(self)
