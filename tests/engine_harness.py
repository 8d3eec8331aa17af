"""Driving a chat engine in-process, as the chat deployment does: requests in, collected outcomes out."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.protocol.engine import GenerateRequest, SamplingParams

Outcome = tuple[str, int, str | None]


def prompt_ids(tokenizer: Any, i: int) -> list[int]:
    chat = [{"role": "user", "content": f"question {i}: 你好 " * (i + 1)}]
    return list(
        tokenizer.encode(
            tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
    )


def request(tokenizer: Any, i: int, **sampling: Any) -> GenerateRequest:
    """Request `i` (its own prompt), greedy and 24 tokens unless `sampling` says otherwise."""
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling})
    return GenerateRequest(str(i), prompt_ids(tokenizer, i), params)


async def collect(engine: Any, generate: GenerateRequest) -> Outcome:
    text, last = "", None
    async for chunk in engine.stream(generate):
        assert "\ufffd" not in chunk.text
        text, last = text + chunk.text, chunk
    assert last is not None
    return text, last.completion_tokens, last.finish_reason


def run(engine: Any, requests: list[GenerateRequest], return_exceptions: bool = False) -> list[Any]:
    """All `requests` at once through `engine`; their outcomes in order (or their exceptions, if asked)."""

    async def all_at_once() -> list[Any]:
        return list(
            await asyncio.gather(*(collect(engine, r) for r in requests), return_exceptions=return_exceptions)
        )

    return asyncio.run(all_at_once())


def generated_ids(
    model: Any, tokenizer: Any, end_ids: list[int], generate: GenerateRequest, **options: Any
) -> list[int]:
    """The token ids transformers' own greedy `generate` adds for `generate` (its max_tokens; end tokens end it)."""
    import torch

    ids = torch.tensor([generate.prompt_token_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=generate.sampling.max_tokens,
            eos_token_id=end_ids,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return list(out[0, ids.shape[1] :].tolist())


def generate_text(
    model: Any, tokenizer: Any, end_ids: list[int], generate: GenerateRequest, **options: Any
) -> Outcome:
    """What transformers' own greedy `generate` gives for `generate`, as an engine outcome."""
    new = generated_ids(model, tokenizer, end_ids, generate, **options)
    ended = bool(new) and new[-1] in end_ids
    # Bytes that never form a character are dropped from streamed text (text_output.py), not sent as U+FFFD.
    text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True).replace("\ufffd", "")
    return text, len(new), "stop" if ended else "length"
