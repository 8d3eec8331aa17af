"""At load, a chat replica checks which engine can drive its model, and serves it there or refuses to start."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GlmForCausalLM, MistralConfig, MistralForCausalLM

from deployments.chat_engine.capability import (
    UnservableModel,
    check_vocabulary,
    choose_engine,
    continuous_unsupported,
)
from deployments.chat_engine.sequential import SequentialEngine
from tests.engine_harness import generate_text, request, run


@pytest.fixture(scope="module")
def sliding_window_model(parts: tuple[Any, Any, list[int]]) -> Any:
    """A tiny Mistral-style model (built like the tiny GLM) whose window is shorter than the test prompts."""
    _, tokenizer, _ = parts
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
    )
    return MistralForCausalLM(config).eval()


def test_the_native_glm_runs_on_the_continuous_engine(parts: tuple[Any, Any, list[int]]) -> None:
    model = parts[0]
    assert continuous_unsupported(model) is None
    assert choose_engine("auto", model, "tiny-glm") == "continuous"


def test_a_sliding_window_model_is_served_sequentially_and_correctly(
    parts: tuple[Any, Any, list[int]], sliding_window_model: Any
) -> None:
    _, tokenizer, ends = parts
    assert "sliding window" in (continuous_unsupported(sliding_window_model) or "")
    assert choose_engine("auto", sliding_window_model, "mistral") == "sequential"
    engine = SequentialEngine(sliding_window_model, tokenizer, ends)
    try:
        long_prompt = request(tokenizer, 5, max_tokens=12)  # ~30 tokens: the window matters
        assert len(long_prompt.prompt_token_ids) > 8
        assert run(engine, [long_prompt]) == [
            generate_text(sliding_window_model, tokenizer, ends, long_prompt)
        ]
    finally:
        engine.close()


def test_insisting_on_the_continuous_engine_for_it_refuses_to_start_and_says_what_to_change(
    sliding_window_model: Any,
) -> None:
    with pytest.raises(UnservableModel, match=r"sliding window.*engine: sequential"):
        choose_engine("continuous", sliding_window_model, "mistral")


def test_a_model_with_its_own_modelling_code_goes_to_the_sequential_engine(
    parts: tuple[Any, Any, list[int]],
) -> None:
    model = parts[0]
    # What trust_remote_code loads: a class from the checkpoint's own module, not from transformers.
    remote_class = type(
        "ChatGLMForConditionalGeneration", (GlmForCausalLM,), {"__module__": "transformers_modules.x"}
    )
    remote = remote_class(model.config)
    assert "own modelling code" in (continuous_unsupported(remote) or "")
    assert choose_engine("auto", remote, "remote") == "sequential"


def test_a_tokenizer_larger_than_the_embeddings_is_refused(parts: tuple[Any, Any, list[int]]) -> None:
    model, tokenizer, _ = parts
    small = GlmForCausalLM(
        model.config.__class__(**{**model.config.to_dict(), "vocab_size": len(tokenizer) - 7})
    )
    check_vocabulary(model, tokenizer, "tiny-glm")
    with pytest.raises(UnservableModel, match="tokenizer has"):
        check_vocabulary(small, tokenizer, "tiny-glm")
