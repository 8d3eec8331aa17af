"""Grammars that make a reply what the request demands: a call of its tools, or JSON for a response_format.

They are built and checked at the ingress, so a schema the engine cannot enforce is a 400 that says why.
"""

from __future__ import annotations

import json
from typing import Any

from deployments.chat_engine.grammar import (
    COMPACT_JSON,
    UnenforceableGrammar,
    json_schema_grammar,
    lark_grammar,
)
from serve_app.errors import InvalidRequest
from serve_app.protocol.openai import ChatCompletionRequest
from serve_app.protocol.openai_tools import ResponseFormatJsonObject, ResponseFormatJsonSchema

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def reply_grammar(request: ChatCompletionRequest) -> str | None:
    """The grammar the reply must follow, or None when it is free."""
    if request.forces_tool_call:
        return tool_call_grammar(request)
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


def tool_call_grammar(request: ChatCompletionRequest) -> str:
    """Calls in GLM-4's form (`name` newline `{arguments}`), of the allowed tools only; several if parallel."""
    tools = request.callable_tools
    rules = []
    for index, tool in enumerate(tools):
        schema = dict(tool.function.parameters or _ANY_OBJECT)
        schema["x-guidance"] = COMPACT_JSON
        rules.append(f'call_{index}: {json.dumps(tool.function.name)} "\\n" %json {json.dumps(schema)}')
    repeat = ' ("\\n" call)*' if request.parallel_tool_calls else ""
    lark = "\n".join(
        [f"start: call{repeat}", "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules]
    )
    try:
        return lark_grammar(lark)
    except UnenforceableGrammar as exc:
        raise InvalidRequest(
            f"the tools' parameters cannot be enforced by this server: {exc}", param="tools"
        ) from None
