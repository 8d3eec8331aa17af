"""A generation engine that runs `model.generate` for one sequence at a time on a worker thread.

The fallback for models the continuous engine cannot drive (sliding-window or mixed attention layers, checkpoints
with their own modelling code and cache format): correct and simple, one conversation at a time per replica.
Tokens are still chosen by the shared sampler (`RowSampler` through a logits processor that hands `generate` a
one-hot row), so both engines give the same text for the same request and seed, and `generate` adds no sampling
of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from deployments.chat_engine.jobs import Engine, Job
from deployments.chat_engine.sampling import choose_tokens
from deployments.chat_engine.sequence import Sequence

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics


class _SequenceChooses(LogitsProcessor):
    """Chooses each token with the sequence's own sampler and feeds it to the sequence (which emits its text),
    then forces `generate` (greedy) to take the same token."""

    def __init__(self, sequence: Sequence, metrics: ChatMetrics | None, flush: Callable[[], None]) -> None:
        self._sequence = sequence
        self._metrics = metrics
        self._flush = flush
        self._last_token_at = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        choice = choose_tokens([self._sequence.sampler], scores.float())[0]
        if isinstance(choice, BaseException):
            raise choice
        if self._metrics is not None:  # one generate() step costs far more than this
            now = time.perf_counter()
            if self._sequence.completion_tokens:
                self._metrics.inter_token(now - self._last_token_at)
            self._last_token_at = now
        self._sequence.accept(choice)
        self._flush()
        forced = torch.full_like(scores, float("-inf"))
        forced[:, choice.token] = 0.0
        return forced


class _StopWhen(StoppingCriteria):
    def __init__(self, sequence: Sequence) -> None:
        super().__init__()
        self._sequence = sequence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = self._sequence.done or self._sequence.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class SequentialEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, end_token_ids: list[int], **options: Any) -> None:
        """`options`: the `Engine` keyword arguments (stream interval, metrics, queue deadline, defaults)."""
        super().__init__(model, tokenizer, end_token_ids, **options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._vocab_size = model.get_output_embeddings().weight.shape[0]
        self._running = 0

    @property
    def running_sequences(self) -> int:
        return self._running

    @property
    def waiting_sequences(self) -> int:
        # Open streams not running wait in the executor's queue (or are relaying their last chunks).
        return max(self.open_streams - self._running, 0)

    def _submit(self, job: Job) -> None:
        self._executor.submit(self._run_then_flush, job)

    def _run_then_flush(self, job: Job) -> None:
        try:
            self._run(job)
        finally:
            self._outbox.flush()  # the job's end: its last chunk, its error or its refusal

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if (late := self.queue_deadline.refusal(job.request.received_at)) is not None:
            job.emit(late)
            return
        self._running = 1
        self._report_sequences()
        try:
            sequence = self.new_sequence(job, self._vocab_size)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting request, never lost in the executor
            job.emit(exc)
        else:
            started = time.perf_counter()
            try:
                self._generate(sequence)
            except Exception as exc:  # noqa: BLE001 - likewise
                if not sequence.done:
                    sequence.fail(exc)
            else:
                # A step is one token here: the deadline counts tokens generated ahead of a waiting request.
                steps = max(1, sequence.completion_tokens)
                self.queue_deadline.observe((time.perf_counter() - started) / steps)
        finally:
            self._running = 0
            self._report_sequences()

    def _report_sequences(self) -> None:
        if self._metrics is not None:
            self._metrics.sequences(self.running_sequences, self.waiting_sequences)

    def _generate(self, sequence: Sequence) -> None:
        request = sequence.job.request
        input_ids = torch.tensor([request.prompt_token_ids], device=self._model.device)
        # Explicit values for everything that would otherwise come from the model's generation_config: the
        # request's own parameters act through the sampler alone.
        config = GenerationConfig(
            max_new_tokens=request.sampling.max_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=sorted(self._end_ids),
            pad_token_id=self._tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=LogitsProcessorList(
                    [_SequenceChooses(sequence, self._metrics, self._outbox.flush)]
                ),
                stopping_criteria=StoppingCriteriaList([_StopWhen(sequence)]),
            )
        if not sequence.done and not sequence.job.cancelled.is_set():
            sequence.finish("length")  # generate ended on its own length limit

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
