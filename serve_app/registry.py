"""Which deployment serves which model: the ingress's handles, configured once and looked up by model name."""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from deployments.tokenizer import ChatTokenizers
from serve_app.config import HandleTransport, HandleTransports
from serve_app.errors import ModelNotFound
from serve_app.protocol.openai import ModelCard
from serve_app.serving.prompts import ChatPrompts


@dataclass(frozen=True)
class ModelHandle:
    name: str
    handle: DeploymentHandle


class ModelRegistry:
    def __init__(
        self,
        chat: dict[str, DeploymentHandle],
        embeddings: dict[str, DeploymentHandle],
        tokenizer: DeploymentHandle,
        cards: list[ModelCard],
        transports: HandleTransports,
        local_tokenizers: ChatTokenizers | None = None,
        local_render_max_chars: int = 0,
    ) -> None:
        """`local_tokenizers`: the ingress's own, which render conversations of up to `local_render_max_chars`."""
        chat = {
            name: _over(_router_on_its_own_loop(handle), transports.chat) for name, handle in chat.items()
        }
        self._chat_unary = chat
        # Generation streams; building these options once keeps them off the per-request path.
        self._chat = {name: handle.options(stream=True) for name, handle in chat.items()}
        self._embeddings = {name: _over(handle, transports.embeddings) for name, handle in embeddings.items()}
        self.tokenizer = _over(tokenizer, transports.tokenizer)
        self.prompts = ChatPrompts(self.tokenizer, local_tokenizers, local_render_max_chars)
        self.cards = list(cards)

    def chat(self, model: str | None) -> ModelHandle:
        return _lookup(self._chat, model, "chat")

    def embedding(self, model: str | None) -> ModelHandle:
        return _lookup(self._embeddings, model, "embedding")

    def cards_with_kinds(self) -> list[tuple[ModelCard, str]]:
        """Every card with what serves it: "chat" or "embedding"."""
        return [(card, "chat" if card.id in self._chat else "embedding") for card in self.cards]

    def chat_handles(self) -> list[DeploymentHandle]:
        return list(self._chat_unary.values())

    def card(self, model: str) -> ModelCard:
        for card in self.cards:
            if card.id == model:
                return card
        raise ModelNotFound(model)

    def deployments(self) -> dict[str, DeploymentHandle]:
        """Every deployment behind the ingress, by a readable name (for health checks)."""
        named = {f"chat:{n}": h for n, h in self._chat_unary.items()}
        named.update({f"embedding:{n}": h for n, h in self._embeddings.items()})
        named["tokenizer"] = self.tokenizer
        return named


def _router_on_its_own_loop(handle: DeploymentHandle) -> DeploymentHandle:
    """The handle with Serve's router on a loop thread of its own, not the ingress's event loop.

    A burst of chat requests reaches the ingress together with the last chunks of the streams that just ended; on
    the ingress's loop, each request's routing waits its turn behind that work (.remote() to gRPC send: p50 7.3 ms
    at 16 streams). On its own loop (bench/chat.py --only glm --concurrency 16,32 --repeat 1, alternating, two runs
    each): 16 streams TTFT p50 103 / 98 vs 121 / 113 ms, 2090 / 1934 vs 1732 / 1763 tokens/s; 32 streams 2821 /
    2660 vs 2554 / 2596 tokens/s. Short calls (tokenizer, embeddings) keep the router on the caller's loop, which
    costs them less (runtime.py, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP). `_init` is Serve's way to set a handle's
    init options, before its first `.options()` or call."""
    handle._init(_run_router_in_separate_loop=True)
    return handle


def _over(handle: DeploymentHandle, transport: HandleTransport) -> DeploymentHandle:
    """The handle calling its deployment over `transport` (config.HandleTransports)."""
    return handle.options(_by_reference=transport == "ray")


def _lookup(handles: dict[str, DeploymentHandle], model: str | None, kind: str) -> ModelHandle:
    if model is None:  # a request that names no model gets the first one configured
        if not handles:
            raise ModelNotFound("(default)")
        model = next(iter(handles))
    if model not in handles:
        error = ModelNotFound(model)
        error.message = f"The model '{model}' does not exist or is not a {kind} model."
        raise error
    return ModelHandle(model, handles[model])
