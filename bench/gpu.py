"""Decode speed of glm-serve's engine on one CUDA GPU, on a GLM-4-9B-shaped model with random bf16 weights.

    python bench/gpu.py                      # on a machine with one CUDA GPU; ~3-5 minutes, budget 8
    python bench/gpu.py --tiny --device cpu  # the same code path on a tiny shape, on CPU, in seconds

No download: the model is GlmForCausalLM built from GLM-4-9B's config (hidden 4096, 40 layers, 32 query heads,
2 KV heads of 128, MLP 13696, vocab 151552; ~9.4 B parameters, ~18.8 GB in bf16) directly on the GPU with
random weights, and a synthetic word-level tokenizer over the same vocabulary (every id decodes to a word).
Prompts are random ids, 1,024 tokens each. Printed:

  - the copy bandwidth of the device (a device-to-device copy: bytes read + written / time) and, where torch
    reports the memory clock and bus width, the nominal peak (2 x clock x bus width / 8);
  - the batch-1 bandwidth limit: bytes one decode step must read (every weight but the input embedding table,
    which is read one row at a time, plus the batch's KV cache) / bandwidth = tokens/s at best;
  - decode tokens/s of ContinuousBatchingEngine (deployments/chat_engine/continuous.py, in-process, no Ray) at
    1, 16 and 64 sequences, and of transformers' own continuous batching (`generate_batch`) on the same model
    and prompts. Decode only: each load runs with a short and a long completion budget, all requests at once,
    greedy, no end token; decode tokens/s = (tokens_long - tokens_short) / (seconds_long - seconds_short), so
    the prefill of the prompts cancels out;
  - peak GPU memory (torch.cuda.max_memory_allocated) of the weights and of each load.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TOKENS = 1024
BATCHES = (1, 16, 64)
BUDGETS = (16, 144)  # completion tokens of the short and the long run: 128 decode steps apart
TIME_BUDGET_S = 8 * 60


@dataclass(frozen=True)
class Shape:
    """The model and load one run measures."""

    config: dict[str, Any]
    prompt_tokens: int
    batches: tuple[int, ...]
    budgets: tuple[int, int]
    page_size: int  # transformers' KV-cache page (tokens)
    copy_bytes: int  # buffer size of the bandwidth measurement


GLM4_9B = Shape(
    config={
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "rms_norm_eps": 1.5625e-07,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338],
        "pad_token_id": 151329,
    },
    prompt_tokens=PROMPT_TOKENS,
    batches=BATCHES,
    budgets=BUDGETS,
    page_size=256,
    copy_bytes=2**31,
)

TINY = Shape(
    config={
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "eos_token_id": [0],
        "pad_token_id": 0,
    },
    prompt_tokens=16,
    batches=(1, 2),
    budgets=(2, 6),
    page_size=16,
    copy_bytes=2**20,
)


def glm_config(shape: Shape) -> Any:
    from transformers import GlmConfig

    return GlmConfig(**shape.config)


def build_model(shape: Shape, device: str, dtype: Any) -> Any:
    """GlmForCausalLM with transformers' random init, allocated on `device` in `dtype` from the start (no
    float32 copy, nothing in CPU memory for a GPU build)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(glm_config(shape), dtype=dtype)
    return model.eval()


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with one word per id (`t0 t1 ...`): the engine detokenizes every token it makes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0")


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()  # type: ignore[no-any-return]


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_step_bytes(model: Any, shape: Shape, batch: int = 1) -> int:
    """Bytes one decode step reads at least: every weight but the input embedding table (one row per sequence),
    plus the batch's KV cache at the middle of the long run."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    context = shape.prompt_tokens + shape.budgets[1] // 2
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context
    element = embedding.element_size()
    return weight_bytes(model) - embedding.numel() * element + batch * kv * element


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - started)


def nominal_bandwidth(device: str) -> float | None:
    """Peak memory bandwidth from the device's memory clock and bus width, where torch reports them."""
    import torch

    if not device.startswith("cuda"):
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


@dataclass(frozen=True)
class Decode:
    """One load at two completion budgets; the difference is decode alone."""

    batch: int
    tokens: tuple[int, int]
    seconds: tuple[float, float]
    peak_bytes: int | None

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens[1] - self.tokens[0]) / max(self.seconds[1] - self.seconds[0], 1e-9)


def engine_decode(model: Any, tokenizer: Any, shape: Shape, batch: int, device: str) -> Decode:
    """glm-serve's ContinuousBatchingEngine, driven as the chat replica drives it (no Ray, no HTTP)."""
    from deployments.chat_engine.continuous import ContinuousBatchingEngine
    from serve_app.protocol.engine import GenerateRequest, SamplingParams

    prompts = random_prompts(batch, shape.prompt_tokens, model.config.vocab_size, seed=batch)
    _reset_peak(device)
    engine = ContinuousBatchingEngine(
        model=model,
        tokenizer=tokenizer,
        end_token_ids=[],  # no end token: every request runs to its budget
        max_num_seqs=batch,
        max_model_len=shape.prompt_tokens + max(shape.budgets),
    )

    async def one(i: int, budget: int) -> int:
        request = GenerateRequest(
            f"{budget}-{i}", prompts[i], SamplingParams(max_tokens=budget, temperature=0.0)
        )
        tokens = 0
        async for chunk in engine.stream(request):
            tokens = chunk.completion_tokens
        return tokens

    async def load(budget: int) -> tuple[int, float]:
        started = time.perf_counter()
        done = await asyncio.gather(*(one(i, budget) for i in range(batch)))
        return sum(done), time.perf_counter() - started

    try:
        asyncio.run(load(2))  # warm-up: first kernels, allocator
        short, long = (asyncio.run(load(budget)) for budget in shape.budgets)
    finally:
        engine.close()
    return Decode(batch, (short[0], long[0]), (short[1], long[1]), peak_memory(device))


def transformers_decode(model: Any, shape: Shape, batch: int, device: str) -> Decode:
    """transformers' continuous batching (`generate_batch`, paged KV cache) on the same model and prompts."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = random_prompts(batch, shape.prompt_tokens, model.config.vocab_size, seed=batch)
    pages = batch * math.ceil((shape.prompt_tokens + max(shape.budgets)) / shape.page_size)
    cb = ContinuousBatchingConfig(
        page_size=shape.page_size,
        num_blocks=pages + 1,  # bounded: unbounded, it sizes its cache from free memory
        max_batch_tokens=max(shape.prompt_tokens, 2048),
        max_requests_per_batch=batch,
        # Flash kernels would be fetched from the hub: this machine may have no network.
        auto_switch_to_flash=False,
    )

    def load(budget: int) -> tuple[int, float]:
        generation = GenerationConfig(
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        started = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
        elapsed = time.perf_counter() - started
        if len(results) != batch:
            raise RuntimeError(f"generate_batch returned {len(results)} of {batch} results")
        return sum(len(r.generated_tokens) for r in results.values()), elapsed

    _reset_peak(device)
    load(2)  # warm-up
    short, long = (load(budget) for budget in shape.budgets)
    return Decode(batch, (short[0], long[0]), (short[1], long[1]), peak_memory(device))


def _gb(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def run(shape: Shape, device: str) -> int:
    import torch

    started = time.monotonic()
    dtype = torch.bfloat16
    print(f"device: {_device_name(device)}; torch {torch.__version__}", flush=True)
    _reset_peak(device)
    model = build_model(shape, device, dtype)
    tokenizer = synthetic_tokenizer(model.config.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GlmForCausalLM {shape.config['num_hidden_layers']} layers, hidden {shape.config['hidden_size']}, "
        f"{params / 1e9:.2f} B parameters, {_gb(weight_bytes(model))} in {dtype}; built in "
        f"{time.monotonic() - started:.0f} s; peak memory {_gb(peak_memory(device))}",
        flush=True,
    )
    measured = copy_bandwidth(device, shape.copy_bytes)
    nominal = nominal_bandwidth(device)
    step = decode_step_bytes(model, shape)
    print(
        f"bandwidth: copy {_gb(measured)}/s, nominal {_gb(nominal)}/s\n"
        f"batch-1 limit: {_gb(step)} read per decode step / bandwidth = {measured / step:.0f} tokens/s (copy)"
        + (f", {nominal / step:.0f} tokens/s (nominal)" if nominal else ""),
        flush=True,
    )
    print(
        f"decode tokens/s, {shape.prompt_tokens}-token prompts, budgets {shape.budgets[0]} and "
        f"{shape.budgets[1]} tokens (greedy, no end token):",
        flush=True,
    )
    for name, measure in (
        ("glm-serve engine", lambda b: engine_decode(model, tokenizer, shape, b, device)),
        ("transformers generate_batch", lambda b: transformers_decode(model, shape, b, device)),
    ):
        for batch in shape.batches:
            if time.monotonic() - started > TIME_BUDGET_S:
                print(
                    f"  {name:>28} x{batch:<3} skipped: past the {TIME_BUDGET_S // 60} min budget", flush=True
                )
                continue
            try:
                result = measure(batch)
            except Exception as exc:  # noqa: BLE001 (one failing load must not hide the others' figures)
                print(f"  {name:>28} x{batch:<3} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(
                f"  {name:>28} x{batch:<3} {result.tokens_per_s:9.1f} tokens/s "
                f"({result.tokens_per_s / batch:.1f} per sequence; runs {result.seconds[0]:.1f} s / "
                f"{result.seconds[1]:.1f} s; peak memory {_gb(result.peak_bytes)})",
                flush=True,
            )
    print(f"total {time.monotonic() - started:.0f} s; peak memory {_gb(peak_memory(device))}", flush=True)
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny GLM shape and load: the code path, in seconds"
    )
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"bench/gpu.py needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
            "False). Run it on a GPU machine with a CUDA build of torch (README: GPU).",
            file=sys.stderr,
        )
        return 2
    return run(TINY if args.tiny else GLM4_9B, args.device)


if __name__ == "__main__":
    sys.exit(main())
