"""The app builder named by serve_config.yaml: validate the config once, then bind the deployment graph."""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from deployments.chat import ChatDeployment
from deployments.embedding import EmbeddingDeployment
from deployments.tokenizer import TokenizerDeployment
from serve_app.config import AppConfig, ChatModelConfig, DeploymentOptions, EmbeddingModelConfig
from serve_app.ingress import Ingress
from serve_app.protocol.openai import ModelCard


class ConfigError(ValueError):
    """serve_config.yaml's args do not describe a valid graph; the message names each bad field."""


def build_app(args: dict[str, Any]) -> Application:
    return bind_graph(parse_config(args))


def parse_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"invalid glm-serve config:\n{problems}") from None


def deployment_name(kind: str, model: str) -> str:
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}"


def _bind(deployment: Any, name: str, options: DeploymentOptions, *args: Any) -> Application:
    return deployment.options(name=name, **options.to_serve_options()).bind(*args)  # type: ignore[no-any-return]


def bind_graph(config: AppConfig) -> Application:
    chat = {
        m.name: _bind(ChatDeployment, deployment_name("Chat", m.name), m.deployment, m)
        for m in config.chat_models
    }
    embeddings = {
        m.name: _bind(EmbeddingDeployment, deployment_name("Embedding", m.name), m.deployment, m)
        for m in config.embedding_models
    }
    tokenizer = _bind(TokenizerDeployment, "Tokenizer", config.tokenizer, list(config.chat_models))
    return bind_ingress(config, chat, embeddings, tokenizer)


def bind_ingress(
    config: AppConfig, chat: dict[str, Any], embeddings: dict[str, Any], tokenizer: Any
) -> Application:
    """The ingress over the model deployments: bound ones (`bind_graph`), or handles of ones already running."""
    created = int(time.time())
    served: list[ChatModelConfig | EmbeddingModelConfig] = [*config.chat_models, *config.embedding_models]
    cards = [ModelCard(id=m.name, created=created, owned_by=m.owned_by) for m in served]
    return _bind(
        Ingress,
        "Ingress",
        config.ingress,
        chat,
        embeddings,
        tokenizer,
        cards,
        config.security,
        config.limits,
        config.handle_transport,
        list(config.chat_models),
        config.ingress_render_max_chars,
    )
