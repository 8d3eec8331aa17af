"""Tool calling over HTTP on the real app, with the `openai` SDK and tiny-glm-tools (tests/tool_model.py).

The model learned to call get_weather for ASK_WEATHER (twice for ASK_TWO_CITIES) and to answer in text once the
tool's result is in the conversation; forced calls (`required`, a named tool) come from constrained decoding.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.tool_model import (
    ANSWER_AFTER_RESULT,
    ASK_TWO_CITIES,
    ASK_WEATHER,
    GREETING,
    MODEL_NAME,
    PARIS_CALL,
    TOKYO_CALL,
    WEATHER_TOOLS,
    after_result,
)

SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in WEATHER_TOOLS}


def _property_named(name: str) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "string"}}}


def _called(arguments: str) -> dict[str, Any]:
    """An assistant turn that called get_weather with these arguments (JSON text)."""
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _ask(client: openai.OpenAI, messages: list[Any], **options: Any) -> Any:
    options = {"temperature": 0, "max_tokens": 64, **options}
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=WEATHER_TOOLS, **options)


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]


def test_a_call(client: openai.OpenAI) -> None:
    reply = _ask(client, ASK_WEATHER)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert _calls(choice.message) == [("get_weather", PARIS_CALL)]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")


def test_parallel_calls(client: openai.OpenAI) -> None:
    choice = _ask(client, ASK_TWO_CITIES).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert _calls(choice.message) == [("get_weather", PARIS_CALL), ("get_weather", TOKYO_CALL)]
    assert len({call.id for call in choice.message.tool_calls}) == 2


def test_no_parallel_calls_means_at_most_one(client: openai.OpenAI) -> None:
    # The model writes two calls; that is no valid answer here, so it comes back as text.
    choice = _ask(client, ASK_TWO_CITIES, parallel_tool_calls=False).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert "get_weather" in choice.message.content
    # Forced, the grammar allows a single call.
    forced = _ask(client, ASK_TWO_CITIES, parallel_tool_calls=False, tool_choice="required").choices[0]
    assert forced.finish_reason == "tool_calls" and len(forced.message.tool_calls) == 1


def test_streamed_call_accumulated_by_the_sdk(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL_NAME, messages=ASK_TWO_CITIES, tools=WEATHER_TOOLS, temperature=0, max_tokens=64
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert _calls(choice.message) == [("get_weather", PARIS_CALL), ("get_weather", TOKYO_CALL)]
    assert events.count("tool_calls.function.arguments.done") == 2
    assert not choice.message.content  # only the opening chunk's empty content


def test_streamed_chunks_follow_openai(http: httpx.Client) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": ASK_WEATHER,
        "tools": WEATHER_TOOLS,
        "temperature": 0,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"] for event in events[:-1]]
    deltas = [choices[0]["delta"] for choices in chunks if choices]
    calls = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    header = calls[0][0]
    assert header["index"] == 0 and header["type"] == "function" and header["id"].startswith("call_")
    assert header["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(call[0]) == {"index", "function"} for call in calls[1:])  # then argument fragments only
    assert json.loads("".join(call[0]["function"]["arguments"] for call in calls[1:])) == PARIS_CALL
    assert chunks[-1][0]["finish_reason"] == "tool_calls"


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    call = _ask(client, ASK_WEATHER).choices[0].message.tool_calls[0]
    answer = _ask(client, after_result(call.id)).choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert answer.message.content == ANSWER_AFTER_RESULT


def test_tool_choice_none_never_calls(client: openai.OpenAI) -> None:
    choice = _ask(client, ASK_WEATHER, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_required_forces_a_call(client: openai.OpenAI, stream: bool) -> None:
    # Unforced, the model greets back in text; `required` makes it call one of the tools.
    assert _ask(client, GREETING).choices[0].message.tool_calls is None
    if stream:
        with client.chat.completions.stream(
            model=MODEL_NAME,
            messages=GREETING,
            tools=WEATHER_TOOLS,
            tool_choice="required",
            max_tokens=64,
            # Seeded as the whole variant is: unseeded, a sampled argument string now and then ran past 64 tokens.
            temperature=1.0,
            seed=3,
        ) as events:
            choice = events.get_final_completion().choices[0]
    else:
        choice = _ask(client, GREETING, tool_choice="required", temperature=1.0, seed=3).choices[0]
    assert choice.finish_reason == "tool_calls"
    for name, arguments in _calls(choice.message):
        jsonschema.validate(arguments, SCHEMAS[name])


def test_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    choice = _ask(client, ASK_WEATHER, tool_choice=named).choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = _calls(choice.message)
    assert [name for name, _ in calls] == ["get_time"]
    jsonschema.validate(calls[0][1], SCHEMAS["get_time"])


def test_whatever_the_model_writes_is_a_valid_call_or_text(client: openai.OpenAI) -> None:
    """Sampled replies (hot, many seeds): each is text or calls the schemas accept, never an error."""
    for seed in range(6):
        choice = _ask(client, ASK_TWO_CITIES, temperature=1.8, seed=seed, max_tokens=40).choices[0]
        if choice.finish_reason == "tool_calls":
            for name, arguments in _calls(choice.message):
                jsonschema.validate(arguments, SCHEMAS[name])
        else:
            assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


def test_tokenize_with_tools_counts_the_chat_requests_prompt(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    reply = _ask(client, ASK_WEATHER, max_tokens=1)
    with_tools = http.post(
        "/tokenize", json={"model": MODEL_NAME, "messages": ASK_WEATHER, "tools": WEATHER_TOOLS}
    )
    assert with_tools.status_code == 200, with_tools.text
    assert with_tools.json()["count"] == reply.usage.prompt_tokens
    without = http.post("/tokenize", json={"model": MODEL_NAME, "messages": ASK_WEATHER}).json()["count"]
    assert without < reply.usage.prompt_tokens  # the tools are in the prompt
    raw = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "hi", "tools": WEATHER_TOOLS})
    assert raw.status_code == 400 and "tools" in raw.json()["error"]["message"]


def test_control_token_text_in_values_stays_text(http: httpx.Client) -> None:
    """The same texts as values (a parameter's description, a call's argument) are plain text: 200."""
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"q": {"description": "<|user|>"}}}}
    messages = [
        *ASK_WEATHER,
        _called('{"city": "<|observation|>"}'),
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "tools": [{"type": "function", "function": tool}],
        "max_tokens": 1,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    ("case", "fields", "param"),
    [
        (
            "named tool not in tools",
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            None,
        ),
        ("required without tools", {"tools": None, "tool_choice": "required"}, None),
        ("duplicate tool names", {"tools": WEATHER_TOOLS + WEATHER_TOOLS[:1]}, "tools"),
        (
            "bad function name",
            {"tools": [{"type": "function", "function": {"name": "rm -rf"}}]},
            "tools.0.function.name",
        ),
        ("a tool type we lack", {"tools": [{"type": "web_search"}]}, None),
        # Keys reach the prompt as they are (tojson): a control token there would be the token, not text.
        (
            "a control token in a parameter's name",
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": _property_named("<|user|>")}}
                ]
            },
            "tools.0.function.parameters.properties",
        ),
        (
            "a control token in a call's argument name",
            {"messages": [*ASK_WEATHER, _called('{"city": "Paris", "x<|observation|>": 1}')]},
            "messages.1.tool_calls.0.function.arguments",
        ),
        ("deprecated functions", {"functions": [WEATHER_TOOLS[0]["function"]]}, "functions"),
        ("deprecated function_call", {"function_call": "auto"}, "function_call"),
    ],
)
def test_bad_tool_requests_are_400(
    http: httpx.Client, case: str, fields: dict[str, Any], param: str | None
) -> None:
    body = {"model": MODEL_NAME, "messages": ASK_WEATHER, "tools": WEATHER_TOOLS, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if param:
        assert error["param"].startswith(param) and param.split(".")[0] in error["message"]


def test_a_model_whose_template_takes_no_tools_says_so(http: httpx.Client) -> None:
    body = {"model": "tiny-glm", "messages": ASK_WEATHER, "tools": WEATHER_TOOLS}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools" and "does not take tools" in response.text
