"""LangChain against the server: `ChatOpenAI(...).bind_tools([...])` calls the tool, and answers from its result."""

from __future__ import annotations

import json
from typing import Any

from tests.tool_model import (
    ANSWER_AFTER_RESULT,
    ASK_WEATHER,
    MODEL_NAME,
    PARIS_CALL,
    WEATHER_RESULT,
    WEATHER_TOOLS,
)


def get_weather(city: str) -> str:
    """The tool LangChain runs: what the model learned a weather service answers."""
    assert city == "Paris"
    return WEATHER_RESULT


def _chat_model(base_url: str) -> Any:
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    return ChatOpenAI(
        model=MODEL_NAME,
        base_url=f"{base_url}/v1",
        api_key=SecretStr("not-needed"),
        temperature=0,
        max_retries=0,
    )


def test_bind_tools_round_trip(base_url: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = _chat_model(base_url)
    with_tools = llm.bind_tools(WEATHER_TOOLS)
    conversation: list[Any] = [HumanMessage(ASK_WEATHER[0]["content"])]
    call_message = with_tools.invoke(conversation)
    assert [(call["name"], call["args"]) for call in call_message.tool_calls] == [("get_weather", PARIS_CALL)]
    assert call_message.response_metadata["finish_reason"] == "tool_calls"

    call = call_message.tool_calls[0]
    conversation += [call_message, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    answer = with_tools.invoke(conversation)
    assert answer.content == ANSWER_AFTER_RESULT and not answer.tool_calls


def test_bind_tools_streamed(base_url: str) -> None:
    llm = _chat_model(base_url)
    merged: Any = None
    for piece in llm.bind_tools(WEATHER_TOOLS).stream(ASK_WEATHER[0]["content"]):
        merged = piece if merged is None else merged + piece
    assert merged is not None
    assert [(call["name"], call["args"]) for call in merged.tool_calls] == [("get_weather", PARIS_CALL)]
    assert json.loads(merged.tool_call_chunks[0]["args"]) == PARIS_CALL
