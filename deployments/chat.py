"""The chat deployment: one causal LM on one replica (a GPU when the config gives it one)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from deployments.chat_engine.continuous import ContinuousBatchingEngine
from deployments.chat_engine.jobs import Engine
from deployments.chat_engine.sequential import SequentialEngine
from deployments.model_files import (
    context_window,
    end_token_ids,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from serve_app.config import ChatModelConfig
from serve_app.protocol.engine import GenerateRequest, GenerationChunk

logger = logging.getLogger("ray.serve")


@serve.deployment
class ChatDeployment:
    def __init__(self, config: ChatModelConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        device = resolve_device(config.device, config.cpu_threads)
        self._tokenizer = load_tokenizer(config)
        model = AutoModelForCausalLM.from_pretrained(
            config.path, dtype=resolve_dtype(config.dtype, device), trust_remote_code=config.trust_remote_code
        )
        model.to(device).eval()  # type: ignore[arg-type]
        self._device = torch.device(device)
        end_ids = end_token_ids(model.generation_config.eos_token_id, self._tokenizer)
        interval_s = config.stream_interval_ms / 1000
        self._engine: Engine
        if config.engine == "continuous":
            window = context_window(config)
            self._engine = ContinuousBatchingEngine(
                model, self._tokenizer, end_ids, config.max_num_seqs, window, interval_s
            )
        else:
            self._engine = SequentialEngine(model, self._tokenizer, end_ids, interval_s)
        logger.info("chat model %s loaded from %s on %s", config.name, config.path, device)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of one prompt; the last chunk carries the finish reason."""
        async for chunk in self._engine.stream(request):
            yield chunk

    def status(self) -> dict[str, int]:
        """Answered for /health: the sequences this replica is generating or about to."""
        return {"active_sequences": self._engine.active_sequences}

    def clear_cache(self) -> bool:
        """Release cached accelerator memory (the web demo's /clear); a no-op on CPU."""
        import torch

        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
