"""A second ingress in the session's Serve instance, with API keys, CORS and small limits.

It is the real Ingress deployment, built by the real builder from a config with a `security` and a `limits`
section, but it talks to the session app's own chat, embedding and tokenizer deployments through handles: no
second model loads, and the session app itself stays open, as the other tests need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

APP_NAME = "secured"
ROUTE_PREFIX = "/secured"
KEYS_ENV = "GLM_SERVE_API_KEYS"

CONFIG_KEY = "config-key-7f3a9c1e"
ENV_KEY = "env-key-2b8d4f6a"
ALLOWED_ORIGIN = "https://chat.example.com"

# Small enough to reach with small requests; large enough for the ordinary ones (and the web page's).
LIMITS = {
    "max_body_bytes": 4096,
    "max_messages": 4,
    "max_message_chars": 200,
    "max_embedding_inputs": 3,
    "max_embedding_input_chars": 100,
    "max_completion_tokens": 16,
}


@dataclass(frozen=True)
class SecuredApp:
    url: str
    config_key: str = CONFIG_KEY
    env_key: str = ENV_KEY
    allowed_origin: str = ALLOWED_ORIGIN

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.config_key}"}


def secured_args(main_app_args: dict[str, Any]) -> dict[str, Any]:
    """The session app's config, with keys (one in the config, one in the ingress's environment), CORS, limits."""
    return {
        **main_app_args,
        "ingress": {
            "num_replicas": 1,
            "ray_actor_options": {
                "num_cpus": 0.1,
                # Spaces and an empty entry, as a hand-edited Secret may have them.
                "env_vars": {KEYS_ENV: f" {ENV_KEY} ,,"},
            },
        },
        "security": {"api_keys": [CONFIG_KEY], "require_api_key": True, "cors_origins": [ALLOWED_ORIGIN]},
        "limits": LIMITS,
    }


def deploy_ingress(args: dict[str, Any], main_app: str, name: str, route_prefix: str) -> None:
    """The real Ingress, built from `args`, in front of `main_app`'s own model deployments."""
    from ray import serve

    from serve_app.builder import bind_ingress, deployment_name, parse_config

    config = parse_config(args)

    def handle(deployment: str) -> Any:
        return serve.get_deployment_handle(deployment, app_name=main_app)

    chat = {m.name: handle(deployment_name("Chat", m.name)) for m in config.chat_models}
    embeddings = {m.name: handle(deployment_name("Embedding", m.name)) for m in config.embedding_models}
    serve.run(
        bind_ingress(config, chat, embeddings, handle("Tokenizer")), name=name, route_prefix=route_prefix
    )


def deploy_secured_app(main_app: str, base_url: str) -> SecuredApp:
    from serve_app.profiles import cpu_demo_args
    from serve_app.runtime import wait_until_healthy

    deploy_ingress(secured_args(cpu_demo_args()), main_app, APP_NAME, ROUTE_PREFIX)
    url = f"{base_url}{ROUTE_PREFIX}"
    wait_until_healthy(url, timeout_s=60)  # the proxies learn the new route a moment after serve.run returns
    return SecuredApp(url=url)
