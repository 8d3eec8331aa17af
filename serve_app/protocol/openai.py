"""OpenAI-compatible request and response bodies for /v1/chat/completions, /v1/embeddings and /v1/models.

Requests forbid fields they do not know: an option this server does not support is a 400 that names it, never
silently ignored. Every field they do know is range-checked here, so a bad value is a 400 before any model work.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_serializer, field_validator, model_validator

from serve_app.protocol.bounds import (
    INT64_MAX,
    MaxTokens,
    Penalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    Text,
    TopK,
    TopP,
)
from serve_app.protocol.engine import FinishReason, SamplingParams
from serve_app.protocol.openai_tools import (
    MAX_TOP_LOGPROBS,
    ChoiceLogprobs,
    NamedToolChoice,
    ResponseFormat,
    StrictRequest,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolDefinition,
    Tools,
)

# Choices per request: each is a sequence of its own in the batch.
MAX_CHOICES = 16


class TextContentPart(StrictRequest):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant", "observation", "tool", "developer"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    # ChatGLM3's tool-call metadata, rendered after the role tag by its chat template.
    metadata: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (Hugging Face's convention: call arguments as objects)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.metadata:
            message["metadata"] = self.metadata
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(text: str) -> Any:
    """A call's arguments as an object for the template; text that is not JSON is kept as the client sent it."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class StreamOptions(StrictRequest):
    include_usage: bool = False


class ChatCompletionRequest(StrictRequest):
    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    # Left out (None): the model's own default from its generation_config, else OpenAI's.
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: Seed | None = None
    # Token id (as a string, as JSON keys are) -> bias in [-100, 100] added to its logit before sampling.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Accepted and not used: they label requests in OpenAI's own logs, or key its prompt cache.
    user: Text | None = None
    metadata: dict[Text, Text] | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    # Honoured as they are: this server keeps no completions and has one tier. Asking for storage or another
    # tier is a 400.
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit() or int(key) >= 2**31:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), not {key!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = {tool.function.name for tool in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.forces_tool_call and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("a forced tool call and a response_format cannot both constrain the reply")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field `requested_max_tokens` came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def prompt_tools(self) -> list[ToolDefinition]:
        """The tools the prompt shows the model: none with tool_choice "none" (it is then not to call one)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    @property
    def callable_tools(self) -> list[ToolDefinition]:
        """The tools the reply may call: the named one if tool_choice names one."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.prompt_tools if t.function.name == self.tool_choice.function.name]
        return self.prompt_tools

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def to_sampling_params(
        self, max_tokens: int, choice: int = 0, grammar: str | None = None
    ) -> SamplingParams:
        """The engine's parameters for choice number `choice` (of `n`), constrained to `grammar` if given."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=None if self.top_k is None else max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=choice_seed(self.seed, choice),
            stop=tuple(stops),
            logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()),
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            grammar=grammar,
        )


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice`: the request's own for the first (so n=1 and n>1 agree on it), then distinct
    ones derived from it (splitmix64's step), the same for the same request."""
    if seed is None or choice == 0:
        return seed
    mixed = (seed + choice * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (mixed ^ (mixed >> 31)) >> 1  # 63 bits: torch seeds are signed 64-bit


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int = 0) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class AssistantMessage(BaseModel):
    """A text reply (the seed interfaces' shape)."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionMessage(BaseModel):
    """A reply: text, or calls of the request's tools (then `content` is null)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


ChatFinishReason = FinishReason | Literal["tool_calls"]


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: ChatFinishReason
    logprobs: ChoiceLogprobs | None = None


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    """What a chunk adds: {"role", "content": ""} first, then content or tool calls, and {} on the finish chunk.

    Only the fields set are sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: ChatFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None

    @field_serializer("delta")
    def _set_fields_only(self, delta: ChatDelta) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class EmbeddingRequest(StrictRequest):
    model: Text | None = None
    input: Text | Annotated[list[Text], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1, le=INT64_MAX)] = None
    user: Text | None = None

    @field_validator("input")
    @classmethod
    def _no_empty_strings(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if any(text == "" for text in texts):
            raise ValueError("input must not contain empty strings")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a str is base64 of little-endian float32 (encoding_format="base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """Documents what EmbeddingService.create writes straight from numpy (too slow to build these per request)."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
