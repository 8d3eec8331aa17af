"""OpenAI's chat shapes beyond plain text: tools and tool calls, structured output, log probabilities.

Requests here forbid fields they do not know, as the chat request does: an unsupported option is a 400 that names
it, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serve_app.protocol.bounds import Text

# OpenAI's rule for function names; it also keeps a name a single token of the tool-call grammar.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOP_LOGPROBS = 20


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(StrictRequest):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object; none: any object
    strict: bool | None = None


class ToolDefinition(StrictRequest):
    type: Literal["function"]
    function: FunctionDefinition


def _distinct_names(tools: list[ToolDefinition]) -> list[ToolDefinition]:
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError("tool names must be distinct")
    return tools


# A request's `tools`: a call names its function, so no two may share a name.
Tools = Annotated[list[ToolDefinition], AfterValidator(_distinct_names)]


class FunctionName(StrictRequest):
    name: Text


class NamedToolChoice(StrictRequest):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # a JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the assistant made: in a reply, or sent back in the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseFormatText(StrictRequest):
    type: Literal["text"]


class ResponseFormatJsonObject(StrictRequest):
    type: Literal["json_object"]


class JsonSchemaFormat(StrictRequest):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: Text | None = None
    # `schema` would shadow a BaseModel attribute: stored as json_schema, written "schema" on the wire.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatJsonSchema(StrictRequest):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: index, id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class TopLogprob(BaseModel):
    token: str
    logprob: float
    # The bytes the token holds (maybe part of a character's UTF-8): a reply's tokens' bytes, joined, are its text.
    bytes: list[int] | None = None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None = None
    refusal: list[TokenLogprobInfo] | None = None
