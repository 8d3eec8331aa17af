"""Sampling on the real engine, by distribution: every parameter changes the output as documented.

The tiny GLM's random head gives a nearly uniform next-token distribution, which no parameter visibly changes, so
these tests use a copy whose output layer is scaled up: the same model with confident logits. Every statistic
comes from a few hundred seeded samples, so the tests are deterministic, not flaky.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from typing import Any

import pytest
import torch

from deployments.chat_engine.continuous import ContinuousBatchingEngine
from deployments.chat_engine.sequential import SequentialEngine
from serve_app.protocol.engine import GenerateRequest, SamplingParams
from tests.engine_harness import prompt_ids, request, run

SAMPLES = 300


@pytest.fixture(scope="module")
def confident(parts: tuple[Any, Any, list[int]]) -> tuple[Any, Any, list[int]]:
    model, tokenizer, ends = parts
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(25.0)
    return sharp, tokenizer, ends


@pytest.fixture(scope="module")
def engine(confident: tuple[Any, Any, list[int]]) -> Any:
    model, tokenizer, _ = confident
    # No end tokens: every sample is a real choice among the vocabulary.
    continuous = ContinuousBatchingEngine(model, tokenizer, [], max_num_seqs=32, max_model_len=256)
    yield continuous
    continuous.close()


@pytest.fixture(scope="module")
def next_token_probs(confident: tuple[Any, Any, list[int]]) -> torch.Tensor:
    model, tokenizer, _ = confident
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids(tokenizer, 1)])).logits[0, -1].float()
    return torch.softmax(logits, dim=-1)


def _sampled(engine: Any, tokenizer: Any, **sampling: Any) -> Counter[str]:
    """The first token of SAMPLES seeded samples (seeds 0..SAMPLES-1), counted by its text."""
    requests = [
        GenerateRequest(
            str(seed),
            prompt_ids(tokenizer, 1),
            SamplingParams(max_tokens=1, seed=seed, logprobs=True, **sampling),
        )
        for seed in range(SAMPLES)
    ]
    return Counter(token for generate in requests for token in _tokens(engine, generate))


def _top_texts(tokenizer: Any, probs: torch.Tensor, k: int) -> set[str]:
    """The k most likely next tokens, as the engine names them in its logprobs."""
    return {tokenizer.decode([int(t)], skip_special_tokens=False) for t in torch.topk(probs, k).indices}


def test_top_k_one_and_a_tiny_temperature_are_greedy(engine: Any, confident: Any) -> None:
    tokenizer = confident[1]
    greedy = run(engine, [request(tokenizer, 1, max_tokens=12)])[0]
    assert run(engine, [request(tokenizer, 1, max_tokens=12, temperature=1.0, top_k=1, seed=3)])[0] == greedy
    assert run(engine, [request(tokenizer, 1, max_tokens=12, temperature=1e-6, seed=3)])[0] == greedy


def test_temperature_one_samples_the_models_distribution(
    engine: Any, confident: Any, next_token_probs: torch.Tensor
) -> None:
    tokenizer = confident[1]
    counts = _sampled(engine, tokenizer, temperature=1.0)
    top = torch.topk(next_token_probs, 1)
    (top_text,) = _top_texts(tokenizer, next_token_probs, 1)
    share = counts[top_text] / SAMPLES
    expected = float(top.values[0])
    # A binomial's standard deviation at 300 samples is at most ~0.029: 4 of them is a wide, stable margin.
    assert abs(share - expected) < 0.12, (share, expected)


def test_small_top_p_keeps_only_the_most_likely_tokens(
    engine: Any, confident: Any, next_token_probs: torch.Tensor
) -> None:
    tokenizer = confident[1]
    top_p = 0.5
    ranked = torch.sort(next_token_probs, descending=True).values
    nucleus = int((torch.cumsum(ranked, 0) - ranked < top_p).sum())  # tokens kept by top_p
    counts = _sampled(engine, tokenizer, temperature=1.0, top_p=top_p)
    assert set(counts) <= _top_texts(tokenizer, next_token_probs, nucleus), (counts, nucleus)
    unrestricted = _sampled(engine, tokenizer, temperature=1.0)
    assert len(unrestricted) > len(counts)


def test_top_k_keeps_only_the_k_most_likely_tokens(
    engine: Any, confident: Any, next_token_probs: torch.Tensor
) -> None:
    tokenizer = confident[1]
    counts = _sampled(engine, tokenizer, temperature=1.5, top_k=3)
    assert set(counts) <= _top_texts(tokenizer, next_token_probs, 3) and len(counts) >= 2, counts


def test_a_high_temperature_spreads_the_choices_and_a_low_one_concentrates_them(
    engine: Any, confident: Any
) -> None:
    tokenizer = confident[1]
    cold = _sampled(engine, tokenizer, temperature=0.3)
    warm = _sampled(engine, tokenizer, temperature=1.0)
    hot = _sampled(engine, tokenizer, temperature=2.0)
    assert len(cold) < len(warm) < len(hot), (len(cold), len(warm), len(hot))
    assert max(cold.values()) > max(warm.values()) > max(hot.values())


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_lower_how_often_tokens_repeat(engine: Any, confident: Any, penalty: str) -> None:
    tokenizer = confident[1]

    def most_repeated(**sampling: Any) -> int:
        generate = request(tokenizer, 2, max_tokens=64, logprobs=True, **sampling)
        tokens = _tokens(engine, generate)
        return max(Counter(tokens).values())

    assert most_repeated(**{penalty: 2.0}) < most_repeated()


def _tokens(engine: Any, generate: GenerateRequest) -> list[str]:
    async def all_tokens() -> list[str]:
        return [lp.token async for chunk in engine.stream(generate) for lp in chunk.logprobs or ()]

    return asyncio.run(all_tokens())


def test_logprobs_are_the_models_and_rank_the_alternatives(
    engine: Any, confident: Any, next_token_probs: torch.Tensor
) -> None:
    tokenizer = confident[1]
    generate = request(tokenizer, 1, max_tokens=1, logprobs=True, top_logprobs=5)

    async def first_logprob() -> Any:
        async for chunk in engine.stream(generate):
            return chunk.logprobs[0]

    entry = asyncio.run(first_logprob())
    best = torch.topk(next_token_probs, 5)
    assert entry.token == tokenizer.decode([int(best.indices[0])])
    assert entry.logprob == pytest.approx(float(torch.log(best.values[0])), abs=1e-4)
    assert [top.logprob for top in entry.top] == pytest.approx(torch.log(best.values).tolist(), abs=1e-4)


def test_both_engines_sample_the_same_text_for_the_same_seed(
    engine: Any, confident: Any, parts: tuple[Any, Any, list[int]]
) -> None:
    model, tokenizer, _ = confident
    sequential = SequentialEngine(model, tokenizer, [])
    try:
        for seed in (1, 2, 3):
            sampled = request(tokenizer, 4, max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=seed)
            penalized = request(
                tokenizer, 4, max_tokens=16, temperature=0.8, frequency_penalty=0.5, seed=seed
            )
            assert run(engine, [sampled, penalized]) == run(sequential, [sampled]) + run(
                sequential, [penalized]
            )
    finally:
        sequential.close()


def test_logit_bias_bans_and_forces_tokens(
    engine: Any, confident: Any, next_token_probs: torch.Tensor
) -> None:
    tokenizer = confident[1]
    best, runner_up = torch.topk(next_token_probs, 2).indices.tolist()
    banned = _sampled(engine, tokenizer, temperature=0.0, logit_bias=((best, -100.0),))
    assert set(banned) == _top_texts(tokenizer, next_token_probs, 2) - _top_texts(
        tokenizer, next_token_probs, 1
    )
    unlikely = int(torch.argmin(next_token_probs))
    forced = _sampled(engine, tokenizer, temperature=1.0, logit_bias=((unlikely, 100.0),))
    assert set(forced) == {tokenizer.decode([unlikely], skip_special_tokens=False)}
    assert runner_up != best
