"""Grammars that make a reply what the request demands: a call of its tools, or JSON for a response_format.

They are built and checked at the ingress, so a schema the engine cannot enforce is a 400 that says why.
"""

from __future__ import annotations

import json
import keyword
from typing import Any

from deployments.chat_engine.grammar import (
    COMPACT_JSON,
    UnenforceableGrammar,
    json_schema_grammar,
    lark_grammar,
)
from serve_app.errors import InvalidRequest
from serve_app.protocol.engine import CallSyntax
from serve_app.protocol.openai import ChatCompletionRequest
from serve_app.protocol.openai_tools import ResponseFormatJsonObject, ResponseFormatJsonSchema

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def reply_grammar(request: ChatCompletionRequest, call_syntax: CallSyntax = "json") -> str | None:
    """The grammar the reply must follow, or None when it is free; a forced call is written in `call_syntax`, the
    model's own."""
    if request.forces_tool_call:
        return tool_call_grammar(request, call_syntax)
    response_format = request.response_format
    if isinstance(response_format, ResponseFormatJsonObject):
        return json_schema_grammar(_ANY_OBJECT)
    if isinstance(response_format, ResponseFormatJsonSchema):
        try:
            return json_schema_grammar(response_format.json_schema.json_schema or _ANY_OBJECT)
        except UnenforceableGrammar as exc:
            raise InvalidRequest(
                f"response_format.json_schema.schema cannot be enforced by this server: {exc}",
                param="response_format.json_schema.schema",
            ) from None
    return None


def tool_call_grammar(request: ChatCompletionRequest, call_syntax: CallSyntax = "json") -> str:
    """Calls of the allowed tools only, several if parallel, each its name, a newline and its arguments: GLM-4's
    JSON object, or with the "python" syntax ChatGLM3's block, " ```python\\ntool_call(key=value, ...)\\n```" (the
    values JSON, which Python reads as literals), for every tool whose parameters it can write as keywords. The
    others keep the JSON object, which the parser reads from any model."""
    tools = request.callable_tools
    rules = []
    for index, tool in enumerate(tools):
        head = json.dumps(tool.function.name + "\n")
        schema = tool.function.parameters or _ANY_OBJECT
        keywords = _keyword_parameters(schema) if call_syntax == "python" else None
        if keywords is None:
            rules.append(f"call_{index}: {head} {_json_value(schema)}")
        else:
            rules.extend(_python_call_rules(f"call_{index}", head, keywords))
    calls = [f"call_{i}" for i in range(len(tools))]
    repeat = ' ("\\n" call)*' if request.parallel_tool_calls else ""
    lark = "\n".join([f"start: call{repeat}", "call: " + " | ".join(calls), *rules])
    try:
        return lark_grammar(lark)
    except UnenforceableGrammar as exc:
        raise InvalidRequest(
            f"the tools' parameters cannot be enforced by this server: {exc}", param="tools"
        ) from None


def _json_value(schema: dict[str, Any]) -> str:
    return f"%json {json.dumps({**schema, 'x-guidance': COMPACT_JSON})}"


# Schema keys that say nothing about a value.
_ANNOTATIONS = {"description", "title"}


def _keyword_value(schema: dict[str, Any]) -> str:
    """A keyword's value: a plain boolean or null as Python writes it, as ChatGLM3's turns do; anything else JSON
    (its strings, numbers, lists and objects are Python literals too, and JSON's names inside them the parser
    reads)."""
    plain = {key: value for key, value in schema.items() if key not in _ANNOTATIONS}
    if plain == {"type": "boolean"}:
        return '("True" | "False")'
    if plain == {"type": "null"}:
        return '"None"'
    return _json_value(schema)


# An object schema's keys that the keyword form still enforces whole: its properties one by one, which are
# required, and (by writing only them) no others. Any other key ($defs, oneOf, minProperties...) needs the object.
_KEYWORD_SCHEMA_KEYS = {"type", "properties", "required", "additionalProperties", "$schema", *_ANNOTATIONS}

_Keyword = tuple[str, dict[str, Any], bool]  # name, schema of its value, required


def _keyword_parameters(schema: dict[str, Any]) -> list[_Keyword] | None:
    """The parameters as keyword arguments, in their schema's order; None when the schema is not an object of
    declared properties, each named as a Python identifier can be."""
    properties = schema.get("properties")
    if (
        not isinstance(properties, dict)
        or set(schema) - _KEYWORD_SCHEMA_KEYS
        or schema.get("type", "object") != "object"
        or schema.get("additionalProperties", False) not in (True, False)
    ):
        return None
    required = schema.get("required", [])
    if not isinstance(required, list) or not set(required) <= set(properties):
        return None
    if not all(
        name.isidentifier() and not keyword.iskeyword(name) and isinstance(value, dict)
        for name, value in properties.items()
    ):
        return None
    return [(name, value, name in required) for name, value in properties.items()]


def _python_call_rules(rule: str, head: str, keywords: list[_Keyword]) -> list[str]:
    """`rule`: the head, then ChatGLM3's block with the keywords in order, the required ones always. The
    alternatives say which keyword comes first (any optional one before the first required one may be left out);
    every later one follows a comma."""
    names = [f"{rule}_{i}" for i in range(len(keywords))]
    values = [
        f"{name}: {json.dumps(parameter + '=')} {_keyword_value(schema)}"
        for name, (parameter, schema, _) in zip(names, keywords, strict=True)
    ]
    followers = [
        f'(", " {name})' + ("" if required else "?")
        for name, (_, _, required) in zip(names, keywords, strict=True)
    ]
    firsts = []
    for first, (_, _, required) in enumerate(keywords):
        firsts.append(" ".join([names[first], *followers[first + 1 :]]))
        if required:
            break
    arguments = " | ".join(firsts)
    if arguments:  # left out whole only when every keyword is optional
        arguments = f"({arguments})" + ("" if any(required for _, _, required in keywords) else "?")
    opening, closing = json.dumps(" ```python\ntool_call("), json.dumps(")\n```")
    return [f"{rule}: {head} {opening} {arguments} {closing}", *values]
