"""The ingress deployment: holds the handles of every model deployment and serves the FastAPI app over them."""

from __future__ import annotations

import os

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.tokenizer import ChatTokenizers
from serve_app.app import create_app
from serve_app.config import ChatModelConfig, HandleTransports, LimitsConfig, SecurityConfig
from serve_app.protocol.openai import ModelCard
from serve_app.registry import ModelRegistry
from serve_app.security import AccessPolicy


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(
        self,
        chat: dict[str, DeploymentHandle],
        embeddings: dict[str, DeploymentHandle],
        tokenizer: DeploymentHandle,
        cards: list[ModelCard],
        security: SecurityConfig,
        limits: LimitsConfig,
        transports: HandleTransports,
        chat_models: list[ChatModelConfig],
        render_max_chars: int,
    ) -> None:
        # Short conversations are rendered here, with the tokenizer deployment's own code (serving/prompts.py).
        local = ChatTokenizers(chat_models) if render_max_chars > 0 else None
        self._registry = ModelRegistry(
            chat, embeddings, tokenizer, cards, transports, local, render_max_chars
        )
        # Keys come from this replica's environment (e.g. a Kubernetes Secret); a required key that is missing
        # fails the replica here, so the deployment reports why instead of serving an open API.
        self._access = AccessPolicy.from_config(security, os.environ)
        self._limits = limits

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Called by Serve after __init__, so the app is built around this replica's handles.
        return create_app(self._registry, self._access, self._limits)
