"""GLM-API's bodies (seed 000): POST /chat, /embedding, /tokenize and GET /models, as ../shared/COMPAT.md gives them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.protocol.bounds import (
    MaxTokensOrZero,
    NonEmptyText,
    RepetitionPenalty,
    Temperature,
    Text,
    TopP,
)
from serve_app.protocol.engine import FinishReason
from serve_app.protocol.openai import AssistantMessage, ChatCompletionRequest, ChatMessage, UsageInfo

GLM_DEFAULT_MAX_TOKENS = 4096


class GlmMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "observation"]
    content: Text
    metadata: Text | None = None
    tools: list[dict[str, Any]] | None = None  # accepted as GLM-API did; the chat template decides their use


class GlmTemplateMessage(ChatMessage):
    """A GLM-API message as the chat template sees it, with the `tools` GLM-API forwarded on it (ChatGLM3's
    format lists a system message's tools after its text)."""

    tools: list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        message = super().for_template()
        if self.tools:
            message["tools"] = self.tools
        return message


class GlmChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # GLM-API ignored fields it did not know

    messages: Annotated[list[GlmMessage], Field(min_length=1)]
    model: Text | None = None
    stream: bool = False
    chunk: bool = True  # streamed deltas carry only the new text (true) or the whole text so far (false)
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    max_tokens: MaxTokensOrZero | None = GLM_DEFAULT_MAX_TOKENS  # null or 0: the default
    repetition_penalty: RepetitionPenalty = 1.1

    def to_openai(self) -> ChatCompletionRequest:
        return ChatCompletionRequest(
            model=self.model,
            messages=[
                GlmTemplateMessage(role=m.role, content=m.content, metadata=m.metadata, tools=m.tools)
                for m in self.messages
            ],
            max_tokens=self.max_tokens or GLM_DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


class GlmChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class GlmChatCompletion(BaseModel):
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    choices: list[GlmChatChoice]
    usage: UsageInfo


class GlmChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role"} first, then {"content"}, and {} with the finish reason
    finish_reason: FinishReason | None = None


class GlmChatChunk(BaseModel):
    """One `data:` event of a streamed /chat."""

    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    choices: list[GlmChunkChoice]


class GlmStreamErrorInfo(BaseModel):
    message: str


class GlmStreamError(BaseModel):
    """The event a stream that fails after it started sends before `[DONE]`."""

    error: GlmStreamErrorInfo


class GlmEmbeddingRequest(BaseModel):
    model: Text | None = None
    prompt: Annotated[list[NonEmptyText], Field(min_length=1)]


class GlmEmbeddingResponse(BaseModel):
    data: list[list[float]]
    model: str
    object: Literal["embedding"] = "embedding"


class GlmTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Text
    max_tokens: MaxTokensOrZero = GLM_DEFAULT_MAX_TOKENS
    model: Text | None = None


class GlmTokenizeResponse(BaseModel):
    tokenIds: list[int]
    tokens: list[str]
    model: str
    object: Literal["tokenizer"] = "tokenizer"


class GlmModelCard(BaseModel):
    id: str
    object: Literal["chat.completion", "embedding"]
    created: int
    owned_by: str
    root: None = None
    parent: None = None
    permission: None = None


class GlmModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GlmModelCard]
