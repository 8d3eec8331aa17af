"""The benchmarks' measured windows (bench/_machine.py): the load clients share this process with everything the run
keeps, so a full garbage collection of it must not pause them mid-level."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _machine import frozen_heap


class _Node:
    def __init__(self) -> None:
        self.itself = self  # a cycle: only the collector frees it


def test_a_measured_window_keeps_the_collector_off_what_came_before_it_but_not_off_its_own_garbage() -> None:
    kept = [_Node() for _ in range(1000)]
    with frozen_heap():
        # Everything the process held at the start is out of the collector's reach for the window.
        assert gc.get_freeze_count() >= len(kept)
        _Node()  # garbage of the window itself
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0  # all back in reach once the window ends
    del kept
