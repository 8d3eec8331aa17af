"""OpenAI-style routes under /v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from serve_app.errors import OPENAI_ERROR_RESPONSES, ErrorResponse, ServingRoute
from serve_app.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.serving.chat import ChatService
from serve_app.serving.embeddings import EmbeddingService
from serve_app.sse import event_stream, event_stream_doc

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ServingRoute, responses=OPENAI_ERROR_RESPONSES)

_CHAT_STREAM = event_stream_doc(
    "The completion (JSON), or with `stream: true` its chunks as server-sent events ending with `[DONE]`; "
    "a failure after the stream started is sent as an error event before `[DONE]`",
    [ChatCompletionChunk, ErrorResponse],
    done=True,
)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: _CHAT_STREAM})
async def create_chat_completion(
    request: ChatCompletionRequest, chat: Annotated[ChatService, Depends(deps.chat_service)]
) -> Response | ChatCompletionResponse:
    prepared = await chat.prepare(request)  # every 4xx is raised here, before a stream starts
    if request.stream:
        return event_stream(chat.stream(prepared, request.include_usage))
    return await chat.complete(prepared)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(
    request: EmbeddingRequest, embeddings: Annotated[EmbeddingService, Depends(deps.embedding_service)]
) -> Response:
    return await embeddings.create(request)


# An OpenAPI link: where an answer's values feed another call (schemathesis' stateful tests follow it).
_MODEL_CARD_LINK = {
    "description": "Every served model",
    "links": {
        "RetrieveModel": {
            "operationRef": "#/paths/~1v1~1models~1{model_id}/get",
            "parameters": {"model_id": "$response.body#/data/0/id"},
        }
    },
}


@router.get("/models", response_model=ModelList, responses={200: _MODEL_CARD_LINK})
async def list_models(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> ModelList:
    return ModelList(data=registry.cards)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(
    model_id: str, registry: Annotated[ModelRegistry, Depends(deps.registry)]
) -> ModelCard:
    return registry.card(model_id)
