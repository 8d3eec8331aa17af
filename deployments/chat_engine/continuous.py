"""Continuous batching: many conversations share each forward pass of one chat replica.

One worker thread owns the model. Each turn of its loop admits waiting requests (a prefill each, written into a
free KV slot), then runs one decode step for every running sequence together, each at its own position. A
sequence leaves the batch at the step it finishes, hits a stop string, or its client goes away, and its slot is
reused at once. Every per-token task (sampling, detokenization, stop strings) runs here, off the event loop.

It drives any decoder whose attention layers call `past_key_values.update(keys, values, layer)` and accept a
prepared 4D mask (transformers' native models, GLM-4 among them); `SequentialEngine` serves the rest.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import torch

from deployments.chat_engine.jobs import Engine, Job
from deployments.chat_engine.sampling import RowSampler, choose_tokens
from deployments.chat_engine.slot_cache import SlotKVCache
from deployments.chat_engine.text_output import TextOutput
from serve_app.errors import InvalidRequest
from serve_app.protocol.engine import FinishReason, GenerationChunk

logger = logging.getLogger("ray.serve")


class _Sequence:
    """One running request: its sampler, its text, and where it stands."""

    def __init__(self, job: Job, sampler: RowSampler, output: TextOutput, end_ids: frozenset[int]) -> None:
        self.job = job
        self.sampler = sampler
        self.output = output
        self._end_ids = end_ids
        self.completion_tokens = 0
        self.last_token = -1
        self.done = False

    def accept(self, token: int) -> None:
        """Take the token chosen for this sequence; emit its text, or finish."""
        self.completion_tokens += 1
        if token in self._end_ids:
            return self._finish("stop")
        text = self.output.add([token])
        if text:
            self.job.emit(GenerationChunk(text, self.completion_tokens))
        if self.output.stopped:
            return self._finish("stop")
        if self.completion_tokens >= self.job.request.sampling.max_tokens:
            return self._finish("length")
        self.last_token = token
        self.sampler.observe(token)

    def _finish(self, reason: FinishReason) -> None:
        self.done = True
        self.job.emit(GenerationChunk(self.output.finish(), self.completion_tokens, reason))


class ContinuousBatchingEngine(Engine):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        end_token_ids: list[int],
        max_num_seqs: int,
        max_model_len: int,
        stream_interval_s: float = 0.0,
    ) -> None:
        super().__init__(stream_interval_s)
        self._model = model
        self._tokenizer = tokenizer
        self._end_ids = frozenset(end_token_ids)
        self._max_model_len = max_model_len
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=max_num_seqs,
            capacity=max_model_len,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            dtype=model.dtype,
            device=model.device,
        )
        self._vocab_size = model.get_output_embeddings().weight.shape[0]
        self._running: list[_Sequence] = []  # row i uses KV slot i
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
        self._thread.start()
        logger.info(
            "continuous batching: %d slots x %d tokens, KV cache %.1f MiB",
            max_num_seqs,
            max_model_len,
            self._cache.nbytes / 2**20,
        )

    def _submit(self, job: Job) -> None:
        request = job.request
        if len(request.prompt_token_ids) + request.sampling.max_tokens > self._max_model_len:
            raise InvalidRequest(
                f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"exceeds the context window of {self._max_model_len}",
                param="max_tokens",
            )
        with self._lock:
            self._waiting.append(job)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # The worker thread from here on.

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                self._drop_cancelled()
                self._admit()
                if not self._running:
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    self._decode_step()
                except Exception as exc:
                    logger.exception("decode step failed")
                    self._fail_running(exc)

    def _admit(self) -> None:
        while len(self._running) < self._cache.num_slots:
            with self._lock:
                job = self._waiting.popleft() if self._waiting else None
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._prefill(job)
            except Exception as exc:
                logger.exception("prefill failed")
                job.emit(exc)

    def _prefill(self, job: Job) -> None:
        slot = self._cache.add_sequence()
        try:
            sequence, first_token = self._prefill_slot(job, slot)
        except BaseException:
            self._cache.remove_sequence(slot)  # the newest slot: nothing moves
            raise
        self._running.append(sequence)
        sequence.accept(first_token)
        if sequence.done:
            self._release(slot)

    def _prefill_slot(self, job: Job, slot: int) -> tuple[_Sequence, int]:
        prompt, sampling = job.request.prompt_token_ids, job.request.sampling
        length, device = len(prompt), self._model.device
        self._cache.prepare_prefill(slot, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        out = self._model(
            input_ids=torch.tensor([prompt], device=device),
            position_ids=torch.arange(length, device=device)[None, :],
            attention_mask=causal[None, None, :, :],
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache.finish_step()
        sampler = RowSampler(sampling, prompt, self._vocab_size, device)
        output = TextOutput(self._tokenizer, prompt, sampling.stop)
        return _Sequence(job, sampler, output, self._end_ids), sampler.choose(out.logits[0, -1].float())

    def _decode_step(self) -> None:
        device = self._model.device
        positions = self._cache.prepare_decode()
        out = self._model(
            input_ids=torch.tensor([[s.last_token] for s in self._running], device=device),
            position_ids=positions[:, None],
            attention_mask=self._cache.decode_mask(),
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache.finish_step()
        tokens = choose_tokens([s.sampler for s in self._running], out.logits[:, -1, :].float())
        for sequence, token in zip(self._running, tokens):
            sequence.accept(token)
        # From the end, because releasing a slot moves the last sequence into it.
        for row in range(len(self._running) - 1, -1, -1):
            if self._running[row].done:
                self._release(row)

    def _drop_cancelled(self) -> None:
        for row in range(len(self._running) - 1, -1, -1):
            if self._running[row].job.cancelled.is_set():
                self._release(row)

    def _release(self, row: int) -> None:
        self._cache.remove_sequence(row)
        if row < len(self._running):
            last = self._running.pop()
            if row < len(self._running):
                self._running[row] = last

    def _fail_running(self, exc: BaseException) -> None:
        for sequence in self._running:
            sequence.job.emit(exc)
        while self._running:
            self._release(len(self._running) - 1)
