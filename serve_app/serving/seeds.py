"""The seed servers' chat interfaces over the same chat deployments as /v1: GLM-API and the web demo.

Both start from a ChatCompletionRequest (their bodies convert themselves) and differ only in how they frame the
answer, so each gets a small framer here; prompts, limits and generation are ChatService's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from serve_app.errors import InvalidRequest
from serve_app.protocol.engine import FinishReason
from serve_app.protocol.glm_api import (
    GlmChatChoice,
    GlmChatChunk,
    GlmChatCompletion,
    GlmChatRequest,
    GlmChunkChoice,
    GlmStreamError,
    GlmStreamErrorInfo,
)
from serve_app.protocol.openai import AssistantMessage, now
from serve_app.protocol.web_demo import WebChatRequest, WebChatResponse, WebStreamDelta, WebStreamEnd
from serve_app.serving.chat import ChatService, PreparedChat, stream_failure
from serve_app.sse import DONE, data_event


class GlmApiService:
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def prepare(self, request: GlmChatRequest) -> PreparedChat:
        if request.messages[-1].role == "assistant":
            raise InvalidRequest(
                "Invalid request"
            )  # GLM-API's own answer to a chat that ends with the assistant
        return await self._chat.prepare(request.to_openai(), fit_to_window=True)

    async def complete(self, prepared: PreparedChat) -> GlmChatCompletion:
        reply = await self._chat.complete_text(prepared)
        return GlmChatCompletion(
            model=prepared.model.name,
            created=now(),
            choices=[
                GlmChatChoice(
                    message=AssistantMessage(content=reply.text.strip()), finish_reason=reply.finish_reason
                )
            ],
            usage=reply.usage,
        )

    async def stream(self, prepared: PreparedChat, increments: bool) -> AsyncIterator[str]:
        """`data:` events: the role, then the new text (`increments`) or the whole text so far, then the finish."""
        created, model = now(), prepared.model.name

        def event(delta: dict[str, str], finish_reason: FinishReason | None = None) -> str:
            choice = GlmChunkChoice(delta=delta, finish_reason=finish_reason)
            return data_event(GlmChatChunk(model=model, created=created, choices=[choice]).model_dump_json())

        yield event({"role": "assistant"})
        text = ""
        try:
            async with aclosing(prepared.chunks) as chunks:
                async for chunk in chunks:
                    if chunk.text:  # no event is ever empty
                        text += chunk.text
                        yield event({"content": chunk.text if increments else text})
                    if chunk.finish_reason is not None:
                        yield event({}, chunk.finish_reason)
        except Exception as exc:  # noqa: BLE001 - told to the client, then the stream ends properly
            failure = GlmStreamError(error=GlmStreamErrorInfo(message=stream_failure(exc).message))
            yield data_event(failure.model_dump_json())
        yield DONE


class WebDemoService:
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def prepare(self, request: WebChatRequest) -> PreparedChat:
        return await self._chat.prepare(request.to_openai(), fit_to_window=True)

    async def complete(self, request: WebChatRequest, prepared: PreparedChat) -> WebChatResponse:
        response = (await self._chat.complete_text(prepared)).text
        return WebChatResponse(
            query=request.query, response=response, history=request.history_after(response)
        )

    async def stream(self, request: WebChatRequest, prepared: PreparedChat) -> AsyncIterator[str]:
        """`event: delta` events while text arrives, then one `finished: true` event with the history."""

        def event(payload: BaseModel) -> str:
            return f"event: delta\ndata: {payload.model_dump_json(exclude_none=True)}\n\n"

        response = ""
        error = None
        try:
            async with aclosing(prepared.chunks) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        response += chunk.text
                        yield event(WebStreamDelta(delta=chunk.text, response=response))
        except Exception as exc:  # noqa: BLE001 - the last event says what went wrong
            error = stream_failure(exc).message
        history = request.history_after(response)
        yield event(WebStreamEnd(query=request.query, response=response, history=history, error=error))
