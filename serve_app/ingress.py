"""The ingress deployment: holds the handles of every model deployment and serves the FastAPI app over them."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.app import create_app
from serve_app.protocol.openai import ModelCard
from serve_app.registry import ModelRegistry


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(
        self,
        chat: dict[str, DeploymentHandle],
        embeddings: dict[str, DeploymentHandle],
        tokenizer: DeploymentHandle,
        cards: list[ModelCard],
    ) -> None:
        self._registry = ModelRegistry(chat, embeddings, tokenizer, cards)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Called by Serve after __init__, so the app is built around this replica's handles.
        return create_app(self._registry)
