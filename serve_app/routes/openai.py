"""OpenAI-style routes under /v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from serve_app.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.serving.chat import ChatService
from serve_app.serving.embeddings import EmbeddingService
from serve_app.sse import event_stream

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, chat: Annotated[ChatService, Depends(deps.chat_service)]
) -> Response | ChatCompletionResponse:
    prepared = await chat.prepare(request)  # every 4xx is raised here, before a stream starts
    if request.stream:
        return event_stream(chat.stream(prepared, request.include_usage))
    return await chat.complete(prepared)


@router.post("/embeddings")
async def create_embeddings(
    request: EmbeddingRequest, embeddings: Annotated[EmbeddingService, Depends(deps.embedding_service)]
) -> Response:
    return await embeddings.create(request)


@router.get("/models", response_model=ModelList)
async def list_models(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> ModelList:
    return ModelList(data=registry.cards)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(
    model_id: str, registry: Annotated[ModelRegistry, Depends(deps.registry)]
) -> ModelCard:
    return registry.card(model_id)
