"""One choice of a chat completion, built from its engine chunks: text or tool calls, with log probabilities.

The same rules serve a whole answer and a stream: with tools, a reply that is a valid call becomes
`tool_calls` with finish "tool_calls", anything else is text (see serve_app/tools/parser.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from serve_app.protocol.engine import GenerationChunk, TokenLogprob
from serve_app.protocol.openai import (
    ChatCompletionChoice,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatDelta,
    ChatFinishReason,
)
from serve_app.protocol.openai_tools import (
    ChoiceLogprobs,
    FunctionCall,
    TokenLogprobInfo,
    ToolCall,
    TopLogprob,
)
from serve_app.tools.parser import ToolCallParser, new_call_id, text_reply
from serve_app.tools.streaming import ToolReplyStream, call_deltas


def _top(item: TokenLogprob) -> TopLogprob:
    return TopLogprob(token=item.token, logprob=item.logprob, bytes=list(item.token_bytes))


def logprob_infos(items: Sequence[TokenLogprob], top_logprobs: int) -> list[TokenLogprobInfo]:
    return [
        TokenLogprobInfo(
            **_top(item).model_dump(), top_logprobs=[_top(top) for top in item.top[:top_logprobs]]
        )
        for item in items
    ]


class ChoiceBuilder:
    def __init__(self, index: int, tools: ToolCallParser | None, logprobs: bool, top_logprobs: int) -> None:
        self.index = index
        self._tools = tools
        self._stream = ToolReplyStream(tools) if tools else None
        self._logprobs = logprobs
        self._top_logprobs = top_logprobs

    def _logprobs_of(self, chunks: Sequence[GenerationChunk]) -> ChoiceLogprobs | None:
        if not self._logprobs:
            return None
        items = [item for chunk in chunks for item in chunk.logprobs or ()]
        return ChoiceLogprobs(content=logprob_infos(items, self._top_logprobs))

    def whole(self, chunks: list[GenerationChunk]) -> ChatCompletionChoice:
        """The choice once every chunk is in (the last one has the finish reason)."""
        text = "".join(chunk.text for chunk in chunks)
        finish: ChatFinishReason | None = chunks[-1].finish_reason
        assert finish is not None
        message = ChatCompletionMessage(content=text)
        if self._tools is not None:
            calls = self._tools.parse(text)
            if calls:
                tool_calls = [
                    ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls
                ]
                message, finish = ChatCompletionMessage(content=None, tool_calls=tool_calls), "tool_calls"
            else:
                message = ChatCompletionMessage(content=text_reply(text))
        return ChatCompletionChoice(
            index=self.index, message=message, finish_reason=finish, logprobs=self._logprobs_of(chunks)
        )

    def first(self) -> ChatCompletionChunkChoice:
        return ChatCompletionChunkChoice(index=self.index, delta=ChatDelta(role="assistant", content=""))

    def increment(self, chunk: GenerationChunk) -> list[ChatCompletionChunkChoice]:
        """The stream's choices for one engine chunk: its text (or nothing while a call may be coming) with its
        log probabilities; at the end, what was held (text or calls) and the finish."""
        text = self._stream.feed(chunk.text) if self._stream else chunk.text
        logprobs = self._logprobs_of([chunk])
        pieces = []
        if text or logprobs is not None:
            pieces.append(self._piece(ChatDelta(content=text or None), logprobs=logprobs))
        if chunk.finish_reason is None:
            return pieces
        finish: ChatFinishReason = chunk.finish_reason
        if self._stream is not None:
            held, calls = self._stream.finish()
            if held:
                pieces.append(self._piece(ChatDelta(content=held)))
            for deltas in call_deltas(calls):
                pieces.append(self._piece(ChatDelta(tool_calls=deltas)))
            if calls:
                finish = "tool_calls"
        pieces.append(self._piece(ChatDelta(), finish_reason=finish))
        return pieces

    def _piece(self, delta: ChatDelta, **fields: Any) -> ChatCompletionChunkChoice:
        return ChatCompletionChunkChoice(index=self.index, delta=delta, **fields)


_END = object()


async def merged(
    streams: list[AsyncGenerator[GenerationChunk, None]],
) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """The chunks of several choices as they come, each with its choice's index; a failure of one is raised.
    Closing this closes every choice's stream (which cancels its generation)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    await queue.put((index, chunk))
            await queue.put((index, _END))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:  # a client that left, or a failed choice: the other choices stop generating too
            task.cancel()
