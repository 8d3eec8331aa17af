"""Embeddings: route to the model's deployment, answer in OpenAI's shape (float lists or base64 float32)."""

from __future__ import annotations

import base64
import time

import numpy as np
import orjson
from fastapi import Response

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidRequest, raised
from serve_app.limits import check_embedding_inputs
from serve_app.protocol.engine import Embeddings
from serve_app.protocol.openai import EmbeddingRequest
from serve_app.registry import ModelRegistry


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, limits: LimitsConfig) -> None:
        self._registry = registry
        self._limits = limits
        self._dimensions: dict[str, int] = {}

    async def dimension(self, model: str) -> int:
        if model not in self._dimensions:
            self._dimensions[model] = await self._registry.embedding(model).handle.dimension.remote()
        return self._dimensions[model]

    async def embed(self, request: EmbeddingRequest) -> tuple[str, Embeddings]:
        """The model that served the request (the default one if it named none) and its vectors."""
        received_at = time.time()  # the replica's queue deadline counts from here
        model = self._registry.embedding(request.model)
        check_embedding_inputs(self._limits, request.texts)
        if request.dimensions is not None:
            dimensions = await self.dimension(model.name)
            if request.dimensions != dimensions:
                raise InvalidRequest(
                    f"The model '{model.name}' makes {dimensions}-d vectors and cannot return "
                    f"{request.dimensions}-d ones.",
                    param="dimensions",
                )
        return model.name, raised(await model.handle.embed.remote(request.texts, received_at))

    async def create(self, request: EmbeddingRequest) -> Response:
        model, result = await self.embed(request)
        # Vectors go straight from numpy to JSON: building pydantic objects for thousands of floats is the
        # slowest part of this route otherwise.
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(vector, request.encoding_format)}
                for i, vector in enumerate(result.vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": sum(result.token_counts), "total_tokens": sum(result.token_counts)},
        }
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _encode(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector
