"""The ChatGLM2/3 reference fixtures (shared/fixtures/chatglm, beside the repository) and their conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chatglm"
CHATGLM3 = FIXTURES / "chatglm3-tiny"
CHATGLM2 = FIXTURES / "chatglm2-tiny"
# ChatGLM2-6B's tokenizer.model is byte-identical to ChatGLM3-6B's (fixtures README).
TOKENIZER_MODEL = CHATGLM3 / "tokenizer.model"


def require_fixtures() -> None:
    if not (CHATGLM3 / "reference.json").exists():
        pytest.skip(f"ChatGLM fixtures not found at {FIXTURES} (the shared/ folder beside the repository)")


def reference(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((folder / "reference.json").read_text())
    return loaded


def tokenizer_reference() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHATGLM3 / "tokenizer_reference.json").read_text())
    return loaded


def original_copy(source: Path, destination: Path) -> Path:
    """A writable copy of an original fixture folder, with the tokenizer.model ChatGLM2's fixture lacks."""
    shutil.copytree(source, destination)
    if not (destination / "tokenizer.model").exists():
        shutil.copy(TOKENIZER_MODEL, destination / "tokenizer.model")
    return destination


def chat_messages(conversation: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A `build_chat_input` case as OpenAI-style messages plus `tools` (taken from the system message)."""
    messages: list[dict[str, Any]] = []
    tools = None
    for turn in conversation["history"]:
        message = dict(turn)
        tools = message.pop("tools", tools)
        messages.append(message)
    messages.append({"role": conversation["role"], "content": conversation["query"]})
    return messages, tools
