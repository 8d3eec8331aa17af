"""Server-sent events framing for OpenAI-style streams: `data: <json>` events, then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

DONE = "data: [DONE]\n\n"


def data_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        # Proxies must pass each event on at once rather than buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def event_stream_doc(
    description: str, payloads: list[type[BaseModel]], event: str | None = None, done: bool = False
) -> dict[str, Any]:
    """The OpenAPI entry of a `text/event-stream` answer: one event's shape, as FastAPI's own SSE routes give it
    (OpenAPI 3.2's `itemSchema`): `data` is JSON matching one of `payloads`, or the `[DONE]` marker if `done`.

    A route that answers only a stream takes `response_class=Response` with it: a media type on the route
    class would also give this answer a `schema` (OpenAPI 3.2 reads it as the whole stream's) and give the
    route's JSON errors that media type."""
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_inlined_schema(model) for model in payloads]},
    }
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    properties: dict[str, Any] = {"data": data}
    if event is not None:
        properties["event"] = {"const": event}
    item = {"type": "object", "required": ["data"], "properties": properties}
    return {"description": description, "content": {"text/event-stream": {"itemSchema": item}}}


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    # Inlined: a `$ref` here would point at components that FastAPI only emits for models it sees elsewhere.
    schema = model.model_json_schema(mode="serialization")
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)  # type: ignore[no-any-return]
