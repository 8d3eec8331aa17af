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
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from deployments.chat_engine.jobs import Engine, Job
from deployments.chat_engine.sampling import RowSampler, choose_tokens
from deployments.chat_engine.slot_cache import SlotKVCache
from deployments.chat_engine.text_output import TextOutput
from deployments.queue_deadline import NO_DEADLINE, QueueDeadline
from serve_app.errors import InvalidRequest
from serve_app.protocol.engine import FinishReason, GenerationChunk

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics

logger = logging.getLogger("ray.serve")

# Prompt tokens prefilled in one forward pass: new requests join in waves without stalling running streams long.
_PREFILL_TOKEN_BUDGET = 2048


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
        metrics: ChatMetrics | None = None,
        queue_deadline: QueueDeadline = NO_DEADLINE,
    ) -> None:
        super().__init__(model, tokenizer, end_token_ids, stream_interval_s, metrics, queue_deadline)
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
        # Prefill runs the decoder alone, so logits are computed for each prompt's last position only.
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        self._vocab_size = self._lm_head.weight.shape[0]
        self._running: list[_Sequence] = []  # row i uses KV slot i
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self._reported_sequences = (-1, -1)  # (running, waiting) last sent to the metrics
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

    def check_alive(self) -> None:
        # An error outside the guarded decode step ends the loop: every request would then wait forever.
        if not self._closed and not self._thread.is_alive():
            raise RuntimeError("the continuous-batching loop thread has died")

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # The worker thread from here on.

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                self._drop_cancelled()
                self._refuse_late()
                # The running sequences' previous token came at the end of the last step: the prefill of those
                # joining now stalls them, so it counts in their inter-token latency. Joiners' previous token
                # comes at the end of their prefill.
                step_started = time.perf_counter() if self._running else 0.0
                self._admit()
                if self._metrics is not None:
                    self._report_sequences(self._metrics)
                if not self._running:
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                step_started = step_started or time.perf_counter()
                try:
                    self._decode_step()
                except Exception as exc:
                    logger.exception("decode step failed")
                    self._fail_running(exc)
                    continue
                if self._metrics is not None:
                    self._metrics.inter_token(time.perf_counter() - step_started)

    def _report_sequences(self, metrics: ChatMetrics) -> None:
        # Only on change: most steps change neither count, and a gauge update costs more than this comparison.
        counts = (len(self._running), len(self._waiting))
        if counts != self._reported_sequences:
            self._reported_sequences = counts
            metrics.sequences(*counts)

    def _admit(self) -> None:
        """Prefill waiting requests, several per forward pass, within the prefill token budget."""
        while len(self._running) < self._cache.num_slots:
            jobs: list[Job] = []
            tokens = 0
            with self._lock:
                while self._waiting and len(self._running) + len(jobs) < self._cache.num_slots:
                    job = self._waiting[0]
                    length = len(job.request.prompt_token_ids)
                    if jobs and tokens + length > _PREFILL_TOKEN_BUDGET:
                        break
                    self._waiting.popleft()
                    if not job.cancelled.is_set():
                        jobs.append(job)
                        tokens += length
            if not jobs:
                return
            self._prefill_or_fail(jobs)

    def _refuse_late(self) -> None:
        """Refuse the jobs that waited past the queue deadline: the oldest are at the head of the queue."""
        now = time.time()
        with self._lock:
            while self._waiting:
                job = self._waiting[0]
                late = self._queue_deadline.refusal(job.request.received_at, now)
                if late is None and not job.cancelled.is_set():
                    return
                self._waiting.popleft()
                if late is not None:
                    job.emit(late)

    def _prefill_or_fail(self, jobs: list[Job]) -> None:
        try:
            self._prefill(jobs)
        except Exception as exc:
            if len(jobs) > 1:  # a bad prompt must fail alone, not its whole wave
                for job in jobs:
                    self._prefill_or_fail([job])
            else:
                logger.exception("prefill failed")
                jobs[0].emit(exc)

    def _prefill(self, jobs: list[Job]) -> None:
        slots = [self._cache.add_sequence() for _ in jobs]
        try:
            first_tokens = self._prefill_slots(jobs, slots)
        except BaseException:
            for slot in reversed(slots):  # the newest slots: nothing moves
                self._cache.remove_sequence(slot)
            raise
        for job, slot, token in zip(jobs, slots, first_tokens, strict=True):
            sampling, prompt = job.request.sampling, job.request.prompt_token_ids
            sampler = RowSampler(sampling, prompt, self._vocab_size, self._model.device)
            sequence = _Sequence(
                job, sampler, TextOutput(self._tokenizer, prompt, sampling.stop), self._end_ids
            )
            self._running.append(sequence)
            sequence.accept(sampler.choose(token))
        for row in range(len(self._running) - 1, -1, -1):
            if self._running[row].done:
                self._release(row)

    def _prefill_slots(self, jobs: list[Job], slots: list[int]) -> list[torch.Tensor]:
        """One forward pass over the new prompts; returns each one's next-token logits."""
        device = self._model.device
        prompts = [job.request.prompt_token_ids for job in jobs]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max())
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
        columns = torch.arange(width, device=device)
        causal = columns[None, :] <= columns[:, None]  # [query, key]
        real_keys = columns[None, :] < lengths[:, None]  # [row, key]
        mask = causal[None, :, :] & real_keys[:, None, :]
        self._cache.prepare_prefill(list(zip(slots, lengths.tolist(), strict=True)))
        hidden = self._decoder(
            input_ids=input_ids,
            position_ids=columns[None, :].expand(len(prompts), -1),
            attention_mask=mask[:, None, :, :],
            past_key_values=self._cache,
            use_cache=True,
        ).last_hidden_state
        self._cache.finish_step()
        last = hidden[torch.arange(len(prompts), device=device), lengths - 1]
        return list(self._lm_head(last).float())

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
