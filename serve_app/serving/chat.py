"""Chat completions: render and count the prompt, check it fits the window, generate, shape the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

from ray.serve.handle import DeploymentResponseGenerator

from serve_app.config import LimitsConfig
from serve_app.errors import APIError, InvalidRequest, error_body, raised, serving_failure
from serve_app.limits import cap_completion_tokens, check_chat_messages
from serve_app.protocol.engine import ChatPrompt, FinishReason, GenerateRequest, GenerationChunk
from serve_app.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    UsageInfo,
    new_completion_id,
    now,
    usage,
)
from serve_app.registry import ModelHandle, ModelRegistry
from serve_app.serving.chat_choices import ChoiceBuilder, merged
from serve_app.sse import DONE, data_event
from serve_app.tools.constraints import reply_grammar
from serve_app.tools.parser import ToolCallParser
from serve_app.tools.prompts import template_tools

logger = logging.getLogger("glm_serve")


@dataclass(frozen=True)
class PreparedChat:
    """A request that passed every check and that the chat deployment has accepted and started generating:
    one sequence per choice (`n`), each with its own builder of the answer."""

    model: ModelHandle
    generates: list[GenerateRequest]
    # Each choice's engine increments, read once (and closed: that cancels its generation); the last one
    # carries the finish reason.
    streams: list[AsyncGenerator[GenerationChunk, None]]
    builders: list[ChoiceBuilder]

    @property
    def prompt_tokens(self) -> int:
        return len(self.generates[0].prompt_token_ids)

    @property
    def chunks(self) -> AsyncGenerator[GenerationChunk, None]:
        """The first choice's increments: the seed interfaces have one choice."""
        return self.streams[0]


@dataclass(frozen=True)
class TextReply:
    text: str
    finish_reason: FinishReason
    usage: UsageInfo


def completion_budget(prompt: ChatPrompt, requested: int | None, fit_to_window: bool = False) -> int:
    """The max_tokens to generate with: what was asked if it fits the window, else the room that is left.

    `fit_to_window` caps a request that asks for more than the room left instead of refusing it (the seed
    interfaces default to 4096 whatever the model's window).
    """
    prompt_tokens, window = len(prompt.token_ids), prompt.max_model_len
    if fit_to_window and requested is not None:
        requested = min(requested, max(window - prompt_tokens, 1))
    if requested is not None and prompt_tokens + requested > window:
        raise InvalidRequest(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    if prompt_tokens >= window:
        raise InvalidRequest(
            f"This model's maximum context length is {window} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    return requested if requested is not None else window - prompt_tokens


class ChatService:
    def __init__(self, registry: ModelRegistry, limits: LimitsConfig) -> None:
        self._registry = registry
        self._limits = limits

    async def prepare(self, request: ChatCompletionRequest, fit_to_window: bool = False) -> PreparedChat:
        received_at = time.time()  # the replica's queue deadline counts from here
        model = self._registry.chat(request.model)
        messages = [message.for_template() for message in request.messages]
        check_chat_messages(self._limits, [message["content"] for message in messages])
        requested, fit_to_window = cap_completion_tokens(
            self._limits, request.requested_max_tokens, request.max_tokens_param, fit_to_window
        )
        prompt = await self._registry.prompts.render(
            model.name, messages, tools=template_tools(request.prompt_tools)
        )
        grammar = reply_grammar(request, prompt.call_syntax)
        max_tokens = completion_budget(prompt, requested, fit_to_window)
        generates = [
            GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompt_token_ids=prompt.token_ids,
                sampling=request.to_sampling_params(max_tokens, choice, grammar),
                received_at=received_at,
            )
            for choice in range(request.n)
        ]
        callable_tools = request.callable_tools
        builders = [
            ChoiceBuilder(
                choice,
                ToolCallParser(callable_tools, request.parallel_tool_calls) if callable_tools else None,
                request.logprobs,
                request.top_logprobs or 0,
            )
            for choice in range(request.n)
        ]
        return PreparedChat(model, generates, await _started(model, generates), builders)

    async def complete(self, prepared: PreparedChat) -> ChatCompletionResponse:
        async def collect(stream: AsyncGenerator[GenerationChunk, None]) -> list[GenerationChunk]:
            async with aclosing(stream) as chunks:
                return [chunk async for chunk in chunks]

        results = await asyncio.gather(*(collect(stream) for stream in prepared.streams))
        return ChatCompletionResponse(
            id=new_completion_id(),
            created=now(),
            model=prepared.model.name,
            choices=[builder.whole(chunks) for builder, chunks in zip(prepared.builders, results)],
            usage=usage(prepared.prompt_tokens, sum(chunks[-1].completion_tokens for chunks in results)),
        )

    async def complete_text(self, prepared: PreparedChat) -> TextReply:
        """The first choice's whole text, as the seed interfaces answer (they send no tools)."""
        async with aclosing(prepared.chunks) as stream:
            chunks = [chunk async for chunk in stream]
        last = chunks[-1]
        assert last.finish_reason is not None
        text = "".join(chunk.text for chunk in chunks)
        return TextReply(text, last.finish_reason, usage(prepared.prompt_tokens, last.completion_tokens))

    async def stream(self, prepared: PreparedChat, include_usage: bool) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice, their content (or tool call) chunks as they come, a finish chunk
        per choice, an optional usage chunk, then [DONE].

        A failure mid-stream is sent as an error event before [DONE], never as a silently cut connection.
        """
        frame = _ChunkFramer(prepared.model.name, include_usage)
        for builder in prepared.builders:
            yield frame.choices([builder.first()])
        completion_tokens = [0] * len(prepared.streams)
        try:
            async with aclosing(merged(prepared.streams)) as choices:
                async for index, chunk in choices:
                    completion_tokens[index] = chunk.completion_tokens
                    for piece in prepared.builders[index].increment(chunk):
                        yield frame.choices([piece])
            if include_usage:
                yield frame.usage(usage(prepared.prompt_tokens, sum(completion_tokens)))
        except Exception as exc:  # noqa: BLE001 - told to the client, then the stream ends properly
            error = stream_failure(exc)
            yield data_event(json.dumps(error_body(error.message, error.error_type, None, error.code)))
        yield DONE


async def _started(
    model: ModelHandle, generates: list[GenerateRequest]
) -> list[AsyncGenerator[GenerationChunk, None]]:
    """Send the requests (one per choice) and wait for each one's first increment, so that a refusal (the
    deployment's queue is full) or a lost replica is raised while the answer can still be a status code, not an
    error event inside a 200 stream. If one choice fails to start, the others are cancelled."""
    # The handle streams (registry: `.options(stream=True)`): each call gives a response generator.
    responses = [
        cast(DeploymentResponseGenerator, model.handle.generate.remote(generate)) for generate in generates
    ]
    try:
        firsts = [
            raised(first) for first in await asyncio.gather(*(anext(response) for response in responses))
        ]
    except BaseException:
        for response in responses:
            response.cancel()
        raise

    async def from_first(
        first: GenerationChunk, response: DeploymentResponseGenerator
    ) -> AsyncGenerator[GenerationChunk, None]:
        chunk = first
        try:
            yield chunk
            # Done at the finishing chunk, not at the end of the handle stream, which comes after the replica's
            # own bookkeeping for the request (the usage chunk and [DONE] came 3-5 ms p50, 9-16 ms p90, after the
            # finish chunk at 16 streams). Serve's router drains the rest of the stream itself.
            while chunk.finish_reason is None:
                item = await anext(response, None)
                if item is None:
                    return  # ended without a finishing chunk: as before, the stream ends here
                chunk = raised(item)
                yield chunk
        finally:
            if chunk.finish_reason is None:
                # Closed before the last chunk (the client went away): stop the generation on the replica now,
                # not whenever this generator is garbage-collected; the engine then frees the sequence's slot.
                response.cancel()

    return [from_first(first, response) for first, response in zip(firsts, responses)]


class _ChunkFramer:
    def __init__(self, model: str, include_usage: bool) -> None:
        self._id = new_completion_id()
        self._created = now()
        self._model = model
        self._include_usage = include_usage

    def _event(self, choices: list[ChatCompletionChunkChoice], usage_info: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage_info
        )
        return data_event(chunk.model_dump_json(exclude=None if self._include_usage else {"usage"}))

    def choices(self, choices: list[ChatCompletionChunkChoice]) -> str:
        return self._event(choices)

    def usage(self, usage_info: UsageInfo) -> str:
        return self._event([], usage_info)


def stream_failure(exc: Exception) -> APIError:
    """What a client is told when its stream breaks after it started (too late for a status code)."""
    if isinstance(exc, APIError):
        return exc
    lost = serving_failure(exc)  # the replica died: say so, as a refused request would be told
    if lost is not None:
        logger.warning("chat stream lost its replica: %s", exc)
        return lost
    logger.error("chat stream failed mid-way", exc_info=exc)
    return APIError("The model failed while generating this reply.")
