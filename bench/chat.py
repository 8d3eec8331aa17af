"""Chat streaming throughput: glm-serve vs `transformers serve` (the peer) vs transformers in-process.

    python bench/chat.py                  # everything: in-process limit, glm-serve, the peer, table, JSON, PNG
    python bench/chat.py --no-peer        # skip `transformers serve`
    python bench/chat.py --only glm       # just glm-serve (repeatable: --only glm --only limit)
    python bench/chat.py --only glm --chat-threads 1   # glm-serve with 1 torch thread in the chat replica
    python bench/chat.py --prompt-tokens 1000 --concurrency 16 --prefill-chunk-tokens 2048   # long prompts, whole
                                            # prompts per prefill pass (the CPU profile's default: chunks of 512)
    python bench/chat.py --only glm --concurrency 32 --hog 2   # the rated load, two busy loops beside: a machine
                                            # about twice as slow must still answer only 200s
    python bench/chat.py --only glm --only peer --concurrency 16 --rates 12,16,20   # TTFT at equal load
    python bench/chat.py --only glm --concurrency 16,32 --rates '' --no-prefill-thread   # prefill between decode
                                            # steps on the worker's CPU, not beside them on the other one

All three run the LARGER tiny GLM (hidden 256, intermediate 512, 4 layers; random weights) from one model folder,
on one fixed list of chat prompts (a short instruction plus one of bench/embeddings.py's sentences), greedy
(temperature 0), with a fixed completion budget (--max-tokens, default 128):
  (a) limit: transformers in-process, in a child process: `model.generate_batch` (its continuous batching, KV cache
      bounded: --cb-num-blocks x --cb-page-size, --cb-max-batch-tokens) with at most 32 and 16 requests per batch,
      on the same prompts as the 32- and 16-stream loads; plain `model.generate` with static batches of 1, 16 and
      32 (left padding) for reference. Each with all cores' and with 1 torch thread; the best counts.
  (a') engine: glm-serve's own ContinuousBatchingEngine driven in a child process with no Ray and no HTTP, same
      load as (b); the gap to (b) is what the serving path costs. Its forward passes are timed.
  (b) glm-serve: POST /v1/chat/completions, stream=true, stream_options.include_usage, at 1, 4, 16 and 32
      concurrent streams (closed loop: each simulated user sends its next request when its stream ends).
      Completion tokens are counted from the usage chunk, time to first token is the first chunk with non-empty
      content. The chat replica's RSS (VmRSS sampled every 0.2 s, VmHWM) is recorded throughout.
  (c) the peer: `transformers serve <folder> --device cpu --continuous-batching` from bench/.venv-peer, same load
      (its model id is the folder path; it sends usage on its final chunk without being asked).
  (d) open loop, (b) and (c) alike: requests arrive at --rates requests/s (default 12, 16, 20) at Poisson arrival
      times from one fixed seed, --rate-requests of them (default 200), whether earlier streams have ended or not.
      This compares TTFT at equal load, which the closed loop does not: at equal concurrency a server that
      streams faster is sent more requests per second (glm-serve ~21/s at 16 streams, the peer ~14/s), and each
      is a prompt to prefill; and its users end and resend in step, so prompts arrive in bursts.
Servers run one at a time, each in its own subprocess; the load client runs in this process. Each server level
is measured --repeat times (default 2) and the best counts (this VM's speed drifts from run to run); a level
measured while something outside this benchmark used more than --foreign-max % of the CPU does not count and is
measured again, and the JSON keeps every attempt and how busy the machine was; a level with no undisturbed attempt
shows "busy" instead of figures. Refused requests are counted (non-200), not fatal. Figures go to stdout, bench/results/chat.json and bench/results/chat.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (
    CpuWindow,
    add_hog_option,
    cpu_probe_ms,
    descendants,
    frozen_heap,
    hog_note,
    hog_until_closed,
    machine_busy,
    reported,
    run_record,
    settle,
)
from _passes import add_passes_option, median_targets, merge_passes, passes_note
from _server import add_transport_option, every_kind, interrupt_on_sigterm, launch_server, stop_server
from embeddings import (
    CHAT_MODEL,
    RESULTS,
    fmt,
    make_sentences,
    pct,
    peer_missing,
    ratio,
    serve_until_sigterm,
    wait_http_ok,
)


def _record(
    store: dict[str, Any],
    threads: int,
    kind: str,
    label: str,
    batch: int,
    requests: int,
    tokens: int,
    elapsed: float,
) -> None:
    """Keep and print one in-process measurement."""
    store[kind][str(batch)] = {
        "tokens_per_s": tokens / elapsed,
        "completion_tokens": tokens,
        "requests": requests,
        "seconds": elapsed,
    }
    print(
        f"  [{threads} thread(s)] {label}: {tokens / elapsed:7.1f} tokens/s "
        f"({requests} requests, {tokens} tokens, {elapsed:.1f} s)",
        flush=True,
    )


BENCH = Path(__file__).resolve().parent
PEER_VENV = BENCH / ".venv-peer"
# The benchmark model: big enough that the forward pass, not Python, dominates a decode step.
BENCH_SPEC = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
REPLICA_TITLE = "ServeReplica:glm-serve:Chat-tiny-glm"

# Targets from the project brief.
TARGET_SCALING = 6.0  # glm-serve at 16 streams >= 6x its own 1-stream tokens/s
TARGET_VS_PEER = 1.2  # glm-serve at 16 streams >= 1.2x the peer at 16
TARGET_VS_LIMIT = 0.5  # glm-serve >= 0.5x the in-process continuous-batching limit (same batch size)
TARGET_VS_ENGINE = 0.8  # glm-serve at 16 streams >= 0.8x its engine alone (the serving path's share)

RATE_SEED = 2024  # the open-loop levels' arrival times
WARM_CONNECTIONS = 16  # connections the open-loop levels open before the timed requests

INSTRUCTIONS = [
    "Continue this story:",
    "Rewrite this sentence in a formal tone:",
    "Explain what happens here:",
    "Translate into French:",
]


def make_messages(n: int, prompt_tokens: int = 0) -> list[list[dict[str, str]]]:
    """n one-turn chats, the same ones on every run; with `prompt_tokens`, each made about that long (in the bench
    model's tokens) by appending more of the sentences."""
    sentences = make_sentences(n, seed=4321)
    chats = [f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]} {s}" for i, s in enumerate(sentences)]
    if prompt_tokens:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_folder(None))
        filler = " ".join(make_sentences(400, seed=99))
        filler_ids = tokenizer.encode(filler, add_special_tokens=False)
        for i, chat in enumerate(chats):
            missing = max(0, prompt_tokens - len(tokenizer.encode(chat, add_special_tokens=False)))
            start = (i * 37) % max(1, len(filler_ids) - missing)
            chats[i] = f"{chat} {tokenizer.decode(filler_ids[start : start + missing])}"
    return [[{"role": "user", "content": chat}] for chat in chats]


def model_folder(cache_dir: str | None) -> Path:
    from serve_app.tiny_glm import TinyGlmSpec, ensure_tiny_glm

    return ensure_tiny_glm(cache_dir, TinyGlmSpec(**BENCH_SPEC))


# ----------------------------------------------------------------------------------------------------------------
# RSS of a server process


def find_pid(title: str, ancestor: int) -> int | None:
    """The process whose title holds `title`, among `ancestor`'s descendants (a test suite may run its own Ray)."""
    ours = descendants(ancestor)
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if title in args and int(pid) in ours:
            return int(pid)
    return None


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssMonitor:
    """Samples VmRSS of one process every interval_s on a thread; `mark()` starts a new named window."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.peak_kb = 0
        self.windows: dict[str, int] = {}
        self._window: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start_kb = _status_kb(pid, "VmRSS") or 0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status_kb(self.pid, "VmRSS")
            if rss is not None:
                self.peak_kb = max(self.peak_kb, rss)
                if self._window is not None:
                    self.windows[self._window] = max(self.windows.get(self._window, 0), rss)
            self._stop.wait(0.2)

    def mark(self, name: str) -> None:
        self._window = name

    def stop(self) -> dict[str, Any]:
        hwm = _status_kb(self.pid, "VmHWM")
        end = _status_kb(self.pid, "VmRSS")
        self._stop.set()
        self._thread.join()
        mib = 1 / 1024
        return {
            "pid": self.pid,
            "rss_at_start_mib": self.start_kb * mib,
            "rss_at_end_mib": (end or 0) * mib,
            "peak_rss_sampled_mib": self.peak_kb * mib,
            "vm_hwm_mib": (hwm or 0) * mib,
            "peak_rss_by_level_mib": {k: v * mib for k, v in self.windows.items()},
        }


# ----------------------------------------------------------------------------------------------------------------
# The streaming load


async def _one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    events = content_events = 0
    gaps: list[float] = []  # between consecutive content events: a prefill stall shows here
    last: float | None = None
    error = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            # Counted, not fatal: a refusal at a load the server is rated for is a finding to report.
            print(f"  {url}: {response.status_code} {(await response.aread())[:200]!r}", flush=True)
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                break
            events += 1
            # Parse only what is needed: the first content chunk, the usage chunk, errors.
            if '"content":"' in payload and '"content":""' not in payload:
                content_events += 1
                now = time.perf_counter()
                if first is None:
                    first = now
                if last is not None:
                    gaps.append(now - last)
                last = now
            if '"usage":{' in payload:
                usage = json.loads(payload).get("usage")
            elif '"error"' in payload and '"choices"' not in payload:
                error = payload[:300]
    end = time.perf_counter()
    if error:
        print(f"  {url}: error event {error}", flush=True)
        return {"status": "error event"}
    if usage is None:
        raise RuntimeError(f"{url}: stream ended without a usage chunk")
    tokens = int(usage["completion_tokens"])
    return {
        "status": 200,
        "ttft_s": (first if first is not None else end) - t0,
        "gaps_s": gaps,
        "latency_s": end - t0,
        "tokens": tokens,
        "content_events": content_events,
        "events": events,
        # Decode speed seen by this client after its first token.
        "stream_tokens_per_s": (tokens - 1) / (end - first) if first is not None and end > first else None,
    }


def _body(model: str, messages: list[list[dict[str, str]]], i: int, budget: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages[i % len(messages)],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": budget,
        "temperature": 0,
    }


async def _load(
    url: str,
    model: str,
    messages: list[list[dict[str, str]]],
    concurrency: int,
    requests: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Closed loop: `concurrency` users, each sending its next request when its stream ends."""
    results: list[dict[str, Any]] = []
    work = iter(range(requests))

    async def user(client: httpx.AsyncClient, jobs: Any, budget: int, sink: list[dict[str, Any]]) -> None:
        for i in jobs:
            sink.append(await _one_stream(client, url, _body(model, messages, i, budget)))

    clients = [httpx.AsyncClient(timeout=600) for _ in range(concurrency)]
    try:
        # Warm-up (not timed): opens every client's connection, with a short budget.
        warm: list[dict[str, Any]] = []
        warm_jobs = iter(range(len(messages) - concurrency, len(messages)))
        await asyncio.gather(*(user(c, warm_jobs, 8, warm) for c in clients))
        start = time.perf_counter()
        await asyncio.gather(*(user(c, work, max_tokens, results) for c in clients))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return _summary(url, results, elapsed)


async def _load_at_rate(
    url: str,
    model: str,
    messages: list[list[dict[str, str]]],
    rate: float,
    requests: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Open loop: requests arrive at `rate` per second on average, whether earlier ones have ended or not, at
    Poisson arrival times drawn from a fixed seed (the same schedule for every server), so servers are compared at
    equal load. (A closed loop at equal concurrency is not equal load: the faster a server streams, the more
    requests per second its users send it.)"""
    arrivals = random.Random(RATE_SEED)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # Warm-up (not timed): opens connections, with a short budget.
        warm = range(len(messages) - WARM_CONNECTIONS, len(messages))
        await asyncio.gather(*(_one_stream(client, url, _body(model, messages, i, 8)) for i in warm))
        start = due = time.perf_counter()
        streams = []
        for i in range(requests):
            due += arrivals.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            streams.append(
                asyncio.create_task(_one_stream(client, url, _body(model, messages, i, max_tokens)))
            )
        results = list(await asyncio.gather(*streams))
        elapsed = time.perf_counter() - start
    return _summary(url, results, elapsed)


def _summary(url: str, results: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    refused = Counter(str(r["status"]) for r in results if r["status"] != 200)
    results = [r for r in results if r["status"] == 200]
    if not results:
        raise RuntimeError(f"{url}: every request was refused: {dict(refused)}")
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] * 1000 for r in results]
    speeds = [r["stream_tokens_per_s"] for r in results if r["stream_tokens_per_s"]]
    gaps = [g * 1000 for r in results for g in r["gaps_s"]]
    return {
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(results) / elapsed,
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p95_ms": pct(ttfts, 95),
        "ttft_p99_ms": pct(ttfts, 99),
        # Client-side gap between two text events of a stream (glm-serve sends one per stream_interval_ms, the
        # peer one per token): its p99 is the stall a joining prompt's prefill causes.
        "gap_p99_ms": pct(gaps, 99) if gaps else None,
        "latency_p50_s": pct([r["latency_s"] for r in results], 50),
        "stream_tokens_per_s_p50": pct(speeds, 50) if speeds else None,
        "completion_tokens": tokens,
        "tokens_per_request_min": min(r["tokens"] for r in results),
        "content_events_per_token": sum(r["content_events"] for r in results) / max(1, tokens),
        "requests": len(results),
        "non_200": dict(refused),
        "seconds": elapsed,
    }


def requests_for(concurrency: int, rounds: int, c1_requests: int) -> int:
    return c1_requests if concurrency == 1 else concurrency * rounds


# A load level: its key in the JSON ("c16": 16 streams, "r12": 12 requests/s), what it is called in the
# output, and the coroutine that runs it once.
Level = tuple[str, str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]]


N = TypeVar("N", int, float)


def parse_numbers(listed: str, kind: Callable[[str], N]) -> list[N]:
    """'1,4,16' -> [1, 4, 16]; '' -> []."""
    return [kind(n) for n in listed.split(",") if n.strip()]


# glm-serve's decode counters (deployments/chat_engine/decode_tally.py), read before and after a level: how full its
# steps were and what their forward passes cost, beside the same figures of the engine alone. A lower rows/step is
# the serving path delaying each stream's next request; a slower forward pass is it taking the CPU (or the GIL)
# from the decode loop; CPU time above the engine alone's is extra work per step.
TallyReader = Callable[[], dict[str, float] | None]


def health_decode_tally(health_url: str) -> dict[str, float] | None:
    """The chat replica's decode counters from glm-serve's /health (None if it has none)."""
    deployments = httpx.get(health_url, timeout=30).json().get("deployments", {})
    return deployments.get(f"chat:{CHAT_MODEL}", {}).get("decode")


def decode_figures(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """Per decode step between two readings: sequences, forward pass wall and CPU time (ms)."""
    if not before or not after or after["steps"] <= before["steps"]:
        return None
    steps = after["steps"] - before["steps"]
    return {
        "steps": steps,
        "rows_per_step": (after["rows"] - before["rows"]) / steps,
        "forward_ms": 1000 * (after["forward_s"] - before["forward_s"]) / steps,
        "forward_cpu_ms": 1000 * (after["forward_cpu_s"] - before["forward_cpu_s"]) / steps,
    }


def describe_decode(decode: dict[str, float] | None) -> str:
    if decode is None:
        return ""
    return (
        f"\n{'':15}decode: {decode['rows_per_step']:.1f} sequences/step, forward pass {decode['forward_ms']:.2f} ms "
        f"(CPU {decode['forward_cpu_ms']:.2f} ms) over {decode['steps']} steps"
    )


def measure_server(
    label: str,
    url: str,
    model: str,
    messages: list[list[dict[str, str]]],
    concurrencies: list[int],
    rates: list[float],
    args: argparse.Namespace,
    rss: RssMonitor | None,
    decode_tally: TallyReader | None = None,
) -> dict[str, Any]:
    """One server's closed-loop levels (--concurrency: "load") and open-loop ones (--rates: "at_rate").
    `decode_tally` reads the server's decode counters (glm-serve's /health), to report what its steps cost."""
    streams: list[Level] = [
        (
            f"c{concurrency}",
            f"{concurrency:>2} streams",
            partial(
                _load,
                url,
                model,
                messages,
                concurrency,
                requests_for(concurrency, args.rounds, args.c1_requests),
                args.max_tokens,
            ),
        )
        for concurrency in concurrencies
    ]
    open_loop: list[Level] = [
        (
            f"r{rate:g}",
            f"{rate:g} req/s",
            partial(_load_at_rate, url, model, messages, rate, args.rate_requests, args.max_tokens),
        )
        for rate in rates
    ]
    return {
        "load": measure_levels(label, streams, args, rss, decode_tally),
        "at_rate": measure_levels(label, open_loop, args, rss, decode_tally),
    }


def measure_levels(
    label: str,
    levels: list[Level],
    args: argparse.Namespace,
    rss: RssMonitor | None,
    decode_tally: TallyReader | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name, run in levels:
        attempts: list[dict[str, Any]] = []
        clean = 0  # attempts without another process in the way
        retries = 0
        while clean < args.repeat and retries <= args.repeat:
            quiet = settle(max_wait_s=60)
            load1 = os.getloadavg()[0]
            probe = cpu_probe_ms()
            if rss is not None:
                rss.mark(key)
            before = decode_tally() if decode_tally else None
            with frozen_heap(), CpuWindow() as cpu:
                result = asyncio.run(run())
            result["decode"] = decode_figures(before, decode_tally() if decode_tally else None)
            result.update(
                cpu_busy_before_pct=quiet,
                load1_before=load1,
                cpu_probe_ms=probe,
                cpu_busy_pct=cpu.busy_pct,
                cpu_foreign_pct=cpu.foreign_pct,
            )
            attempts.append(result)
            note = ""
            if cpu.foreign_pct > args.foreign_max:
                retries += 1
                note = f"  [other processes used {cpu.foreign_pct:.0f}% of the CPU: measuring again]"
            else:
                clean += 1
            print(
                f"  {label:<10} {name}: {result['tokens_per_s']:7.1f} tokens/s  "
                f"TTFT p50 {result['ttft_p50_ms']:7.1f} ms  p99 {result['ttft_p99_ms']:7.1f} ms  "
                f"gap p99 {fmt(result['gap_p99_ms'], '.1f')} ms  "
                f"stream p50 {fmt(result['stream_tokens_per_s_p50'], '.1f')} tok/s  "
                f"({result['requests']} x <= {args.max_tokens} tokens, {result['completion_tokens']} in all, "
                f"{result['content_events_per_token']:.2f} events/token, cpu {cpu.busy_pct:.0f}%, probe {probe:.0f} ms)"
                + (f"  NON-200: {result['non_200']}" if result["non_200"] else "")
                + note
                + describe_decode(result["decode"]),
                flush=True,
            )
        # The best clean attempt (this VM's speed drifts run to run; the best is the least disturbed), or the
        # least disturbed one when none was clean.
        valid = [a for a in attempts if a["cpu_foreign_pct"] <= args.foreign_max]
        best = (
            max(valid, key=lambda r: r["tokens_per_s"])
            if valid
            else min(attempts, key=lambda r: r["cpu_foreign_pct"])
        )
        # Figures of a machine that something else was using are not reported (the JSON keeps them).
        best["disturbed"] = not valid
        best["all_attempts_tokens_per_s"] = [a["tokens_per_s"] for a in attempts]
        best["other_attempts"] = [dict(a) for a in attempts if a is not best]
        out[key] = best
    return out


# ----------------------------------------------------------------------------------------------------------------
# (a) the in-process limit and (a') glm-serve's engine without Ray and HTTP, each in a child process


def prompt_ids(tokenizer: Any, messages: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids as glm-serve's tokenizer deployment renders them (template to text, then encode)."""
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for m in messages
    ]


def measure_engine(args: argparse.Namespace, concurrencies: list[int]) -> dict[str, Any]:
    """glm-serve's ContinuousBatchingEngine driven directly (what the chat replica runs, minus Ray and HTTP).

    The gap between this and (b) is what the serving path costs; the engine's decode tally times its forward
    passes, to split the engine's own step into model and Python."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.chat_engine.continuous import ContinuousBatchingEngine
    from deployments.cpu_affinity import cpus_for_prefill, pin_to_one_cpu, usable_cpus
    from deployments.model_files import end_token_ids, resolve_device
    from serve_app.protocol.engine import GenerateRequest, SamplingParams

    profile = bench_config(args).chat_models[0]  # the chat replica's config in (b)
    resolve_device(profile.device, profile.cpu_threads)
    cpus = usable_cpus()
    # This thread runs the clients' loop, as the replica's thread does its requests.
    pinned = pin_to_one_cpu(0) if profile.pin_to_one_cpu else None
    folder = profile.path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer, make_messages(args.prompts, args.prompt_tokens))
    ends = end_token_ids(model.generation_config.eos_token_id, tokenizer)
    engine = ContinuousBatchingEngine(
        model,
        tokenizer,
        ends,
        profile.max_num_seqs,
        model.config.max_position_embeddings,
        profile.prefill_chunk_tokens,
        prefill_thread=profile.prefill_thread,
        prefill_cpus=cpus_for_prefill(pinned, cpus) if profile.prefill_thread else None,
    )

    async def one(i: int, budget: int, sink: list[tuple[float, int]]) -> None:
        request = GenerateRequest(str(i), prompts[i], SamplingParams(max_tokens=budget, temperature=0.0))
        t0, first, last, tokens = time.perf_counter(), None, None, 0
        async for chunk in engine.stream(request):
            now = time.perf_counter()
            if chunk.text:
                first = first or now
                if last is not None:
                    gaps.append(now - last)
                last = now
            tokens = chunk.completion_tokens
        sink.append(((first or time.perf_counter()) - t0, tokens))

    gaps: list[float] = []

    async def level(concurrency: int, requests: int, budget: int) -> dict[str, Any]:
        work = iter(range(requests))
        done: list[tuple[float, int]] = []
        gaps.clear()

        async def user() -> None:
            for i in work:
                await one(i, budget, done)

        before = engine.decode_tally.snapshot()
        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        decode = decode_figures(before, engine.decode_tally.snapshot())
        tokens = sum(n for _, n in done)
        ttfts = [t * 1000 for t, _ in done]
        return {
            "tokens_per_s": tokens / elapsed,
            "ttft_p50_ms": pct(ttfts, 50),
            "ttft_p95_ms": pct(ttfts, 95),
            "ttft_p99_ms": pct(ttfts, 99),
            "gap_p99_ms": pct([g * 1000 for g in gaps], 99) if gaps else None,
            "completion_tokens": tokens,
            "requests": requests,
            "seconds": elapsed,
            # The decode steps' forward passes (prefill passes run the decoder itself), from the engine's tally.
            "forward_share": decode["steps"] * decode["forward_ms"] / 1000 / elapsed if decode else 0.0,
            "decode": decode,
        }

    async def run() -> dict[str, Any]:
        await level(8, 8, 16)  # warm-up
        out = {}
        for concurrency in concurrencies:
            requests = requests_for(concurrency, args.rounds, args.c1_requests)
            with frozen_heap():  # as the load clients of (b) and (c): the model's objects too, here
                r = out[f"c{concurrency}"] = await level(concurrency, requests, args.max_tokens)
            print(
                f"  engine     {concurrency:>2} streams: {r['tokens_per_s']:7.1f} tokens/s  TTFT p50 "
                f"{r['ttft_p50_ms']:7.1f} ms  p99 {r['ttft_p99_ms']:7.1f} ms  gap p99 "
                f"{fmt(r['gap_p99_ms'], '.1f')} ms  (forward passes {100 * r['forward_share']:.0f}% of the time)"
                + describe_decode(r["decode"]),
                flush=True,
            )
        return out

    try:
        return {"torch_threads": torch.get_num_threads(), "load": asyncio.run(run())}
    finally:
        engine.close()


def measure_limit(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    folder = model_folder(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer, make_messages(args.prompts, args.prompt_tokens))
    eos = model.generation_config.eos_token_id
    end_ids = set(eos if isinstance(eos, list) else [eos])
    gen = GenerationConfig(
        max_new_tokens=args.max_tokens,
        do_sample=False,
        eos_token_id=sorted(end_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    # Small matrices: one torch thread can beat all cores, so the limit is the best of both.
    thread_counts = (
        [args.chat_threads] if args.chat_threads else sorted({os.cpu_count() or 1, 1}, reverse=True)
    )
    out: dict[str, Any] = {
        "torch_threads_tried": thread_counts,
        "attn_implementation": model.config._attn_implementation,
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "generate_batch": {},
        "generate_static": {},
        "by_threads": {},
    }

    def cb_config(batch: int) -> Any:
        return ContinuousBatchingConfig(
            num_blocks=args.cb_num_blocks,
            page_size=args.cb_page_size,
            max_batch_tokens=args.cb_max_batch_tokens,
            max_requests_per_batch=batch,
        )

    def run_cb(batch: int, inputs: list[list[int]]) -> tuple[int, float]:
        t0 = time.perf_counter()
        results = model.generate_batch(
            inputs, generation_config=gen, continuous_batching_config=cb_config(batch)
        )
        elapsed = time.perf_counter() - t0
        if len(results) != len(inputs):
            raise RuntimeError(f"generate_batch returned {len(results)} of {len(inputs)} results")
        return sum(len(r.generated_tokens) for r in results.values()), elapsed

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id

    def run_static(batch: int, inputs: list[list[int]]) -> tuple[int, float]:
        tokens, elapsed = 0, 0.0
        for i in range(0, len(inputs), batch):
            chunk = inputs[i : i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            t0 = time.perf_counter()
            with torch.inference_mode():
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            elapsed += time.perf_counter() - t0
            for row in generated[:, width:].tolist():
                # Tokens up to and including the first end token (as a server would count them).
                n = next((j + 1 for j, t in enumerate(row) if t in end_ids), len(row))
                tokens += n
        return tokens, elapsed

    for threads in thread_counts:
        torch.set_num_threads(threads)
        mine: dict[str, Any] = {"generate_batch": {}, "generate_static": {}}
        out["by_threads"][str(threads)] = mine
        run_cb(8, prompts[-8:])  # warm-up

        for batch in (32, 16):
            requests = requests_for(batch, args.rounds, args.c1_requests)
            tokens, elapsed = run_cb(batch, prompts[:requests])
            _record(
                mine,
                threads,
                "generate_batch",
                f"generate_batch, <= {batch:>2} requests/batch",
                batch,
                requests,
                tokens,
                elapsed,
            )
        run_static(4, prompts[-4:])  # warm-up
        for batch in (32, 16, 1):
            requests = batch * 2 if batch > 1 else 4
            tokens, elapsed = run_static(batch, prompts[:requests])
            _record(
                mine,
                threads,
                "generate_static",
                f"generate, static batch {batch:>2}         ",
                batch,
                requests,
                tokens,
                elapsed,
            )
        for kind in ("generate_batch", "generate_static"):
            for batch, v in mine[kind].items():
                if v["tokens_per_s"] > out[kind].get(batch, {}).get("tokens_per_s", 0):
                    out[kind][batch] = dict(v, torch_threads=threads)
    import resource

    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------------------------------------------
# The servers


def bench_config(args: argparse.Namespace) -> Any:
    """The demo profile with the benchmark model, as glm-serve and the engine part both run it: chat_overrides
    change the chat model's config (--chat-threads, --no-pin, --no-prefill-thread, --prefill-chunk-tokens),
    --handle-transport its handle_transport."""
    from serve_app.builder import parse_config
    from serve_app.profiles import cpu_demo_args
    from serve_app.tiny_glm import TinyGlmSpec

    config = cpu_demo_args(args.cache_dir, TinyGlmSpec(**BENCH_SPEC))
    config["chat_models"][0].update(chat_overrides(args))
    if args.handle_transport:
        config["handle_transport"] = every_kind(args.handle_transport)
    return parse_config(config)


def chat_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.chat_threads:
        overrides["cpu_threads"] = args.chat_threads
    if args.no_pin or (args.chat_threads or 1) != 1:
        overrides["pin_to_one_cpu"] = False
    if args.no_prefill_thread:
        overrides["prefill_thread"] = False
    if args.prefill_chunk_tokens:
        overrides["prefill_chunk_tokens"] = args.prefill_chunk_tokens
    return overrides


def chat_option_args(args: argparse.Namespace) -> list[str]:
    """The command-line options that chat_overrides reads, for a child process that must run as this one."""
    options = ["--no-pin"] if args.no_pin else []
    if args.no_prefill_thread:
        options.append("--no-prefill-thread")
    if args.chat_threads:
        options += ["--chat-threads", str(args.chat_threads)]
    if args.prefill_chunk_tokens:
        options += ["--prefill-chunk-tokens", str(args.prefill_chunk_tokens)]
    return options


def serve_child(args: argparse.Namespace) -> None:
    """glm-serve's demo profile with the benchmark model, until SIGTERM."""
    from serve_app.builder import bind_graph

    app = bind_graph(bench_config(args))
    serve_until_sigterm(app, args.port, args.temp_dir)


def start_glm_serve(
    args: argparse.Namespace, env_overrides: dict[str, str], log_path: Path
) -> subprocess.Popen:
    env = dict(os.environ, **env_overrides)
    temp_dir = f"/tmp/ray-bench-chat-{args.port}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    print(
        f"  starting glm-serve on :{args.port} (log {log_path}) env overrides {env_overrides}, handle_transport "
        f"{args.handle_transport or 'as the profile says'}",
        flush=True,
    )
    command = [sys.executable, __file__, "--serve-child", "--port", str(args.port), "--temp-dir", temp_dir]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    command += chat_option_args(args)
    if args.handle_transport:
        command += ["--handle-transport", args.handle_transport]
    return launch_server(command, env, args.port, log_path)


def start_peer(args: argparse.Namespace, folder: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{PEER_VENV / 'bin'}:{env.get('PATH', '')}"
    command = [
        str(PEER_VENV / "bin" / "transformers"),
        "serve",
        str(folder),
        "--device",
        "cpu",
        "--continuous-batching",
        # The same KV-cache bound as the in-process run: unbounded, it sizes its cache from system RAM.
        "--cb-num-blocks",
        str(args.cb_num_blocks),
        "--cb-block-size",
        str(args.cb_page_size),
        "--cb-max-batch-tokens",
        str(args.cb_max_batch_tokens),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    print(f"  starting the peer: {' '.join(command)} (log {log_path})", flush=True)
    return launch_server(command, env, port, log_path)


# ----------------------------------------------------------------------------------------------------------------
# Report


def targets(results: dict[str, Any]) -> dict[str, Any]:
    glm = results.get("glm_serve", {}).get("load", {})
    peer = results.get("peer", {}).get("load", {})
    limit = (results.get("limit") or {}).get("generate_batch", {})

    engine = results.get("engine", {}).get("load", {})

    def level(table: dict[str, Any], key: str, figure: str = "tokens_per_s") -> float | None:
        return reported(table.get(key) or {}, figure)

    tps = level

    out = {}
    if tps(glm, "c16") and tps(glm, "c1"):
        out["glm-serve 16 streams / glm-serve 1 stream"] = {
            "ratio": ratio(tps(glm, "c16"), tps(glm, "c1")),
            "target": TARGET_SCALING,
        }
    for n in ("16", "32"):
        if tps(glm, f"c{n}") and tps(peer, f"c{n}"):
            out[f"glm-serve {n} streams / peer {n} streams"] = {
                "ratio": ratio(tps(glm, f"c{n}"), tps(peer, f"c{n}")),
                "target": TARGET_VS_PEER,
            }
    if level(glm, "c16", "ttft_p50_ms") and level(peer, "c16", "ttft_p50_ms"):
        out["peer TTFT p50 / glm-serve TTFT p50, 16 streams"] = {
            "ratio": ratio(level(peer, "c16", "ttft_p50_ms"), level(glm, "c16", "ttft_p50_ms")),
            "target": 1.0,
        }
    glm_rates = results.get("glm_serve", {}).get("at_rate", {})
    peer_rates = results.get("peer", {}).get("at_rate", {})
    for key in sorted(set(glm_rates) & set(peer_rates), key=lambda k: float(k[1:])):
        if level(glm_rates, key, "ttft_p50_ms") and level(peer_rates, key, "ttft_p50_ms"):
            out[f"peer TTFT p50 / glm-serve TTFT p50, {key[1:]} requests/s (open loop)"] = {
                "ratio": ratio(level(peer_rates, key, "ttft_p50_ms"), level(glm_rates, key, "ttft_p50_ms")),
                "target": 1.0,
            }
    if tps(glm, "c16") and tps(engine, "c16"):
        out["glm-serve 16 streams / engine alone 16 streams"] = {
            "ratio": ratio(tps(glm, "c16"), tps(engine, "c16")),
            "target": TARGET_VS_ENGINE,
        }
    for n in ("32", "16"):
        if tps(glm, f"c{n}") and tps(limit, n):
            out[f"glm-serve {n} streams / in-process generate_batch {n}"] = {
                "ratio": ratio(tps(glm, f"c{n}"), tps(limit, n)),
                "target": TARGET_VS_LIMIT,
            }
    return out


def print_table(results: dict[str, Any]) -> None:
    glm = results.get("glm_serve", {}).get("load", {})
    peer = results.get("peer", {}).get("load", {})
    engine = results.get("engine", {}).get("load", {})
    print(
        f"\n=== Chat streaming, tiny GLM {BENCH_SPEC} (random weights), {results['max_tokens']} tokens max, CPU ==="
    )
    if note := hog_note(results):
        print(note)
    print(
        f"  {'streams':>7} | {_server_columns('glm-serve', 15)} | {_server_columns('peer', 10)} | {'glm/peer':>8} | "
        f"{'engine tok/s':>12} {'glm/engine':>10}"
    )
    keys = sorted(set(glm) | set(peer) | set(engine), key=lambda k: int(k[1:]))
    for key in keys:
        g, p, e = glm.get(key, {}), peer.get(key, {}), engine.get(key, {})
        print(
            f"  {key[1:]:>7} | {_server_figures(g, 15)} | {_server_figures(p, 10)} | "
            f"{fmt(ratio(reported(g, 'tokens_per_s'), reported(p, 'tokens_per_s')), '8.2f')} | "
            f"{fmt(e.get('tokens_per_s'), '12.1f')} "
            f"{fmt(ratio(reported(g, 'tokens_per_s'), e.get('tokens_per_s')), '10.2f')}"
        )
    for name, load in (("glm-serve", glm), ("peer", peer)):
        if load:
            levels = sorted(load.items(), key=lambda kv: int(kv[0][1:]))
            spread = ", ".join(
                f"{k[1:]}: "
                + "/".join(f"{t:.0f}" for t in v.get("all_attempts_tokens_per_s", [v["tokens_per_s"]]))
                for k, v in levels
            )
            print(f"  {name} tokens/s of every attempt (the best is shown above) by streams: {spread}")
            # Why the open-loop levels exist: at equal concurrency, the faster a server streams, the more
            # requests per second its users send it, and the more prompts it must prefill in the same time.
            served = ", ".join(
                f"{k[1:]}: {fmt(reported(v, 'requests_per_s'), '.1f').strip()}" for k, v in levels
            )
            print(
                f"  {name} requests/s by streams (closed loop: its users send the next when one ends): {served}"
            )
    print_rate_table(results)
    if engine:
        print("  (engine: glm-serve's ContinuousBatchingEngine driven in-process, no Ray, no HTTP)")
    limit = results.get("limit")
    if limit:
        print("  in-process transformers (tokens/s; best of the torch thread counts tried):")
        for batch, v in limit["generate_batch"].items():
            print(
                f"    generate_batch, <= {batch:>2} requests/batch: {v['tokens_per_s']:7.1f}"
                f"  ({v['torch_threads']} torch thread(s))"
            )
        for batch, v in limit["generate_static"].items():
            print(
                f"    generate, static batch {batch:>2}:          {v['tokens_per_s']:7.1f}"
                f"  ({v['torch_threads']} torch thread(s))"
            )
    rss = results.get("glm_serve", {}).get("chat_replica_rss")
    if rss:
        print(
            f"  glm-serve chat replica RSS: {rss['rss_at_start_mib']:.0f} MiB idle, peak {rss['peak_rss_sampled_mib']:.0f}"
            f" MiB sampled, VmHWM {rss['vm_hwm_mib']:.0f} MiB"
        )
    peer_rss = results.get("peer", {}).get("server_rss")
    if peer_rss:
        print(
            f"  peer server RSS: {peer_rss['rss_at_start_mib']:.0f} MiB idle, VmHWM {peer_rss['vm_hwm_mib']:.0f} MiB"
        )
    for name, t in results.get("targets", {}).items():
        verdict = "-" if t["ratio"] is None else ("MET" if t["ratio"] >= t["target"] else "NOT MET")
        print(
            f"  target {name}: {fmt(t['ratio'], '.2f').strip()} (>= {t['target']}) {verdict}{passes_note(t)}"
        )
    # The scaling target's context: the same ratio without Ray and HTTP (the engine's own ceiling on these cores),
    # and the peer's, whose single stream is slower (an SSE event per token).
    for name, load in (("engine (no Ray, no HTTP)", engine), ("peer", peer)):
        c16, c1 = (load.get(k, {}).get("tokens_per_s") for k in ("c16", "c1"))
        if c16 and c1:
            print(f"  (reference) {name} 16 streams / 1 stream: {c16 / c1:.2f}")
    static = (limit or {}).get("generate_static", {})
    for n in ("32", "16"):
        g = glm.get(f"c{n}", {}).get("tokens_per_s")
        if g and n in static:
            print(
                f"  (reference) glm-serve {n} streams / static generate batch {n}: {g / static[n]['tokens_per_s']:.2f}"
            )


def _server_columns(name: str, width: int) -> str:
    """One server's column headings: tokens/s, TTFT p50/p99 and the p99 gap between two text events, in ms;
    refusals."""
    return f"{name + ' tok/s':>{width}} {'TTFT p50':>8} {'p99':>6} {'gap p99':>7} {'non-200':>7}"


def _server_figures(level: dict[str, Any], width: int) -> str:
    """One server's figures for a level, under `_server_columns`; "busy" where other processes used the CPU during
    every attempt (no figure is reported then)."""
    if level.get("disturbed"):
        return f"{'busy':>{width}} {'':>8} {'':>6} {'':>7} {'':>7}"
    refused = sum(level.get("non_200", {}).values()) if level else None
    return (
        f"{fmt(level.get('tokens_per_s'), f'{width}.1f')} {fmt(level.get('ttft_p50_ms'), '8.0f')} "
        f"{fmt(level.get('ttft_p99_ms'), '6.0f')} {fmt(level.get('gap_p99_ms'), '7.0f')} "
        f"{'-' if refused is None else refused:>7}"
    )


def print_rate_table(results: dict[str, Any]) -> None:
    """The open-loop levels: both servers at the same request rates (equal load), side by side."""
    glm = results.get("glm_serve", {}).get("at_rate", {})
    peer = results.get("peer", {}).get("at_rate", {})
    if not glm and not peer:
        return
    print(
        "  open loop: Poisson arrivals at a fixed rate, the same arrival times for both servers (equal load)"
    )
    print(
        f"  {'req/s':>7} | {_server_columns('glm-serve', 15)} | {_server_columns('peer', 10)} | "
        f"{'peer/glm TTFT p50':>17}"
    )
    for key in sorted(set(glm) | set(peer), key=lambda k: float(k[1:])):
        g, p = glm.get(key, {}), peer.get(key, {})
        print(
            f"  {key[1:]:>7} | {_server_figures(g, 15)} | {_server_figures(p, 10)} | "
            f"{fmt(ratio(reported(p, 'ttft_p50_ms'), reported(g, 'ttft_p50_ms')), '17.2f')}"
        )


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no plot: matplotlib is missing; pip install -e '.[bench]') ", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (
        ("glm_serve", "glm-serve (HTTP, streaming)", "o-"),
        ("peer", "transformers serve --continuous-batching", "s-"),
    ):
        load = results.get(key, {}).get("load", {})
        if load:
            xs = sorted(int(k[1:]) for k in load)
            ax.plot(xs, [load[f"c{x}"]["tokens_per_s"] for x in xs], style, label=label)
    engine = results.get("engine", {}).get("load", {})
    if engine:
        xs = sorted(int(k[1:]) for k in engine)
        ax.plot(xs, [engine[f"c{x}"]["tokens_per_s"] for x in xs], "d-.", label="glm-serve engine in-process")
    limit = results.get("limit")
    if limit:
        cb = limit["generate_batch"]
        xs = sorted(int(k) for k in cb)
        ax.plot(xs, [cb[str(x)]["tokens_per_s"] for x in xs], "^--", label="in-process generate_batch")
        st = limit["generate_static"]
        xs = sorted(int(k) for k in st)
        ax.plot(
            xs, [st[str(x)]["tokens_per_s"] for x in xs], "v:", label="in-process generate (static batch)"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16, 32])
    ax.set_xticklabels(["1", "4", "16", "32"])
    ax.set_xlabel("concurrent streams / batch size")
    ax.set_ylabel("completion tokens/s")
    ax.set_title(f"tiny GLM h256 l4, {results['max_tokens']} tokens, greedy, {os.cpu_count()} CPU cores")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,4,16,32", help="concurrent streams (default 1,4,16,32)")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="completion budget per request (default 128)"
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=0,
        help="the chat replica's (and the engine part's) prefill chunk (default: the CPU profile's)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="make every prompt about this long (default: ~20-80 tokens)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="requests per simulated user (default 4)")
    parser.add_argument(
        "--rates",
        default="12,16,20",
        help="open-loop levels: requests per second, Poisson arrivals (default 12,16,20; '' for none)",
    )
    parser.add_argument(
        "--rate-requests", type=int, default=200, help="requests of each open-loop level (default 200)"
    )
    parser.add_argument(
        "--c1-requests", type=int, default=8, help="requests of the 1-stream level (default 8)"
    )
    parser.add_argument("--prompts", type=int, default=200, help="size of the prompt set (default 200)")
    parser.add_argument("--cb-num-blocks", type=int, default=128, help="KV blocks for transformers' CB")
    parser.add_argument(
        "--cb-page-size", type=int, default=256, help="tokens per KV block for transformers' CB"
    )
    parser.add_argument(
        "--cb-max-batch-tokens", type=int, default=2048, help="max tokens/step, transformers' CB"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="measure each server level this many times and keep the best (default 2)",
    )
    add_passes_option(parser, "the engine, glm-serve and the peer")
    parser.add_argument(
        "--foreign-max",
        type=float,
        default=10.0,
        help="re-measure a level when other processes used more than this %% of the CPU (default 10)",
    )
    parser.add_argument(
        "--only",
        choices=["limit", "engine", "glm", "peer"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    add_hog_option(parser)
    parser.add_argument("--port", type=int, default=28120, help="glm-serve's port (the peer uses port+1)")
    parser.add_argument(
        "--cache-dir", default=None, help="where the tiny GLM is built (default: GLM_SERVE_CACHE)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for glm-serve"
    )
    parser.add_argument(
        "--chat-threads",
        type=int,
        default=None,
        help="torch threads of the chat replica and the engine part (default: the CPU profile's, 1; other than 1, "
        "their threads are not pinned to one CPU)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="leave the chat replica's and the engine part's threads free to move between CPUs (pin_to_one_cpu)",
    )
    parser.add_argument(
        "--no-prefill-thread",
        action="store_true",
        help="prefill on the engine's worker thread, between decode steps, not on a thread of its own "
        "(prefill_thread)",
    )
    parser.add_argument("--output", default=str(RESULTS / "chat.json"))
    add_transport_option(parser)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--limit-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--temp-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_child:
        serve_child(args)
        return 0
    interrupt_on_sigterm()
    concurrencies = parse_numbers(args.concurrency, int)
    rates = parse_numbers(args.rates, float)
    needed = max(requests_for(c, args.rounds, args.c1_requests) for c in concurrencies) + max(concurrencies)
    if rates:
        needed = max(needed, args.rate_requests + WARM_CONNECTIONS)
    args.prompts = max(args.prompts, needed)
    if args.limit_child:
        print("CHILD-JSON " + json.dumps(measure_limit(args)), flush=True)
        return 0
    if args.engine_child:
        print("CHILD-JSON " + json.dumps(measure_engine(args, concurrencies)), flush=True)
        return 0

    parts = set(args.only or ["limit", "engine", "glm", "peer"])
    if args.no_peer:
        parts.discard("peer")
    messages = make_messages(args.prompts, args.prompt_tokens)
    folder = model_folder(args.cache_dir)
    env_overrides = dict(kv.split("=", 1) for kv in args.env)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        **run_record(),
        "model": {"folder": str(folder), "spec": BENCH_SPEC},
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "prompts": len(messages),
        "requests_per_level": {
            **{f"c{c}": requests_for(c, args.rounds, args.c1_requests) for c in concurrencies},
            **{f"r{r:g}": args.rate_requests for r in rates},
        },
        "glm_serve_env_overrides": env_overrides,
        "glm_serve_handle_transport": args.handle_transport or "the profile's",
    }
    print(
        f"model {folder}; {len(messages)} prompts; {args.max_tokens} tokens max; "
        f"{results['machine']['busy_at_start']}",
        flush=True,
    )
    started = time.monotonic()
    hogs = hog_until_closed(args.hog)
    results["cpu_hog"] = args.hog

    if "limit" in parts:
        print("\n(a) in-process transformers (child process)", flush=True)
        results["limit"] = run_child("--limit-child", args)
    passes: list[dict[str, Any]] = []
    for number in range(1, args.passes + 1):
        if args.passes > 1:
            print(f"\n--- pass {number} of {args.passes} ---", flush=True)
        passes.append(measure_pass(args, parts, folder, messages, concurrencies, rates, env_overrides))
    results.update(merge_passes(passes, "tokens_per_s"))

    hogs.close()
    results["targets"] = median_targets([targets({**results, **found}) for found in passes])
    results["wall_s"] = time.monotonic() - started
    print_table(results)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    plot(results, output.with_suffix(".png"))
    print(f"total {results['wall_s']:.0f} s")
    return 0


def measure_pass(
    args: argparse.Namespace,
    parts: set[str],
    folder: Path,
    messages: list[list[dict[str, str]]],
    concurrencies: list[int],
    rates: list[float],
    env_overrides: dict[str, str],
) -> dict[str, Any]:
    """One pass: the engine alone, glm-serve and the peer, each measured at every level in turn."""
    found: dict[str, Any] = {}
    if "engine" in parts:
        print("\n(a') glm-serve's engine in-process, no Ray, no HTTP (child process)", flush=True)
        found["engine"] = run_child("--engine-child", args)

    if "glm" in parts:
        print("\n(b) glm-serve", flush=True)
        log_path = Path(f"/tmp/bench-chat-glm-serve-{args.port}.log")
        t0 = time.monotonic()
        proc = start_glm_serve(args, env_overrides, log_path)
        rss: RssMonitor | None = None
        try:
            base = f"http://127.0.0.1:{args.port}"
            wait_http_ok(f"{base}/health", 300, proc)
            found["glm_serve"] = {"startup_s": time.monotonic() - t0, "busy_at_start": machine_busy()}
            pid = find_pid(REPLICA_TITLE, proc.pid)
            if pid is None:
                print(f"  (no process titled {REPLICA_TITLE!r}: no RSS figures)")
            else:
                rss = RssMonitor(pid)
            found["glm_serve"] |= measure_server(
                "glm-serve",
                f"{base}/v1/chat/completions",
                CHAT_MODEL,
                messages,
                concurrencies,
                rates,
                args,
                rss,
                partial(health_decode_tally, f"{base}/health"),
            )
            if rss is not None:
                found["glm_serve"]["chat_replica_rss"] = rss.stop()
                rss = None
            found["glm_serve"]["busy_at_end"] = machine_busy()
        finally:
            if rss is not None:
                rss.stop()
            stop_server(proc)

    if "peer" in parts:
        print("\n(c) transformers serve --continuous-batching (the peer)", flush=True)
        if peer_missing(PEER_VENV, "transformers", f"'transformers[serving]=={_our_transformers_version()}'"):
            found["peer"] = {"skipped": "venv missing"}
        else:
            port = args.port + 1
            t0 = time.monotonic()
            proc = start_peer(args, folder, port, Path(f"/tmp/bench-chat-peer-{port}.log"))
            try:
                base = f"http://127.0.0.1:{port}"
                wait_http_ok(f"{base}/health", 300, proc)
                found["peer"] = {
                    "startup_s": time.monotonic() - t0,
                    "busy_at_start": machine_busy(),
                    "model_id": str(folder),
                    "version": _peer_version(),
                }
                monitor = RssMonitor(proc.pid)
                found["peer"] |= measure_server(
                    "peer",
                    f"{base}/v1/chat/completions",
                    str(folder),
                    messages,
                    concurrencies,
                    rates,
                    args,
                    monitor,
                )
                found["peer"]["server_rss"] = monitor.stop()
                found["peer"]["busy_at_end"] = machine_busy()
            finally:
                stop_server(proc)

    return found


def run_child(flag: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run this script with `flag` in a child process (torch loaded here would slow the HTTP client later)."""
    settle(max_wait_s=60)
    probe = cpu_probe_ms()
    command = [
        sys.executable,
        __file__,
        flag,
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--concurrency",
        args.concurrency,
    ]
    command += [
        "--rounds",
        str(args.rounds),
        "--c1-requests",
        str(args.c1_requests),
        "--prompts",
        str(args.prompts),
    ]
    command += ["--cb-num-blocks", str(args.cb_num_blocks), "--cb-page-size", str(args.cb_page_size)]
    command += ["--cb-max-batch-tokens", str(args.cb_max_batch_tokens)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    command += chat_option_args(args)
    with CpuWindow() as cpu:
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result: dict[str, Any] = {}
    for line in child.stdout.splitlines():
        if line.startswith("CHILD-JSON "):
            result = json.loads(line.removeprefix("CHILD-JSON "))
        else:
            print(line, flush=True)
    result["cpu_busy_pct"] = cpu.busy_pct
    result["cpu_foreign_pct"] = cpu.foreign_pct
    result["cpu_probe_ms_before"] = probe
    print(f"  (machine-speed probe before: {probe:.0f} ms)", flush=True)
    if cpu.foreign_pct > args.foreign_max:
        print(f"  [other processes used {cpu.foreign_pct:.0f}% of the CPU meanwhile: distrust these figures]")
    return result


def _our_transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _peer_version() -> str | None:
    out = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
