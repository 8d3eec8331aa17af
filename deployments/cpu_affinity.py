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


def cpus_for_helper(pinned: int | None, cpus: set[int]) -> set[int] | None:
    """Where a helper of the pinned threads goes (a prefill thread, which shares their GIL): every one of `cpus`,
    the pinned CPU too. It inherits the pin from the thread that starts it, so it is set free explicitly.

    Confined to the other CPUs, it shared them with the serving path (the ingress, HAProxy, the clients), which
    preempted it while it held the GIL the engine waited for, and every hand-over of the GIL and of a prefilled wave
    crossed CPUs. Free to use both, it ran mostly on the engine's CPU (144 of 205 samples while runnable), and the
    engine's decode steps got shorter: 4.28-4.44 ms on the wall instead of 4.80-5.13, of which 3.50-3.61 ms of its
    CPU instead of 3.78-4.01. Measured on this project's 2-core machine, `python bench/chat.py --only engine --only
    glm --concurrency 16 --rates '' --repeat 1`, alternating, three pairs: 2649 / 2573 / 2626 vs 2431 / 2314 / 2289
    tokens/s through glm-serve (+11%), 0.82 / 0.85 / 0.84 vs 0.73 / 0.73 / 0.74 of the engine alone, TTFT p50 52 /
    57 / 55 vs 76 / 67 / 100 ms; with `--rounds 8`, four pairs: +7%, 0.80 / 0.80 / 0.78 / 0.82 vs 0.75 / 0.76 / 0.78
    / 0.77. Long prompts (`--prompt-tokens 1000`, two pairs) within the noise both ways.
    None when nothing is pinned: the helper then runs wherever its starter may."""
    if pinned is None or not cpus:
        return None
    return set(cpus)


def pin_thread(cpus: set[int]) -> None:
    """Pin the calling thread to `cpus` (of those this process may use); nothing where the OS cannot pin."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
