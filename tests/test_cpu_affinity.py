"""pin_to_one_cpu: the calling thread and the threads it starts keep to one CPU; the rest of the process does not."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from deployments.cpu_affinity import pin_to_one_cpu

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity on this OS")


def test_a_pinned_thread_and_the_threads_it_starts_keep_to_one_cpu() -> None:
    before = os.sched_getaffinity(0)
    seen: dict[str, Any] = {}

    def pinned() -> None:
        seen["cpu"] = pin_to_one_cpu(len(before) + 1)  # past the last CPU: counted round
        started = threading.Thread(target=lambda: seen.update(started=os.sched_getaffinity(0)))
        started.start()
        started.join()
        seen["itself"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    cpus = sorted(before)
    assert seen["cpu"] == cpus[(len(before) + 1) % len(cpus)]
    assert seen["itself"] == seen["started"] == {seen["cpu"]}
    assert os.sched_getaffinity(0) == before  # the test's own thread, started before the pin
