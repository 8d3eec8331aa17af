"""Loading what a chat model folder holds: device and dtype choice, tokenizer, context window, end tokens.

Shared by the chat and tokenizer deployments so both see the same window and the same tokenizer settings.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from serve_app.config import ChatModelConfig, Device, DType
from serve_app.protocol.engine import GenerationDefaults

# ChatGLM's turn markers end an assistant reply just as eos does.
_GLM_TURN_END_TOKENS = ("<|user|>", "<|observation|>")


def resolve_device(device: Device, cpu_threads: int | None = None) -> str:
    """The torch device a replica loads its model on; also applies the configured CPU thread count."""
    import torch

    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but this replica sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: DType, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


@cache
def _resolved(path: str) -> str:
    from serve_app.chatglm.checkpoint import resolve
    from serve_app.tiny_glm import default_cache_dir

    # One cache per node (GLM_SERVE_CACHE, else ~/.cache/glm-serve), shared by the chat and tokenizer replicas.
    return resolve(path, default_cache_dir() / "converted")


def model_path(config: ChatModelConfig) -> str:
    """The folder or hub id to load for `config.path`. An original ChatGLM2-6B/ChatGLM3-6B folder is converted
    to transformers' native GLM once (the first replica on a node converts, the others wait for it) and its
    converted copy is loaded; ChatGLM-6B v1 and other ChatGLM variants are refused with a message naming
    what is supported."""
    return _resolved(config.path)


def load_tokenizer(config: ChatModelConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(config), trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_window(config: ChatModelConfig) -> int:
    """The most tokens (prompt + completion) a sequence may hold."""
    if config.max_model_len is not None:
        return config.max_model_len
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_path(config), trust_remote_code=config.trust_remote_code)
    # ChatGLM3's remote-code config calls it seq_length.
    for attribute in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(model_config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context window of {config.path!r}: set max_model_len in its config")


def end_token_ids(generation_eos: int | list[int] | None, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    special = set(tokenizer.all_special_tokens)
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in _GLM_TURN_END_TOKENS if t in special)
    return sorted(ids)


def generation_defaults(generation_config: Any) -> GenerationDefaults:
    """The sampling a request gets for the fields it leaves out: the model's own settings when its
    generation_config asks for sampling (GLM-4 ships temperature 0.8, top_p 0.8), else OpenAI's defaults.
    Only what the checkpoint's file sets counts, not transformers' global defaults (top_k 50)."""
    own = generation_config.to_diff_dict() if generation_config is not None else {}
    if not own.get("do_sample"):
        return GenerationDefaults()
    fallback = GenerationDefaults()
    return GenerationDefaults(
        temperature=float(own.get("temperature", fallback.temperature)),
        top_p=float(own.get("top_p", fallback.top_p)),
        top_k=int(own.get("top_k") or fallback.top_k),
        repetition_penalty=float(own.get("repetition_penalty", fallback.repetition_penalty)),
    )
