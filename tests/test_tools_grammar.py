"""Constrained decoding in process: llguidance grammars over the tiny GLM's real tokenizer, random logits.

Whatever the logits, a constrained sequence can only end as the grammar allows: JSON its schema accepts, or
calls the tool-call parser reads back.
"""

from __future__ import annotations

import json
import re
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
from serve_app.protocol.engine import CallSyntax
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
@pytest.mark.parametrize("call_syntax", ["json", "python"])
@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_forced_calls_are_what_the_parser_reads(
    tokenizer: Any, end_ids: list[int], seed: int, call_syntax: CallSyntax, tool_choice: Any
) -> None:
    """In the model's own syntax: GLM-4's JSON object, or ChatGLM3's `tool_call(...)` block."""
    request = _request(tool_choice=tool_choice, parallel_tool_calls=seed % 2 == 0)
    grammar = reply_grammar(request, call_syntax)
    assert grammar is not None
    text = _decode(grammar, tokenizer, end_ids, seed)
    calls = ToolCallParser(request.callable_tools, request.parallel_tool_calls).parse(text)
    assert calls, text
    if isinstance(tool_choice, dict):
        assert {call.name for call in calls} == {"get_time"}
    blocks = CHATGLM3_CALL.findall(text)
    assert len(blocks) == (len(calls) if call_syntax == "python" else 0), text


# ChatGLM3's call: the name, a newline, then its block (as its chat template writes an assistant's calls).
CHATGLM3_CALL = re.compile(r"(?:^|\n)[\w-]+\n ```python\ntool_call\((.*?)\)\n```", re.DOTALL)

BOOKING = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "nights": {"type": "integer", "minimum": 1, "maximum": 9},
        "smoking": {"type": "boolean"},
        "rooms": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5}, "maxItems": 3},
        "note": {"type": ["string", "null"], "maxLength": 6},
        "guest": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
    "required": ["nights"],
    "additionalProperties": False,
}


def _forced(name: str, parameters: dict[str, Any]) -> ChatCompletionRequest:
    tool = {"type": "function", "function": {"name": name, "parameters": parameters}}
    return ChatCompletionRequest.model_validate(
        {
            "messages": ASK_WEATHER,
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": name}},
            "parallel_tool_calls": False,
        }
    )


@pytest.mark.parametrize("seed", range(6))
def test_chatglm3_calls_write_the_schema_as_keywords_in_its_order(
    tokenizer: Any, end_ids: list[int], seed: int
) -> None:
    """Every value JSON its property accepts, the required keyword always there, the optional ones left out or
    not, none twice and none undeclared; the parser reads each call back as an object the schema accepts."""
    request = _forced("book", BOOKING)
    text = _decode(reply_grammar(request, "python") or "", tokenizer, end_ids, seed)
    calls = ToolCallParser(request.callable_tools, parallel=False).parse(text)
    assert calls and CHATGLM3_CALL.fullmatch(text), text
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, BOOKING)
    assert "nights" in arguments
    assert list(arguments) == [name for name in BOOKING["properties"] if name in arguments]


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": {"first-name": {"type": "string", "maxLength": 5}}},  # not a keyword
        {"type": "object", "properties": {"class": {"type": "string", "maxLength": 5}}},  # Python's own word
        {"type": "object"},  # any object: no keywords to write
        {  # a value's schema that needs the whole one's definitions
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/small"}},
            "$defs": {"small": {"type": "integer", "maximum": 3}},
        },
    ],
    ids=["dashed", "reserved", "any-object", "definitions"],
)
def test_parameters_that_keywords_cannot_write_keep_the_json_object(
    tokenizer: Any, end_ids: list[int], parameters: dict[str, Any]
) -> None:
    request = _forced("register", parameters)
    text = _decode(reply_grammar(request, "python") or "", tokenizer, end_ids, seed=0)
    assert text.startswith("register\n{"), text
    assert ToolCallParser(request.callable_tools, parallel=False).parse(text), text


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
