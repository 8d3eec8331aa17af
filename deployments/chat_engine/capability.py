"""Which engine can serve a model correctly, decided once when a chat replica loads it.

The continuous engine gives every layer one full causal mask over its own slot KV cache, which it hands to the
model as `cache=`: that is right only for models whose every attention layer is full attention and calls
`cache.update(...)`. Anything else (a sliding window, mixed layer types, modelling code of the checkpoint's own)
is served by the sequential engine, which runs transformers' own `generate`, or refused when the config insists.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from deployments.chat_engine.slot_cache import Segment, SlotKVCache

logger = logging.getLogger("ray.serve")

EngineKind = Literal["continuous", "sequential"]

# The probe compares the engine's way of running the model with a plain forward pass: the same logits up to
# rounding (bfloat16 on an accelerator rounds more than float32 on a CPU).
_PROBE_TOKENS = 4
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class UnservableModel(RuntimeError):
    """The model cannot be served as configured; the message says why and which config key to change."""


def check_vocabulary(model: Any, tokenizer: Any, name: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embeddings."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UnservableModel(
            f"chat model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
            f"{rows} rows, so some prompts would index past them; fix the checkpoint (path)"
        )


def choose_engine(requested: str, model: Any, name: str) -> EngineKind:
    """The engine for this model: `requested` ("auto", "continuous" or "sequential") checked against what the
    continuous engine can drive."""
    if requested == "sequential":
        return "sequential"
    reason = continuous_unsupported(model)
    if reason is None:
        return "continuous"
    if requested == "continuous":
        raise UnservableModel(
            f"chat model {name!r}: the continuous engine cannot serve it: {reason}. "
            "Set `engine: sequential` (or `auto`) in its config."
        )
    logger.warning(
        "chat model %s is served by the sequential engine (one sequence at a time): %s", name, reason
    )
    return "sequential"


def continuous_unsupported(model: Any) -> str | None:
    """Why the continuous engine cannot drive `model` correctly, or None if it can."""
    config = model.config.get_text_config()
    if not type(model).__module__.startswith("transformers."):
        return "the checkpoint brings its own modelling code (trust_remote_code), whose cache interface is unknown"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        return f"its layers mix attention types ({', '.join(sorted(layer_types))})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"its attention uses a sliding window ({config.sliding_window} tokens)"
    return _probe(model)


def _probe(model: Any) -> str | None:
    """Run a short prompt the engine's way (prefill into a slot cache, then one decode step with a prepared mask)
    and compare with a plain forward pass over the same tokens."""
    config = model.config.get_text_config()
    device = model.device
    tokens = torch.arange(1, _PROBE_TOKENS + 1, device=device)[None, :]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = SlotKVCache(
        num_layers=config.num_hidden_layers,
        num_slots=1,
        capacity=_PROBE_TOKENS,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        dtype=model.dtype,
        device=device,
    )
    prompt = _PROBE_TOKENS - 1
    try:
        with torch.inference_mode():
            expected = model(input_ids=tokens).logits[0, -1].float()
            slot = cache.add_sequence()
            cache.prepare_prefill([Segment(slot, 0, 0, prompt)])
            columns = torch.arange(prompt, device=device)
            mask = (columns[None, :] <= columns[:, None])[None, None]
            model.get_decoder()(
                input_ids=tokens[:, :prompt], position_ids=columns[None], attention_mask=mask, cache=cache
            )
            cache.finish_step()
            positions = cache.prepare_decode()
            got = (
                model(
                    input_ids=tokens[:, prompt:],
                    position_ids=positions[:, None],
                    attention_mask=cache.decode_mask(),
                    cache=cache,
                )
                .logits[0, -1]
                .float()
            )
    except Exception as exc:  # noqa: BLE001 - the model's forward does not take what the engine gives it
        return f"its forward pass does not accept the engine's cache and mask ({exc!r})"
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max()) / scale
    if error > _PROBE_TOLERANCE.get(model.dtype, 5e-2):
        return f"its logits under the engine's cache differ from a plain forward pass (relative error {error:.2g})"
    return None
