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
from serve_app.config import AppConfig
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


def bind_graph(config: AppConfig) -> Application:
    created = int(time.time())
    chat = {
        m.name: ChatDeployment.options(
            name=deployment_name("Chat", m.name), **m.deployment.to_serve_options()
        ).bind(m)
        for m in config.chat_models
    }
    embeddings = {
        m.name: EmbeddingDeployment.options(
            name=deployment_name("Embedding", m.name), **m.deployment.to_serve_options()
        ).bind(m)
        for m in config.embedding_models
    }
    tokenizer = TokenizerDeployment.options(name="Tokenizer", **config.tokenizer.to_serve_options()).bind(
        list(config.chat_models)
    )
    cards = [ModelCard(id=m.name, created=created, owned_by=m.owned_by) for m in config.chat_models]
    cards += [ModelCard(id=m.name, created=created, owned_by=m.owned_by) for m in config.embedding_models]
    return Ingress.options(name="Ingress", **config.ingress.to_serve_options()).bind(
        chat, embeddings, tokenizer, cards
    )
