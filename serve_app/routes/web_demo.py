"""ChatGLM-web-stream-demo's routes (seed 001); its POST /chat is served by routes/glm_api.py."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from serve_app.errors import SeedRoute
from serve_app.protocol.web_demo import ClearResponse, WebChatRequest
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.serving.seeds import WebDemoService
from serve_app.sse import event_stream

router = APIRouter(tags=["web-demo"], route_class=SeedRoute)


@router.post("/stream")
async def seed_stream(
    request: WebChatRequest, web_demo: Annotated[WebDemoService, Depends(deps.web_demo_service)]
) -> Response:
    prepared = await web_demo.prepare(request)
    return event_stream(web_demo.stream(request, prepared))


@router.get("/clear", response_model=ClearResponse)
async def seed_clear(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> ClearResponse:
    await asyncio.gather(*(handle.clear_cache.remote() for handle in registry.chat_handles()))
    return ClearResponse()
