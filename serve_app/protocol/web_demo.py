"""ChatGLM-web-stream-demo's bodies (seed 001): POST /chat and /stream with {query, history}."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.protocol.bounds import MaxTokens, Temperature, Text, TopP
from serve_app.protocol.openai import ChatCompletionRequest, ChatMessage

# The seed's generation settings (ChatGLM-6B's stream_chat defaults).
WEB_DEMO_TEMPERATURE = 0.95
WEB_DEMO_TOP_P = 0.7

Exchange = Annotated[list[Text], Field(min_length=2, max_length=2)]  # [question, answer]


class WebChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Text
    history: list[Exchange] = Field(default_factory=list)
    # Not in the seed; optional so its clients are unaffected.
    model: Text | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = WEB_DEMO_TEMPERATURE
    top_p: TopP = WEB_DEMO_TOP_P

    def to_openai(self) -> ChatCompletionRequest:
        messages = []
        for question, answer in self.history:
            messages += [
                ChatMessage(role="user", content=question),
                ChatMessage(role="assistant", content=answer),
            ]
        messages.append(ChatMessage(role="user", content=self.query))
        return ChatCompletionRequest(
            model=self.model,
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )

    def history_after(self, response: str) -> list[list[str]]:
        return [list(pair) for pair in self.history] + [[self.query, response]]


class WebChatResponse(BaseModel):
    query: str
    response: str
    history: list[list[str]]
    success: bool = True


class WebStreamDelta(BaseModel):
    """A /stream event while text arrives: the new text and the whole reply so far."""

    delta: str
    response: str
    finished: Literal[False] = False


class WebStreamEnd(BaseModel):
    """The last /stream event: the whole reply and the history with it; `error` only if generation failed."""

    query: str
    delta: Literal["[EOS]"] = "[EOS]"
    response: str
    history: list[list[str]]
    finished: Literal[True] = True
    error: str | None = None


class ClearResponse(BaseModel):
    success: bool = True
