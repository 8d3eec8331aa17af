"""Where a chat prompt is rendered (serving/prompts.py): short conversations in the ingress, long ones by the
tokenizer deployment, the same prompt either way. The deployment's side is a stand-in that renders with the same
class and records that it was called: which side renders is what is tested here; the real deployment renders in
the session app (test_control_tokens.py, and every chat route when tests/test_http_fronts.py sets the limit to 0)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.tokenizer import ChatTokenizers
from serve_app.config import ChatModelConfig
from serve_app.protocol.engine import ChatPrompt
from serve_app.serving.prompts import ChatPrompts
from serve_app.tiny_glm import ensure_tiny_glm

LIMIT = 100


class _RecordingDeployment:
    """`handle.render_chat.remote(...)` as a Serve handle answers it: an awaitable of the deployment's result."""

    def __init__(self, tokenizers: ChatTokenizers) -> None:
        self.calls = 0
        self.render_chat = self
        self._tokenizers = tokenizers

    def remote(self, *args: Any) -> asyncio.Future[ChatPrompt]:
        self.calls += 1
        future: asyncio.Future[ChatPrompt] = asyncio.get_running_loop().create_future()
        future.set_result(self._tokenizers.render_chat(*args))
        return future


@pytest.fixture(scope="module")
def tokenizers() -> ChatTokenizers:
    return ChatTokenizers([ChatModelConfig(name="tiny-glm", path=str(ensure_tiny_glm()))])


def _conversation(chars: int) -> list[dict[str, Any]]:
    """Messages holding `chars` characters in all, keys included, some of them in a field other than content."""
    keys = len("role") * 2 + len("system") + len("user") + len("content") * 2 + len("metadata")
    text = chars - keys
    return [
        {"role": "system", "content": "s" * (text // 3)},
        {"role": "user", "content": "u" * (text - 2 * (text // 3)), "metadata": "m" * (text // 3)},
    ]


@pytest.mark.parametrize(("chars", "remote_calls"), [(LIMIT, 0), (LIMIT + 1, 1)])
def test_conversations_up_to_the_limit_are_rendered_in_the_ingress(
    tokenizers: ChatTokenizers, chars: int, remote_calls: int
) -> None:
    deployment = _RecordingDeployment(tokenizers)
    prompts = ChatPrompts(deployment, tokenizers, LIMIT)  # type: ignore[arg-type]
    messages = _conversation(chars)
    prompt = asyncio.run(prompts.render("tiny-glm", messages))
    assert deployment.calls == remote_calls
    assert prompt == tokenizers.render_chat("tiny-glm", messages)


def test_without_local_tokenizers_every_conversation_goes_to_the_deployment(
    tokenizers: ChatTokenizers,
) -> None:
    deployment = _RecordingDeployment(tokenizers)
    prompts = ChatPrompts(deployment, None, 0)  # type: ignore[arg-type]
    asyncio.run(prompts.render("tiny-glm", [{"role": "user", "content": "hi"}]))
    assert deployment.calls == 1
