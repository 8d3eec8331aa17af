"""vLLM's /tokenize and /detokenize bodies.

Like the OpenAI bodies, they forbid fields they do not know: vLLM's options that this server does not implement
(`chat_template`, `chat_template_kwargs`, `mm_processor_kwargs`, ...) are a 400 that names them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from serve_app.protocol.bounds import Text, TokenId
from serve_app.protocol.openai import ChatMessage
from serve_app.protocol.openai_tools import StrictRequest, Tools

# Fields that only shape a rendered chat: with a raw `prompt` they would be ignored, so they are refused.
_CHAT_ONLY = ("tools", "add_generation_prompt", "continue_final_message")


class TokenizeRequest(StrictRequest):
    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1)] = None
    # As a chat request's: the prompt then counts as that request's (its usage.prompt_tokens).
    tools: Tools | None = None
    # A raw prompt's special prefix tokens (vLLM's default: yes). A chat template writes its own, so with
    # `messages` only false is taken (vLLM would add them a second time).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    # The prompt ends inside the last message (an assistant's, to be continued), not after it.
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is None:
            for name in _CHAT_ONLY:
                if name in self.model_fields_set and getattr(self, name) is not None:
                    raise ValueError(f"'{name}' goes with 'messages': a raw 'prompt' is rendered already")
            return self
        if self.add_special_tokens:
            raise ValueError(
                "'add_special_tokens' must be false with 'messages': the chat template writes the special tokens"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "'continue_final_message' continues the last message, 'add_generation_prompt' starts a new one: "
                "set 'add_generation_prompt' to false"
            )
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeRequest(StrictRequest):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
