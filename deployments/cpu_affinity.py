"""One CPU for the threads of a CPU chat replica that take turns holding the GIL.

The engine's worker releases the GIL for every torch call and takes it back after; the replica's event loop takes
it for every request and every hand-off of increments. On two CPUs, each turn is a sleep on one and a wake-up
from the other, and a holder preempted by another process (the ingress, the load's clients) keeps the other
waiting. On one CPU a turn is a switch between two threads. Measured on this project's 2-core machine (`python
bench/chat.py --only glm --concurrency 16 --rates '' --repeat 1 --rounds 60`, alternating, three runs each):
3160 / 3160 / 3248 vs 2874 / 2900 / 2906 tokens/s; the engine's thread slept on the GIL ~35 times a second
instead of ~230 and ran 91% of the time instead of 84%.
"""

from __future__ import annotations

import os
from typing import NamedTuple


def usable_cpus() -> set[int]:
    """The CPUs the calling thread may run on (empty where the OS does not say)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def pin_to_one_cpu(slot: int) -> int | None:
    """Pin the calling thread, and every thread it starts from now on, to one of the CPUs this process may use:
    the `slot`-th, counted round (replicas sharing a node pass their local rank, so they take different CPUs).
    Returns the CPU; None where the OS cannot pin threads."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[slot % len(cpus)]
    os.sched_setaffinity(0, {cpu})  # 0: on Linux, the calling thread alone
    return cpu


class PrefillCpus(NamedTuple):
    """Where a pinned replica's prefill thread runs: a wave of short prompts, and a long prompt."""

    short_waves: set[int]
    long_prompts: set[int]


def cpus_for_prefill(pinned: int | None, cpus: set[int]) -> PrefillCpus | None:
    """Where the prefill thread of threads pinned to `pinned` goes (it shares their GIL; it inherits their pin from
    the thread that starts it, so it is placed explicitly): short waves on the pinned CPU, long prompts on every
    one of `cpus`. None when nothing is pinned: the thread then runs wherever its starter may.

    A pass over a wave of short prompts is mostly Python between small torch calls, holding the GIL the engine's
    decode steps wait for, so a second CPU gains it little. Confined to the other CPUs, it shared them with the
    serving path (the ingress, HAProxy, the clients), which preempted it while it held that GIL, and every
    hand-over of the GIL and of a prefilled wave crossed CPUs. Free to use every CPU, it ran mostly on the engine's
    (144 of 205 samples while runnable), and glm-serve streamed +11% (`python bench/chat.py --only engine --only
    glm --concurrency 16 --rates '' --repeat 1`, alternating, three pairs: 2649 / 2573 / 2626 vs 2431 / 2314 / 2289
    tokens/s). On the engine's CPU alone, the other left to the serving path, +1-6% more in each of six alternating
    pairs (`--only glm --concurrency 16 --rates '' --repeat 1 --rounds 8`, and 4 rounds at 16 and 32 streams), the
    engine's forward pass 4.38-4.60 ms on the wall instead of 4.52-4.98. A long prompt's passes are large matrix
    products that release the GIL, and there the second CPU counts: on the engine's CPU alone, 1,000-token prompts
    streamed 972 tokens/s instead of 1115 (`--prompt-tokens 1000`)."""
    if pinned is None or not cpus:
        return None
    return PrefillCpus(short_waves={pinned}, long_prompts=set(cpus))


def pin_thread(cpus: set[int]) -> None:
    """Pin the calling thread to `cpus` (of those this process may use); nothing where the OS cannot pin."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
