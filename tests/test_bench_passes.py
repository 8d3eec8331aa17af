"""`--passes N` of the benchmarks: each level reports its median pass, each target the median of the passes' ratios
(bench/_passes.py), so one pass that the VM slowed does not decide a target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from _passes import median_levels, median_targets, merge_passes, passes_note


def test_a_target_is_the_median_of_the_passes_ratios() -> None:
    per_pass = [
        {"glm / peer": {"ratio": 0.92, "target": 1.0}},
        {"glm / peer": {"ratio": 1.01, "target": 1.0}},
        {"glm / peer": {"ratio": 1.00, "target": 1.0}},
    ]
    (target,) = median_targets(per_pass).values()
    assert target == {"ratio": 1.00, "target": 1.0, "passes": [0.92, 1.01, 1.00]}
    assert passes_note(target) == " (passes: 0.92 / 1.01 / 1.00)"


def test_a_pass_without_a_figure_leaves_the_target_unreported() -> None:
    per_pass = [{"glm / peer": {"ratio": 0.9, "target": 1.0}}, {"glm / peer": {"ratio": None, "target": 1.0}}]
    assert median_targets(per_pass)["glm / peer"]["ratio"] is None


def test_a_level_shows_its_median_pass_and_every_passes_refusals() -> None:
    tables = [
        {"c32": {"tokens_per_s": 300.0, "ttft_p50_ms": 70, "non_200": {"503": 1}}},
        {"c32": {"tokens_per_s": 100.0, "ttft_p50_ms": 90, "non_200": {}}},
        {"c32": {"tokens_per_s": 200.0, "ttft_p50_ms": 80, "non_200": {"503": 2, "500": 1}}},
    ]
    level = median_levels(tables, "tokens_per_s")["c32"]
    assert (level["tokens_per_s"], level["ttft_p50_ms"]) == (200.0, 80)  # one pass's figures, not a mix
    assert level["passes"] == [300.0, 100.0, 200.0]
    assert level["non_200"] == {"503": 3, "500": 1}


def test_a_server_keeps_its_first_pass_figures_beside_its_median_levels() -> None:
    passes = [
        {
            "glm": {"startup_s": 9.0, "load": {"c32": {"tokens_per_s": 3.0}}},
            "peer": {"skipped": "venv missing"},
        },
        {
            "glm": {"startup_s": 7.0, "load": {"c32": {"tokens_per_s": 1.0}}},
            "peer": {"skipped": "venv missing"},
        },
        {
            "glm": {"startup_s": 8.0, "load": {"c32": {"tokens_per_s": 2.0}}},
            "peer": {"skipped": "venv missing"},
        },
    ]
    merged = merge_passes(passes, "tokens_per_s")
    assert merged["glm"]["startup_s"] == 9.0
    assert merged["glm"]["load"]["c32"]["tokens_per_s"] == 2.0
    assert merged["peer"] == {"skipped": "venv missing"}
    assert merged["passes"] == passes


@pytest.mark.parametrize("script", ["embeddings.py", "chat.py"])
def test_passes_must_be_at_least_one(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--passes", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "not a number of passes" in done.stderr
