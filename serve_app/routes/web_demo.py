"""ChatGLM-web-stream-demo's routes (seed 001); its POST /chat is served by routes/glm_api.py."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from serve_app.errors import SEED_ERROR_RESPONSES, SeedRoute
from serve_app.protocol.web_demo import ClearResponse, WebChatRequest, WebStreamDelta, WebStreamEnd
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.serving.seeds import WebDemoService
from serve_app.sse import event_stream, event_stream_doc

router = APIRouter(tags=["web-demo"], route_class=SeedRoute, responses=SEED_ERROR_RESPONSES)

_STREAM = event_stream_doc(
    "`delta` events while the reply arrives, then one with `finished: true` and the history",
    [WebStreamDelta, WebStreamEnd],
    event="delta",
)


@router.post("/stream", response_class=Response, responses={200: _STREAM})
async def seed_stream(
    request: WebChatRequest, web_demo: Annotated[WebDemoService, Depends(deps.web_demo_service)]
) -> Response:
    prepared = await web_demo.prepare(request)
    return event_stream(web_demo.stream(request, prepared))


@router.get("/clear", response_model=ClearResponse)
async def seed_clear(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> ClearResponse:
    await asyncio.gather(*(handle.clear_cache.remote() for handle in registry.chat_handles()))
    return ClearResponse()
