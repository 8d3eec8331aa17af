"""Tools as chat templates take them: Hugging Face's convention, `{"type": "function", "function": {...}}`."""

from __future__ import annotations

from typing import Any

from serve_app.protocol.openai_tools import ToolDefinition


def template_tools(tools: list[ToolDefinition]) -> list[dict[str, Any]] | None:
    """The `tools` argument of `render_chat`: None when there are none, so a template renders no tool section."""
    if not tools:
        return None
    # `strict` is for the server (the arguments must match the schema), not a thing to show the model.
    return [tool.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for tool in tools]
