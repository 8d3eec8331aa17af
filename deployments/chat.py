"""The chat deployment: one causal LM on one replica (a GPU when the config gives it one)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.chat_engine.capability import check_vocabulary, choose_engine
from deployments.chat_engine.continuous import ContinuousBatchingEngine
from deployments.chat_engine.jobs import Engine
from deployments.chat_engine.sequential import SequentialEngine
from deployments.cpu_affinity import cpus_for_prefill, pin_to_one_cpu, usable_cpus
from deployments.model_files import (
    context_window,
    end_token_ids,
    generation_defaults,
    load_tokenizer,
    model_path,
    resolve_device,
    resolve_dtype,
)
from deployments.model_health import poison_weights, require_finite
from deployments.queue_deadline import QueueDeadline
from serve_app.config import ChatModelConfig
from serve_app.errors import APIError
from serve_app.metrics import ChatMetrics
from serve_app.protocol.engine import GenerateRequest, GenerationChunk

logger = logging.getLogger("ray.serve")


@serve.deployment
class ChatDeployment:
    def __init__(self, config: ChatModelConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        # The constructor runs on the replica's event loop thread; the engine's thread, started below, inherits it.
        # A prefill thread runs short waves on the pinned CPU, long prompts on every CPU (cpus_for_prefill says why).
        cpus = usable_cpus()
        self._cpu = (
            pin_to_one_cpu(serve.get_replica_context().rank.local_rank) if config.pin_to_one_cpu else None
        )
        self._prefill_cpus = cpus_for_prefill(self._cpu, cpus) if config.prefill_thread else None
        device = resolve_device(config.device, config.cpu_threads)
        self._tokenizer = load_tokenizer(config)
        model = AutoModelForCausalLM.from_pretrained(
            model_path(config),
            dtype=resolve_dtype(config.dtype, device),
            trust_remote_code=config.trust_remote_code,
        )
        model.to(device).eval()  # type: ignore[arg-type]
        self._model = model
        self._device = torch.device(device)
        # One thread: a probe that hangs (a wedged accelerator) makes the next ones wait and time out, not pile up.
        self._probe_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-probe")
        end_ids = end_token_ids(model.generation_config.eos_token_id, self._tokenizer)
        self._metrics = ChatMetrics(config.name)
        check_vocabulary(model, self._tokenizer, config.name)
        options = {
            "stream_interval_s": config.stream_interval_ms / 1000,
            "metrics": self._metrics,
            "queue_deadline": QueueDeadline.of(config),
            "defaults": generation_defaults(model.generation_config),
        }
        self._engine: Engine
        if choose_engine(config.engine, model, config.name) == "continuous":
            self._engine = ContinuousBatchingEngine(
                model,
                self._tokenizer,
                end_ids,
                config.max_num_seqs,
                context_window(config),
                config.prefill_chunk_tokens,
                prefill_thread=config.prefill_thread,
                prefill_cpus=self._prefill_cpus,
                **options,
            )
        else:
            self._engine = SequentialEngine(model, self._tokenizer, end_ids, **options)
        logger.info("chat model %s loaded from %s on %s", config.name, config.path, device)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk | APIError]:
        """Stream the completion of one prompt; the last chunk carries the finish reason. A refusal (overloaded,
        an engine that is broken) or a client error ends the stream as its last item, a value (see
        serve_app/errors.py)."""
        received = time.perf_counter()
        last: GenerationChunk | None = None
        try:
            async for chunk in self._engine.stream(request):
                if last is None:
                    self._metrics.first_token(time.perf_counter() - received, len(request.prompt_token_ids))
                last = chunk
                yield chunk
        except APIError as error:
            yield error
        finally:
            if last is not None:  # also when the client went away mid-stream: those tokens were computed
                self._metrics.completion_tokens(last.completion_tokens)

    def status(self) -> dict[str, Any]:
        """Answered for /health: the sequences this replica is generating (`running_sequences`, the batch),
        those waiting for a place in it, the streams open on it (those two plus streams relaying their end), the
        queue deadline as measured now (null before the first step), the CPU its threads are pinned to (null
        when they are not: `pin_to_one_cpu`), those of its prefill thread for short waves and for long prompts
        (`short_waves`, `long_prompts`; null without one, or unpinned), and
        what its decode steps have cost since it started (`decode`: steps, rows, forward_s, forward_cpu_s;
        null for the sequential engine; deployments/chat_engine/decode_tally.py)."""
        return {
            "cpu": self._cpu,
            "prefill_cpus": (
                {where: sorted(cpus) for where, cpus in self._prefill_cpus._asdict().items()}
                if self._prefill_cpus
                else None
            ),
            "running_sequences": self._engine.running_sequences,
            "waiting_sequences": self._engine.waiting_sequences,
            "open_streams": self._engine.open_streams,
            "decode": tally.snapshot() if (tally := self._engine.decode_tally) else None,
            **self._engine.queue_deadline.status(),
        }

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises: the engine is broken (its worker died, an invariant between
        its batch and its KV cache broke, decode steps keep failing), or a one-token forward pass fails or gives
        non-finite logits. The pass runs beside the engine's, off the event loop, and uses no KV cache."""
        self._engine.check_alive()
        await asyncio.get_running_loop().run_in_executor(self._probe_executor, self._probe)

    def _probe(self) -> None:
        import torch

        with torch.inference_mode():
            logits = self._model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self._device)).logits
        require_finite(logits, "the chat model's forward pass")

    def break_model_for_tests(self) -> dict[str, Any]:
        """Fault injection, reachable only through a Serve handle (never over HTTP): NaN weights, as a corrupted
        model has. Generation then produces garbage and `check_health` fails until Serve replaces the replica."""
        logger.warning("chat model weights poisoned on purpose (break_model_for_tests)")
        return poison_weights(self._model)

    def break_engine_for_tests(self) -> None:
        """Fault injection, reachable only through a Serve handle: a KV slot held by no sequence (the state one bad
        request left behind before failures were confined to their request). The engine notices at its next turn,
        refuses requests with 503 and fails its health check until Serve replaces the replica."""
        logger.warning("chat engine state broken on purpose (break_engine_for_tests)")
        self._engine.break_for_tests()

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
