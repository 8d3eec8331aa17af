"""Dependencies shared by the routers: the services the ingress built, found on the app's state."""

from __future__ import annotations

from fastapi import Request

from serve_app.config import LimitsConfig
from serve_app.registry import ModelRegistry
from serve_app.serving.chat import ChatService
from serve_app.serving.embeddings import EmbeddingService
from serve_app.serving.seeds import GlmApiService, WebDemoService


# async on purpose: FastAPI runs plain `def` dependencies on its thread pool, a hop per request we do not need.
async def registry(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def limits(request: Request) -> LimitsConfig:
    return request.app.state.limits  # type: ignore[no-any-return]


async def chat_service(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


async def embedding_service(request: Request) -> EmbeddingService:
    return request.app.state.embeddings  # type: ignore[no-any-return]


async def glm_api_service(request: Request) -> GlmApiService:
    return request.app.state.glm_api  # type: ignore[no-any-return]


async def web_demo_service(request: Request) -> WebDemoService:
    return request.app.state.web_demo  # type: ignore[no-any-return]
