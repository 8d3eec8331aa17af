"""/v1/chat/completions through the unmodified openai SDK, against the tiny GLM."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "tiny-glm"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! 你好"}]


def _greedy(client: openai.OpenAI, max_tokens: int = 24, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=max_tokens, **extra
    )


def test_greedy_is_deterministic(client: openai.OpenAI) -> None:
    first, second = _greedy(client), _greedy(client)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content
    assert first.model == MODEL and first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"


def test_max_tokens_is_honoured_with_finish_reason_length(client: openai.OpenAI) -> None:
    reply = _greedy(client, max_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_usage_counts_equal_the_tokenizers(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = _greedy(client, max_tokens=5)
    counted = http.post("/tokenize", json={"model": MODEL, "messages": HELLO}).json()["count"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == counted
    assert reply.usage.total_tokens == counted + reply.usage.completion_tokens


def test_streamed_deltas_join_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    expected = _greedy(client, max_tokens=32)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [expected.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == expected.usage.model_dump()  # type: ignore[union-attr]


def test_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_framing_ends_with_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_string_ends_the_reply_before_it(client: openai.OpenAI) -> None:
    text = _greedy(client, max_tokens=32).choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    reply = _greedy(client, max_tokens=32, stop=[stop])
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=HELLO, temperature=1.0, top_p=0.9, max_tokens=24, seed=seed
        )
        return reply.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert {sample(s) for s in (1, 2, 3)} != {sample(7)}


def test_omitted_max_tokens_fills_the_rest_of_the_window(client: openai.OpenAI, http: httpx.Client) -> None:
    def count(words: int) -> tuple[int, int]:
        messages = [{"role": "user", "content": "word " * words}]
        body = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
        return body["count"], body["max_model_len"]

    one, window = count(1)
    tokens_per_word = (count(101)[0] - one) / 100
    words = int((window - one) / tokens_per_word) - 10
    prompt_tokens, _ = count(words)
    room = window - prompt_tokens
    assert 0 < room < 64
    messages = [{"role": "user", "content": "word " * words}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= room
    assert reply.usage.prompt_tokens == prompt_tokens


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_embedding_model_is_not_a_chat_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="all-MiniLM-L6-v2", messages=HELLO)


def test_prompt_beyond_the_window_is_a_400_with_the_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    message = caught.value.body["message"]  # type: ignore[index]
    assert "2048" in message and "100000 in the completion" in message
