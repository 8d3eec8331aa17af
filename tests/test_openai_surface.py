"""The rest of OpenAI's chat surface over HTTP with the `openai` SDK: logprobs, n, response_format, the newer
parameter names, penalties, accepted labels, and a 400 naming every field this server does not support."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.tool_model import WEATHER_TOOLS

MODEL = "tiny-glm"
HELLO: list[Any] = [{"role": "user", "content": "Hello"}]


def _chat(client: openai.OpenAI, **options: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=HELLO, **{"max_tokens": 12, **options})


def test_logprobs_and_top_logprobs(client: openai.OpenAI, parts: Any) -> None:
    reply = _chat(client, temperature=0, logprobs=True, top_logprobs=20, max_tokens=32)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    # One per generated token (an end token included when the reply ended on one).
    assert reply.usage.completion_tokens == len(entries)
    # The text tokens' bytes, joined, are the reply (bytes that never form a character are dropped from it).
    control = {token.content for token in parts[1].added_tokens_decoder.values()}
    joined = b"".join(bytes(entry.bytes) for entry in entries if entry.token not in control)
    assert joined.decode("utf-8", "replace").replace("\ufffd", "") == choice.message.content
    # A token that holds part of a character (the tiny model's byte tokens) reads as U+FFFD alone; its bytes
    # are the part it holds, not U+FFFD's.
    tops = [top for entry in entries for top in entry.top_logprobs]
    parts_of_characters = [top for top in tops if top.token == "\ufffd"]
    assert parts_of_characters
    for top in parts_of_characters:
        with pytest.raises(UnicodeDecodeError):
            bytes(top.bytes).decode()
    for entry in [*entries, *tops]:
        if "\ufffd" not in entry.token:
            assert entry.bytes == list(entry.token.encode())
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 20
        assert [top.logprob for top in entry.top_logprobs] == sorted(
            (top.logprob for top in entry.top_logprobs), reverse=True
        )
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
    assert _chat(client, temperature=0).choices[0].logprobs is None


def test_streamed_logprobs(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    whole = _chat(client, temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [(e.token, len(e.top_logprobs)) for e in entries] == [(e.token, 2) for e in whole]


def test_n_choices_with_a_seed(client: openai.OpenAI) -> None:
    first = _chat(client, n=3, seed=7, temperature=1.0)
    again = _chat(client, n=3, seed=7, temperature=1.0)
    single = _chat(client, n=1, seed=7, temperature=1.0)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]  # reproducible
    assert len(set(texts)) == 3  # each choice its own stream
    assert texts[0] == single.choices[0].message.content  # the first choice uses the seed itself
    assert first.usage.completion_tokens > single.usage.completion_tokens


def test_n_choices_streamed(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, n=3, seed=7, temperature=1.0, stream=True))
    texts: dict[int, str] = {}
    finished: set[int] = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    whole = _chat(client, n=3, seed=7, temperature=1.0)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [choice.message.content for choice in whole.choices]


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_completion_tokens=3
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 3
    assert reply.choices[0].finish_reason == "length"


def test_penalties_change_a_repetitive_reply(client: openai.OpenAI) -> None:
    plain = _chat(client, temperature=0, max_tokens=48)
    penalized = _chat(client, temperature=0, max_tokens=48, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].message.content != penalized.choices[0].message.content


def test_json_object(client: openai.OpenAI) -> None:
    # Random weights may keep a JSON string going past any budget: every reply that ends is an object, and with
    # these seeds (fixed) most do.
    replies = [
        _chat(client, response_format={"type": "json_object"}, max_tokens=200, temperature=0.7, seed=seed)
        for seed in range(1, 7)
    ]
    ended = [r.choices[0].message.content for r in replies if r.choices[0].finish_reason == "stop"]
    assert ended, [r.choices[0].message.content for r in replies]
    assert all(isinstance(json.loads(text), dict) for text in ended)


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema(client: openai.OpenAI, stream: bool) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    reply = _chat(client, response_format=response_format, max_tokens=200, seed=2, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    else:
        assert reply.choices[0].finish_reason == "stop"
        text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_an_unenforceable_schema_is_400(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
    body = {
        "messages": HELLO,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and "cannot be enforced" in error["message"]


def test_user_and_metadata_are_accepted(client: openai.OpenAI) -> None:
    reply = _chat(client, user="user-1234", metadata={"team": "search"}, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


UNSUPPORTED = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "high",
    "service_tier": "flex",
    "store": True,
    "no_such_option": 1,
}


def test_fields_that_ask_nothing_this_server_does_not_do_are_accepted(http: httpx.Client) -> None:
    """Labels (`user`, `safety_identifier`, `prompt_cache_key`, `metadata`), no storage, the default tier."""
    body = {
        "messages": HELLO,
        "max_tokens": 2,
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert http.post("/v1/chat/completions", json={**body, "service_tier": "default"}).status_code == 200


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_every_unsupported_field_is_a_400_naming_it(http: httpx.Client, field: str) -> None:
    response = http.post("/v1/chat/completions", json={"messages": HELLO, field: UNSUPPORTED[field]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(
    ("case", "message", "param"),
    [
        (
            "an image part",
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages.0",
        ),
        ("unknown message field", {"role": "user", "content": "x", "audio": {"id": "a"}}, "messages.0.audio"),
    ],
)
def test_unsupported_message_parts_are_400(http: httpx.Client, case: str, message: Any, param: str) -> None:
    response = http.post("/v1/chat/completions", json={"messages": [message]})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith(param)


def test_top_logprobs_needs_logprobs(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": HELLO, "top_logprobs": 2})
    assert response.status_code == 400 and "logprobs" in response.json()["error"]["message"]


def test_glm_api_passes_message_tools_to_the_template(http: httpx.Client) -> None:
    """GLM-API forwarded a system message's `tools` to the model (ChatGLM3's format): they reach the template,
    which writes them after the message's text."""
    system = {"role": "system", "content": "You can use tools."}
    base = {"model": "tiny-glm-tools", "max_tokens": 1, "temperature": 0}
    plain = http.post("/chat", json={**base, "messages": [system, {"role": "user", "content": "hi"}]})
    with_tools = http.post(
        "/chat",
        json={
            **base,
            "messages": [
                {**system, "tools": [t["function"] for t in WEATHER_TOOLS]},
                {"role": "user", "content": "hi"},
            ],
        },
    )
    assert plain.status_code == with_tools.status_code == 200
    assert with_tools.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 50
