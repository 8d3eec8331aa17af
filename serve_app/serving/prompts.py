"""Where a chat prompt is rendered: in the ingress itself when the conversation is short, else by the tokenizer
deployment.

A call to the tokenizer deployment costs more than rendering a short conversation: on 2 cores that run 16 chat
streams it added ~20 ms to each request's time to first token (`python bench/chat.py --only glm --concurrency 16
--repeat 1`, alternating: TTFT p50 104 / 110 ms through the tokenizer deployment, 84 / 92 ms rendered here).
Rendering costs ~0.5 ms per thousand characters of plain text (tiny GLM's tokenizer, this machine), up to ~4 ms
per thousand for text made only of control-token markers, each encoded as pieces of its own. The ingress's event
loop serves every stream, so it renders only conversations up to `ingress_render_max_chars`; a longer one (the
body limit allows megabytes) goes to the tokenizer deployment, which has threads and replicas of its own. Both
render with the same code (`ChatTokenizers.render_chat`), so a prompt is the same either way.
"""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.tokenizer import ChatTokenizers
from serve_app.errors import raised
from serve_app.protocol.engine import ChatPrompt


class ChatPrompts:
    def __init__(
        self, tokenizer: DeploymentHandle, local: ChatTokenizers | None, local_max_chars: int
    ) -> None:
        """`local`: the ingress's own tokenizers (None: every prompt goes to `tokenizer`, the deployment)."""
        self._tokenizer = tokenizer
        self._local = local
        self._local_max_chars = local_max_chars

    async def render(
        self,
        model: str,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> ChatPrompt:
        args = (model, messages, add_generation_prompt, tools, continue_final_message)
        if (
            self._local is not None
            and _chars([messages, tools], self._local_max_chars) <= self._local_max_chars
        ):
            return self._local.render_chat(*args)
        prompt: ChatPrompt = raised(await self._tokenizer.render_chat.remote(*args))
        return prompt


def _chars(value: Any, limit: int) -> int:
    """The characters of every string in `value` (keys included), counted until they pass `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    elif not isinstance(value, list):
        return len(str(value)) if value is not None else 0
    total = 0
    for item in value:
        total += _chars(item, limit - total)
        if total > limit:
            break
    return total
