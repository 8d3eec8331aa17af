"""Constrained decoding in process: llguidance grammars over the tiny GLM's real tokenizer, random logits.

Whatever the logits, a constrained sequence can only end as the grammar allows: JSON its schema accepts, or
calls the tool-call parser reads back.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from deployments.chat_engine.grammar import (
    GrammarConstraint,
    UnenforceableGrammar,
    grammar_tokenizer,
    json_schema_grammar,
)
from serve_app.errors import InvalidRequest
from serve_app.protocol.openai import ChatCompletionRequest
from serve_app.tools.constraints import reply_grammar
from serve_app.tools.parser import ToolCallParser
from tests.tool_model import ASK_WEATHER, WEATHER_TOOLS

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_glm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_glm_path)


@pytest.fixture(scope="module")
def end_ids(tokenizer: Any) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]


def _decode(grammar: str, tokenizer: Any, end_ids: list[int], seed: int, extra_vocab: int = 0) -> str:
    """Sample from random logits (rows wider than the vocabulary, as a model's may be) under the grammar."""
    constraint = GrammarConstraint(grammar, grammar_tokenizer(tokenizer, end_ids))
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(400):
        row = torch.randn(len(tokenizer) + extra_vocab, generator=generator) * 4
        constraint.forbid(row)
        assert torch.isinf(row[len(tokenizer) :]).all()
        token = int(torch.multinomial(torch.softmax(row, -1), 1, generator=generator))
        if token in end_ids:
            break
        out.append(token)
        constraint.advance(token)
        if constraint.complete:
            break
    assert constraint.error == ""
    return tokenizer.decode(out)


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_output_always_validates(tokenizer: Any, end_ids: list[int], seed: int) -> None:
    text = _decode(json_schema_grammar(SCHEMA), tokenizer, end_ids, seed, extra_vocab=64)
    jsonschema.validate(json.loads(text), SCHEMA)


def _short_strings(tool: dict[str, Any]) -> dict[str, Any]:
    """The tool with its strings bounded and no other keys: random logits would rarely close a string."""
    parameters = tool["function"]["parameters"]
    properties = {name: {**spec, "maxLength": 10} for name, spec in parameters["properties"].items()}
    return {
        **tool,
        "function": {
            **tool["function"],
            "parameters": {**parameters, "properties": properties, "additionalProperties": False},
        },
    }


def _request(**fields: Any) -> ChatCompletionRequest:
    tools = [_short_strings(tool) for tool in WEATHER_TOOLS]
    return ChatCompletionRequest.model_validate({"messages": ASK_WEATHER, "tools": tools, **fields})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_forced_calls_are_what_the_parser_reads(
    tokenizer: Any, end_ids: list[int], seed: int, tool_choice: Any
) -> None:
    request = _request(tool_choice=tool_choice, parallel_tool_calls=seed % 2 == 0)
    grammar = reply_grammar(request)
    assert grammar is not None
    text = _decode(grammar, tokenizer, end_ids, seed)
    calls = ToolCallParser(request.callable_tools, request.parallel_tool_calls).parse(text)
    assert calls, text
    if isinstance(tool_choice, dict):
        assert {call.name for call in calls} == {"get_time"}


def test_a_token_outside_the_grammar_ends_the_sequence(tokenizer: Any, end_ids: list[int]) -> None:
    constraint = GrammarConstraint(json_schema_grammar(SCHEMA), grammar_tokenizer(tokenizer, end_ids))
    assert not constraint.complete
    constraint.advance(tokenizer.encode("x", add_special_tokens=False)[0])  # JSON cannot start with x
    assert constraint.complete and constraint.error


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)a"}}},
        {"type": "no-such-type"},
        {"allOf": [{"type": "object"}, {"not": {"type": "null"}}]},
        {"$ref": "https://example.com/schema.json"},
    ],
)
def test_unenforceable_schemas_are_refused_without_a_tokenizer(schema: dict[str, Any]) -> None:
    with pytest.raises(UnenforceableGrammar):
        json_schema_grammar(schema)
    request = ChatCompletionRequest.model_validate(
        {
            "messages": ASK_WEATHER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
    )
    with pytest.raises(InvalidRequest, match="cannot be enforced") as refused:
        reply_grammar(request)
    assert refused.value.param == "response_format.json_schema.schema"
