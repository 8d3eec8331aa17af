"""One prefill pass of the chat engine: prompts packed into rows vs one prompt per row vs each prompt alone.

    python bench/prefill.py                    # waves of 1, 4, 8 and 16 of the chat benchmark's prompts, 1 thread
    python bench/prefill.py --threads 2 --waves 16,32

The chat engine prefills the prompts that wait together in one forward pass (a wave). Padding is computed like
real tokens, so it packs shorter prompts beside each other in rows as wide as the longest (packing.py). This
measures that pass (`ContinuousBatchingEngine._prefill_slots`, in-process, on the LARGER tiny GLM that
bench/chat.py serves, float32, CPU) on the same prompts in three layouts, alternating round by round:
  packed: the engine as it is;
  padded: one prompt per row, right-padded to the longest (the engine's layout before packing);
  alone:  one pass per prompt, no padding at all: the fewest tokens, but each pass pays the fixed cost.
Each figure is the median over --rounds of the wave's pass, in ms, and the real prompt tokens per second; the
padded share is the part of the pass's tokens that are padding. A level measured while something outside this
benchmark used more than --foreign-max % of the CPU is measured again, once, then shown as "busy".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import FOREIGN_MAX_PCT, CpuWindow, machine_busy
from chat import make_messages, model_folder, prompt_ids


def one_per_row(lengths: list[int]) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waves", default="1,4,8,16", help="prompts per pass (default 1,4,8,16)")
    parser.add_argument("--rounds", type=int, default=12, help="passes per layout and wave (default 12)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as the CPU profile)"
    )
    parser.add_argument("--foreign-max", type=float, default=FOREIGN_MAX_PCT)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    waves = [int(w) for w in args.waves.split(",")]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.chat_engine import packing
    from deployments.chat_engine.continuous import ContinuousBatchingEngine
    from deployments.chat_engine.jobs import Job, Outbox
    from serve_app.protocol.engine import GenerateRequest, SamplingParams

    torch.set_num_threads(args.threads)
    folder = model_folder(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = ContinuousBatchingEngine(model, tokenizer, [], max_num_seqs=max(waves), max_model_len=1024)
    prompts = prompt_ids(tokenizer, make_messages(200))
    loop = asyncio.new_event_loop()
    print(
        f"model {folder}; prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
        f"{args.threads} thread(s); {machine_busy()}"
    )

    def one_pass(wave: list[list[int]]) -> float:
        """One prefill pass over `wave` (its KV slots freed after); seconds."""
        jobs = [
            Job(GenerateRequest(str(i), p, SamplingParams(max_tokens=1)), Outbox(0), loop)
            for i, p in enumerate(wave)
        ]
        slots = [engine._cache.add_sequence() for _ in jobs]
        started = time.perf_counter()
        engine._prefill_slots(jobs, slots, engine._cache)
        elapsed = time.perf_counter() - started
        for slot in reversed(slots):
            engine._cache.remove_sequence(slot)
        return elapsed

    def one_pass_padded(wave: list[list[int]]) -> float:
        with mock.patch.object(packing, "pack_rows", one_per_row):
            return one_pass(wave)

    layouts: dict[str, Callable[[list[list[int]]], float]] = {
        "packed": one_pass,
        "padded": one_pass_padded,
        "alone": lambda wave: sum(one_pass([p]) for p in wave),
    }
    # The tokens each layout computes for a wave of these prompt lengths, padding included.
    computed: dict[str, Callable[[list[int]], int]] = {
        "packed": lambda lengths: len(packing.pack_rows(lengths)) * max(lengths),
        "padded": lambda lengths: len(lengths) * max(lengths),
        "alone": sum,
    }

    def measure(size: int) -> dict[str, Any]:
        times: dict[str, list[float]] = {name: [] for name in layouts}
        waves: list[list[int]] = []  # the prompt lengths of each measured wave
        for r in range(args.rounds + 1):
            wave = [prompts[(r * size + i) % len(prompts)] for i in range(size)]
            for name, run in layouts.items():
                elapsed = run(wave)
                if r:  # the first round warms up
                    times[name].append(elapsed)
            if r:
                waves.append([len(p) for p in wave])
        real = sum(map(sum, waves))
        return {
            name: {
                "ms": statistics.median(elapsed) * 1000,
                "tokens_per_s": statistics.median(map(sum, waves)) / statistics.median(elapsed),
                "padding": 1 - real / sum(computed[name](lengths) for lengths in waves),
            }
            for name, elapsed in times.items()
        }

    print(
        f"  {'wave':>4} | {'packed ms':>9} {'tok/s':>7} {'pad':>4} | {'padded ms':>9} {'tok/s':>7} {'pad':>4} | "
        f"{'alone ms':>8} {'tok/s':>7} | packed / padded"
    )
    with torch.inference_mode():
        for size in waves:
            for _ in range(2):
                with CpuWindow() as cpu:
                    result = measure(size)
                if cpu.foreign_pct <= args.foreign_max:
                    break
            else:
                print(f"  {size:>4} | busy (other processes used {cpu.foreign_pct:.0f}% of the CPU)")
                continue
            packed, padded, alone = result["packed"], result["padded"], result["alone"]
            print(
                f"  {size:>4} | {packed['ms']:>9.1f} {packed['tokens_per_s']:>7.0f} {packed['padding']:>4.0%} | "
                f"{padded['ms']:>9.1f} {padded['tokens_per_s']:>7.0f} {padded['padding']:>4.0%} | "
                f"{alone['ms']:>8.1f} {alone['tokens_per_s']:>7.0f} | {packed['ms'] / padded['ms']:.2f}"
            )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
