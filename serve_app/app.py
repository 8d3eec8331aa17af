"""The FastAPI application the ingress serves: routers, error handlers and the services they share."""

from __future__ import annotations

from fastapi import FastAPI

from serve_app.config import LimitsConfig
from serve_app.errors import install_error_handlers
from serve_app.limits import BodySizeLimit
from serve_app.registry import ModelRegistry
from serve_app.request_metrics import RequestMetricsMiddleware
from serve_app.routes import glm_api, health, openai, tokenize, ui, web_demo
from serve_app.security import AccessPolicy, install_cors, key_check
from serve_app.serving.chat import ChatService
from serve_app.serving.embeddings import EmbeddingService
from serve_app.serving.seeds import GlmApiService, WebDemoService


def create_app(registry: ModelRegistry, access: AccessPolicy, limits: LimitsConfig) -> FastAPI:
    app = FastAPI(title="glm-serve", version="0.1.0")
    app.state.registry = registry
    app.state.access = access
    app.state.limits = limits
    app.state.chat = ChatService(registry, limits)
    app.state.embeddings = EmbeddingService(registry, limits)
    app.state.glm_api = GlmApiService(app.state.chat)
    app.state.web_demo = WebDemoService(app.state.chat)
    install_error_handlers(app)
    model_routes = key_check(access)  # /health and the web page stay open
    for router in (openai.router, tokenize.router, health.router, glm_api.router, web_demo.router, ui.router):
        app.include_router(router, dependencies=[] if router in (health.router, ui.router) else model_routes)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    install_cors(app, access)
    # Added last, so outermost: it also counts the responses other middlewares send themselves.
    app.add_middleware(RequestMetricsMiddleware)
    return app
