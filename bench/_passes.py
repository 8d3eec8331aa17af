"""Several passes of one benchmark, servers measured in turn: this VM's speed drifts by several percent within an
hour, so two servers measured minutes apart in one pass compare better with each other than with the same server
in another pass. A level reports its median pass, and a target the median of the passes' ratios."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from typing import Any


def add_passes_option(parser: argparse.ArgumentParser, servers: str) -> None:
    def passes(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of passes (1 or more)")
        return int(text)

    parser.add_argument(
        "--passes",
        type=passes,
        default=1,
        help=f"measure {servers} this many times, in turn: each level shows its median pass, each target the "
        "median of the passes' ratios (default 1)",
    )


def median_levels(tables: list[dict[str, Any]], figure: str) -> dict[str, Any]:
    """One server's levels over the passes (each table: level key -> level): per level, the pass with the median
    `figure` (of an even number, the lower middle one), every pass's figure under `passes`, and the non-200
    answers of every pass."""
    merged: dict[str, Any] = {}
    for key in tables[0]:
        levels = sorted((table[key] for table in tables), key=lambda level: level.get(figure) or 0.0)
        median = dict(levels[(len(levels) - 1) // 2])
        median["passes"] = [table[key].get(figure) for table in tables]
        refused: Counter[str] = Counter()
        for level in levels:
            refused.update(level.get("non_200", {}))
        median["non_200"] = dict(refused)
        merged[key] = median
    return merged


def merge_passes(passes: list[dict[str, Any]], figure: str) -> dict[str, Any]:
    """The servers' figures over the passes (each pass: server -> its figures): each server's levels (its "load"
    and "at_rate" tables) at their median passes by `figure`; its other figures from the first pass."""
    merged: dict[str, Any] = {}
    for server in dict.fromkeys(server for found in passes for server in found):
        runs = [found[server] for found in passes if server in found]
        merged[server] = dict(runs[0])
        for table in ("load", "at_rate"):
            tables = [run[table] for run in runs if table in run]
            if len(tables) > 1:
                merged[server][table] = median_levels(tables, figure)
    if len(passes) > 1:
        merged["passes"] = passes
    return merged


def median_targets(per_pass: list[dict[str, Any]]) -> dict[str, Any]:
    """Each target (name -> {ratio, target}) with the median of the passes' ratios; None if a pass has none."""
    out: dict[str, Any] = {}
    for name, first in per_pass[0].items():
        ratios = [found.get(name, {}).get("ratio") for found in per_pass]
        known = [r for r in ratios if r is not None]
        out[name] = dict(first, ratio=statistics.median(known) if len(known) == len(per_pass) else None)
        if len(per_pass) > 1:
            out[name]["passes"] = ratios
    return out


def passes_note(target: dict[str, Any]) -> str:
    """What a target line adds when there were several passes: each one's ratio."""
    ratios = target.get("passes")
    if not ratios:
        return ""
    return " (passes: " + " / ".join("-" if r is None else f"{r:.2f}" for r in ratios) + ")"
