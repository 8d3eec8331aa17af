"""The seed servers' chat interfaces over the same chat deployments as /v1: GLM-API and the web demo.

Both start from a ChatCompletionRequest (their bodies convert themselves) and differ only in how they frame the
answer, so each gets a small framer here; prompts, limits and generation are ChatService's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from serve_app.errors import InvalidRequest
from serve_app.protocol.glm_api import GlmChatRequest
from serve_app.protocol.openai import now
from serve_app.protocol.web_demo import WebChatRequest, WebChatResponse
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

    async def complete(self, prepared: PreparedChat) -> dict[str, Any]:
        answer = await self._chat.complete(prepared)
        choice = answer.choices[0]
        return {
            "model": answer.model,
            "object": "chat.completion",
            "created": answer.created,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": choice.message.content.strip()},
                    "finish_reason": choice.finish_reason,
                }
            ],
            "usage": answer.usage.model_dump(),
        }

    async def stream(self, prepared: PreparedChat, increments: bool) -> AsyncIterator[str]:
        """`data:` events: the role, then the new text (`increments`) or the whole text so far, then the finish."""
        created, model = now(), prepared.model.name

        def event(delta: dict[str, str], finish_reason: str | None = None) -> str:
            chunk = {
                "model": model,
                "object": "chat.completion.chunk",
                "created": created,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return data_event(json.dumps(chunk, ensure_ascii=False))

        yield event({"role": "assistant"})
        text = ""
        try:
            async for chunk in self._chat.chunks(prepared):
                if chunk.text:  # no event is ever empty
                    text += chunk.text
                    yield event({"content": chunk.text if increments else text})
                if chunk.finish_reason is not None:
                    yield event({}, chunk.finish_reason)
        except Exception as exc:  # noqa: BLE001 - told to the client, then the stream ends properly
            yield data_event(json.dumps({"error": {"message": stream_failure(exc).message}}))
        yield DONE


class WebDemoService:
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def prepare(self, request: WebChatRequest) -> PreparedChat:
        return await self._chat.prepare(request.to_openai(), fit_to_window=True)

    async def complete(self, request: WebChatRequest, prepared: PreparedChat) -> WebChatResponse:
        response = (await self._chat.complete(prepared)).choices[0].message.content
        return WebChatResponse(
            query=request.query, response=response, history=request.history_after(response)
        )

    async def stream(self, request: WebChatRequest, prepared: PreparedChat) -> AsyncIterator[str]:
        """`event: delta` events while text arrives, then one `finished: true` event with the history."""

        def event(payload: dict[str, Any]) -> str:
            return f"event: delta\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        response = ""
        final: dict[str, Any] = {}
        try:
            async for chunk in self._chat.chunks(prepared):
                if chunk.text:
                    response += chunk.text
                    yield event({"delta": chunk.text, "response": response, "finished": False})
        except Exception as exc:  # noqa: BLE001 - the last event says what went wrong
            final = {"error": stream_failure(exc).message}
        history = request.history_after(response)
        yield event(
            {
                "query": request.query,
                "delta": "[EOS]",
                "response": response,
                "history": history,
                "finished": True,
                **final,
            }
        )
