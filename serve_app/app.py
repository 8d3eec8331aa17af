"""The FastAPI application the ingress serves: routers, error handlers and the services they share."""

from __future__ import annotations

from fastapi import FastAPI

from serve_app.errors import install_error_handlers
from serve_app.registry import ModelRegistry
from serve_app.routes import glm_api, health, openai, tokenize, ui, web_demo
from serve_app.serving.chat import ChatService
from serve_app.serving.embeddings import EmbeddingService
from serve_app.serving.seeds import GlmApiService, WebDemoService


def create_app(registry: ModelRegistry) -> FastAPI:
    app = FastAPI(title="glm-serve", version="0.1.0")
    app.state.registry = registry
    app.state.chat = ChatService(registry)
    app.state.embeddings = EmbeddingService(registry)
    app.state.glm_api = GlmApiService(app.state.chat)
    app.state.web_demo = WebDemoService(app.state.chat)
    install_error_handlers(app)
    for router in (openai.router, tokenize.router, health.router, glm_api.router, web_demo.router, ui.router):
        app.include_router(router)
    return app
