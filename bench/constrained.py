"""The cost of constrained decoding: glm-serve's engine at N concurrent streams, free vs `response_format`.

    python bench/constrained.py [--concurrency 16] [--max-tokens 128] [--rounds 2]

Drives the ContinuousBatchingEngine in process (no Ray, no HTTP; bench/chat.py's (a') part) on bench/chat.py's
larger tiny GLM and prompts, sampling at temperature 0.7 (seeded), once free and once constrained to
`{"type": "json_object"}` and to a small json_schema, and prints tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chat import make_messages, model_folder, prompt_ids

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
    "required": ["name", "age", "tags"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream and variant")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.chat_engine.continuous import ContinuousBatchingEngine
    from deployments.chat_engine.grammar import json_schema_grammar
    from deployments.model_files import end_token_ids
    from serve_app.profiles import CHAT_CPU_THREADS
    from serve_app.protocol.engine import GenerateRequest, SamplingParams

    torch.set_num_threads(CHAT_CPU_THREADS)
    folder = model_folder(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    requests = args.concurrency * args.rounds
    prompts = prompt_ids(tokenizer, make_messages(requests))
    ends = end_token_ids(model.generation_config.eos_token_id, tokenizer)
    engine = ContinuousBatchingEngine(model, tokenizer, ends, 32, model.config.max_position_embeddings)
    variants: dict[str, str | None] = {
        "free": None,
        "json_object": json_schema_grammar({"type": "object"}),
        "json_schema": json_schema_grammar(PERSON),
    }

    async def level(grammar: str | None, count: int) -> dict[str, Any]:
        work, tokens = iter(range(count)), [0]

        async def user() -> None:
            for i in work:
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=i, grammar=grammar)
                async for chunk in engine.stream(GenerateRequest(f"{i}", prompts[i], params)):
                    last = chunk
                tokens[0] += last.completion_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        return {"tokens_per_s": tokens[0] / elapsed, "tokens": tokens[0], "requests": count}

    async def run() -> None:
        await level(None, 8)  # warm-up
        free = None
        for name, grammar in variants.items():
            result = await level(grammar, requests)
            free = free or result["tokens_per_s"]
            print(
                f"{name:12} {args.concurrency} streams: {result['tokens_per_s']:7.1f} tokens/s "
                f"({result['tokens']} tokens, {result['requests']} requests; {result['tokens_per_s'] / free:.2f}x free)",
                flush=True,
            )

    try:
        asyncio.run(run())
    finally:
        engine.close()


if __name__ == "__main__":
    main()
