"""The continuous-batching engine in-process, held to transformers' own `generate` on the tiny GLM."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.chat_engine.continuous import ContinuousBatchingEngine
from deployments.chat_engine.sequential import SequentialEngine
from deployments.model_files import end_token_ids
from deployments.queue_deadline import QueueDeadline
from serve_app.errors import ServiceUnavailable, overloaded
from serve_app.protocol.engine import GenerateRequest, SamplingParams

Outcome = tuple[str, int, str | None]


@pytest.fixture(scope="module")
def parts(tiny_glm_path: str) -> tuple[Any, Any, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_glm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_glm_path).eval()
    return model, tokenizer, end_token_ids(model.generation_config.eos_token_id, tokenizer)


@pytest.fixture(scope="module")
def engines(parts: tuple[Any, Any, list[int]]) -> Any:
    model, tokenizer, ends = parts
    continuous = ContinuousBatchingEngine(model, tokenizer, ends, max_num_seqs=6, max_model_len=2048)
    yield continuous, SequentialEngine(model, tokenizer, ends)
    continuous.close()


def _prompt(tokenizer: Any, i: int) -> list[int]:
    chat = [{"role": "user", "content": f"question {i}: 你好 " * (i + 1)}]
    return tokenizer.encode(
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )


def _request(tokenizer: Any, i: int, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        str(i), _prompt(tokenizer, i), SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling})
    )


async def _collect(engine: Any, request: GenerateRequest) -> Outcome:
    text, last = "", None
    async for chunk in engine.stream(request):
        assert "\ufffd" not in chunk.text
        text, last = text + chunk.text, chunk
    assert last is not None
    return text, last.completion_tokens, last.finish_reason


def _run(engine: Any, requests: list[GenerateRequest]) -> list[Outcome]:
    async def all_at_once() -> list[Outcome]:
        return list(await asyncio.gather(*(_collect(engine, r) for r in requests)))

    return asyncio.run(all_at_once())


def test_batched_greedy_equals_generate_one_at_a_time(engines: Any, parts: Any) -> None:
    continuous, sequential = engines
    tokenizer = parts[1]
    requests = [_request(tokenizer, i) for i in range(10)]  # more than the 6 slots: some wait, then join
    expected = [_run(sequential, [r])[0] for r in requests]
    assert _run(continuous, requests) == expected
    assert continuous.active_sequences == 0


def test_seeded_sample_does_not_depend_on_its_batch(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    tokenizer = parts[1]
    seeded = _request(tokenizer, 0, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    alone = _run(continuous, [seeded])[0]
    crowded = _run(continuous, [seeded] + [_request(tokenizer, i, temperature=1.0) for i in range(1, 6)])[0]
    assert alone == crowded
    other_seed = _run(continuous, [_request(tokenizer, 0, temperature=0.9, top_p=0.9, top_k=40, seed=12)])[0]
    assert other_seed != alone


def test_repetition_penalty_matches_transformers(engines: Any, parts: Any) -> None:
    continuous, sequential = engines
    request = _request(parts[1], 3, repetition_penalty=1.3)
    assert _run(continuous, [request]) == _run(sequential, [request])
    assert _run(continuous, [request]) != _run(continuous, [_request(parts[1], 3)])


def test_stop_string_is_not_returned(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    text = _run(continuous, [_request(parts[1], 2)])[0][0]
    stop = text[8:11]
    stopped = _run(continuous, [_request(parts[1], 2, stop=(stop,))])[0]
    assert stopped[0] == text[: text.index(stop)] and stopped[2] == "stop"


def test_a_failing_prefill_fails_only_its_request(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    tokenizer = parts[1]
    broken = GenerateRequest(
        "bad", [10**6], SamplingParams(max_tokens=4, temperature=0.0)
    )  # id past the vocab
    good = _request(tokenizer, 1)

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(
                _collect(continuous, broken), _collect(continuous, good), return_exceptions=True
            )
        )

    failed, served = asyncio.run(both())
    assert isinstance(failed, (IndexError, RuntimeError))
    assert served == _run(continuous, [good])[0]


@pytest.mark.parametrize("kind", ["continuous", "sequential"])
def test_a_request_that_waits_past_the_queue_deadline_is_refused_and_the_running_one_is_not(
    parts: tuple[Any, Any, list[int]], kind: str
) -> None:
    model, tokenizer, ends = parts
    deadline = QueueDeadline(max_wait_s=0.05, retry_after_s=2)
    if kind == "continuous":
        engine: Any = ContinuousBatchingEngine(
            model, tokenizer, ends, max_num_seqs=1, max_model_len=2048, queue_deadline=deadline
        )
    else:
        engine = SequentialEngine(model, tokenizer, ends, queue_deadline=deadline)
    # Greedy on this prompt, the tiny model never emits an end token: the one slot stays taken for 1000 steps.
    holder = GenerateRequest(
        "holder", _prompt(tokenizer, 0), SamplingParams(max_tokens=1000, temperature=0.0)
    )

    async def hold_then_queue() -> tuple[Outcome, BaseException]:
        held = asyncio.create_task(_collect(engine, holder))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable) as refused:
            await _collect(engine, _request(tokenizer, 1))
        return await held, refused.value

    try:
        (_, tokens, finish), refusal = asyncio.run(hold_then_queue())
    finally:
        engine.close()
    assert (tokens, finish) == (1000, "length")
    assert (refusal.status_code, refusal.code, refusal.headers) == (503, "overloaded", {"Retry-After": "2"})
    assert engine.active_sequences == 0


def test_a_refusal_keeps_its_retry_after_when_ray_carries_it_to_the_ingress() -> None:
    import pickle

    from ray.exceptions import RayTaskError

    carried = pickle.loads(pickle.dumps(overloaded(3)))
    as_raised = RayTaskError("generate", "traceback", carried).as_instanceof_cause()
    assert isinstance(as_raised, ServiceUnavailable)
    assert (as_raised.status_code, as_raised.code, as_raised.headers) == (
        503,
        "overloaded",
        {"Retry-After": "3"},
    )
