"""GLM-API's routes (seed 000), and POST /chat, which also serves the web demo's body (`query` instead of `messages`)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Response
from pydantic import Discriminator, Tag

from serve_app.errors import SEED_ERROR_RESPONSES, SeedRoute
from serve_app.protocol.glm_api import (
    GlmChatChunk,
    GlmChatCompletion,
    GlmChatRequest,
    GlmEmbeddingRequest,
    GlmEmbeddingResponse,
    GlmModelCard,
    GlmModelList,
    GlmStreamError,
)
from serve_app.protocol.openai import EmbeddingRequest
from serve_app.protocol.web_demo import WebChatRequest, WebChatResponse
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.serving.embeddings import EmbeddingService
from serve_app.serving.seeds import GlmApiService, WebDemoService
from serve_app.sse import event_stream, event_stream_doc

router = APIRouter(tags=["glm-api"], route_class=SeedRoute, responses=SEED_ERROR_RESPONSES)

_CHAT_STREAM = event_stream_doc(
    "GLM-API's completion, or the web demo's answer for a `query` body (JSON); with `stream: true` GLM-API's "
    "chunks as server-sent events ending with `[DONE]`",
    [GlmChatChunk, GlmStreamError],
    done=True,
)


def _which_seed(body: Any) -> str:
    return "web_demo" if isinstance(body, dict) and "query" in body and "messages" not in body else "glm_api"


SeedChatBody = Annotated[
    Annotated[GlmChatRequest, Tag("glm_api")] | Annotated[WebChatRequest, Tag("web_demo")],
    Discriminator(_which_seed),
]


@router.post("/chat", response_model=GlmChatCompletion | WebChatResponse, responses={200: _CHAT_STREAM})
async def seed_chat(
    request: Annotated[SeedChatBody, Body()],
    glm_api: Annotated[GlmApiService, Depends(deps.glm_api_service)],
    web_demo: Annotated[WebDemoService, Depends(deps.web_demo_service)],
) -> Response | GlmChatCompletion | WebChatResponse:
    if isinstance(request, WebChatRequest):
        return await web_demo.complete(request, await web_demo.prepare(request))
    prepared = await glm_api.prepare(request)
    if request.stream:
        return event_stream(glm_api.stream(prepared, increments=request.chunk))
    return await glm_api.complete(prepared)


@router.post("/embedding", response_model=GlmEmbeddingResponse)
async def seed_embedding(
    request: GlmEmbeddingRequest, embeddings: Annotated[EmbeddingService, Depends(deps.embedding_service)]
) -> Response:
    model, result = await embeddings.embed(EmbeddingRequest(model=request.model, input=request.prompt))
    body = {"data": result.vectors, "model": model, "object": "embedding"}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


@router.get("/models", response_model=GlmModelList)
async def seed_models(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> GlmModelList:
    return GlmModelList(
        data=[
            GlmModelCard(
                id=card.id,
                object="chat.completion" if kind == "chat" else "embedding",
                created=card.created,
                owned_by=card.owned_by,
            )
            for card, kind in registry.cards_with_kinds()
        ]
    )
