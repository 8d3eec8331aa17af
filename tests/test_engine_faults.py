"""Faults inside the engine stay with the request they belong to; a broken engine says so and refuses work.

Real faults, injected where they happen in production: a weight row turned NaN (a corrupted checkpoint) that only
prompts holding that token touch, a tokenizer that fails on one token, an engine state no request should leave.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from deployments.chat_engine.continuous import ContinuousBatchingEngine
from serve_app.errors import ServiceUnavailable
from serve_app.protocol.engine import GenerateRequest, SamplingParams
from tests.engine_harness import generated_ids, prompt_ids, request, run


def _engine(model: Any, tokenizer: Any, ends: list[int]) -> ContinuousBatchingEngine:
    return ContinuousBatchingEngine(model, tokenizer, ends, max_num_seqs=6, max_model_len=512)


def _assert_consistent(engine: ContinuousBatchingEngine) -> None:
    """Nothing left behind: no row, no KV slot, no open stream, and the health check passes."""
    deadline = time.monotonic() + 5
    while engine.running_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_sequences == 0 and engine._cache.lengths == [] and engine.open_streams == 0
    assert engine.broken is None
    engine.check_alive()


def _poison_token(tokenizer: Any) -> int:
    """A token id that none of the ordinary test prompts contain."""
    used = {t for i in range(8) for t in prompt_ids(tokenizer, i)}
    return next(t for t in range(100, len(tokenizer)) if t not in used)


def test_nan_logits_after_the_prefill_fail_that_request_alone(parts: tuple[Any, Any, list[int]]) -> None:
    model, tokenizer, ends = parts
    poisoned_model = copy.deepcopy(model)
    poison = _poison_token(tokenizer)
    with torch.no_grad():
        poisoned_model.get_input_embeddings().weight[poison] = float("nan")
    engine = _engine(poisoned_model, tokenizer, ends)
    try:
        bad = GenerateRequest("bad", prompt_ids(tokenizer, 0)[:2] + [poison], SamplingParams(max_tokens=8))
        good = [request(tokenizer, i, temperature=0.8, seed=i) for i in range(3)]
        alone = [run(engine, [r])[0] for r in good]
        # One prefill wave: the bad prompt's logits are NaN after the forward pass; sampling them would raise.
        outcomes = run(engine, [good[0], bad, good[1], good[2]], return_exceptions=True)
        assert isinstance(outcomes[1], FloatingPointError), outcomes[1]
        assert [outcomes[0], outcomes[2], outcomes[3]] == alone
        _assert_consistent(engine)
        assert run(engine, good) == alone  # and the engine serves as before
    finally:
        engine.close()


class _FailsOnToken:
    """A tokenizer that cannot decode one token (a corrupt vocabulary entry), and is otherwise the real one."""

    def __init__(self, tokenizer: Any, bad_token: int) -> None:
        self._tokenizer = tokenizer
        self._bad = bad_token

    def decode(self, ids: Any, **kwargs: Any) -> str:
        if self._bad in list(ids):
            raise ValueError(f"cannot decode token {self._bad}")
        return str(self._tokenizer.decode(ids, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_a_token_that_fails_to_decode_mid_stream_fails_that_stream_alone(
    parts: tuple[Any, Any, list[int]],
) -> None:
    model, tokenizer, ends = parts
    clean = _engine(model, tokenizer, ends)
    requests = [request(tokenizer, i, max_tokens=16) for i in range(4)]
    try:
        expected = run(clean, requests)
    finally:
        clean.close()
    tokens = [generated_ids(model, tokenizer, ends, r) for r in requests]
    prompts = {t for r in requests for t in r.prompt_token_ids}
    # A token the first request generates mid-way and no other request (nor any prompt) contains.
    bad = next(t for t in tokens[0][3:] if t not in prompts and all(t not in other for other in tokens[1:]))
    engine = _engine(model, _FailsOnToken(tokenizer, bad), ends)
    try:
        outcomes = run(engine, requests, return_exceptions=True)
        assert isinstance(outcomes[0], ValueError), outcomes[0]
        assert outcomes[1:] == expected[1:]
        _assert_consistent(engine)
    finally:
        engine.close()


def test_a_seed_beyond_64_bits_is_served_not_raised(parts: tuple[Any, Any, list[int]]) -> None:
    model, tokenizer, ends = parts
    engine = _engine(model, tokenizer, ends)
    try:
        huge = request(tokenizer, 1, temperature=0.9, seed=-1180591620717411303424)
        ((_, tokens, finish),) = run(engine, [huge])
        assert tokens >= 1 and finish in ("stop", "length")
        _assert_consistent(engine)
    finally:
        engine.close()


@pytest.fixture
def endless(parts: tuple[Any, Any, list[int]]) -> Iterator[ContinuousBatchingEngine]:
    """An engine with no end tokens: a 1500-token request keeps its slot for all its steps."""
    model, tokenizer, _ = parts
    engine = ContinuousBatchingEngine(model, tokenizer, [], max_num_seqs=2, max_model_len=2048)
    yield engine
    engine.close()


def test_a_client_that_leaves_leaves_the_batch_within_a_step(
    parts: tuple[Any, Any, list[int]], endless: ContinuousBatchingEngine
) -> None:
    long = request(parts[1], 0, max_tokens=1500)

    async def leave_after_first_chunk() -> int:
        stream = endless.stream(long)
        await anext(stream)
        running_then = endless.running_sequences
        await stream.aclose()  # what Serve does when the HTTP client disconnects
        return running_then

    assert asyncio.run(leave_after_first_chunk()) == 1
    _assert_consistent(endless)  # within 5 s; one decode step of the tiny model takes ~2 ms


def test_a_broken_engine_refuses_with_503_and_fails_its_health_check(
    parts: tuple[Any, Any, list[int]], endless: ContinuousBatchingEngine
) -> None:
    running = request(parts[1], 0, max_tokens=1500)

    async def break_under_a_stream() -> BaseException:
        stream = endless.stream(running)
        await anext(stream)
        endless.break_for_tests()  # a KV slot that no row owns
        with pytest.raises(ServiceUnavailable) as refused:
            async for _ in stream:
                pass
        return refused.value

    refusal = asyncio.run(break_under_a_stream())
    assert (refusal.status_code, refusal.code) == (503, "replica_unavailable")
    assert refusal.headers and int(refusal.headers["Retry-After"]) >= 1
    with pytest.raises(RuntimeError, match="broken"):
        endless.check_alive()
    with pytest.raises(ServiceUnavailable):
        run(endless, [request(parts[1], 1)])
