"""vLLM's /tokenize and /detokenize bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.protocol.bounds import Text, TokenId
from serve_app.protocol.openai import ChatMessage
from serve_app.protocol.openai_tools import Tools


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1)] = None
    # As a chat request's: the prompt then counts as that request's (its usage.prompt_tokens).
    tools: Tools | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.tools is not None and self.messages is None:
            raise ValueError("'tools' go with 'messages': a raw 'prompt' is rendered already")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
