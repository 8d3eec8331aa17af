"""Processes found and ended by PID (psutil), never by name: other Ray clusters may run on the same machine.

psutil identifies a process by PID and creation time, so a PID the kernel reused is never signalled.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def descendants(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """`roots` and every process below them that is still alive, each once."""
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            if not root.is_running():
                continue
            found.setdefault(root.pid, root)
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(found.values())


def alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: only its parent's wait is missing)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.Error:
            continue
    return running


def kill(processes: Iterable[psutil.Process], timeout_s: float = 2.0) -> list[psutil.Process]:
    """SIGKILL them all at once, then wait up to `timeout_s`; returns those still alive after that."""
    targets = alive(processes)
    for process in targets:
        try:
            process.kill()
        except psutil.Error:
            continue
    _, survivors = psutil.wait_procs(targets, timeout=timeout_s)
    return alive(survivors)


def merge(*groups: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The union of several snapshots (a process seen in any of them, once)."""
    found: dict[int, psutil.Process] = {}
    for group in groups:
        for process in group:
            found.setdefault(process.pid, process)
    return list(found.values())
