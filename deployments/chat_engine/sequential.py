"""A generation engine that runs `model.generate` for one sequence at a time on a worker thread.

The fallback for checkpoints whose modelling code the continuous engine cannot drive (for example ChatGLM3's
remote code, which keeps its own cache format): correct and simple, one conversation at a time per replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from deployments.chat_engine.jobs import Engine, Job
from deployments.chat_engine.text_output import TextOutput
from deployments.queue_deadline import NO_DEADLINE, QueueDeadline
from serve_app.protocol.engine import FinishReason, GenerationChunk

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics


class _JobStreamer(BaseStreamer):
    """Receives each generated token from `generate`, turns it into text and emits it."""

    def __init__(
        self, job: Job, output: TextOutput, end_token_ids: frozenset[int], metrics: ChatMetrics | None
    ) -> None:
        self._job = job
        self._output = output
        self._end_ids = end_token_ids
        self._metrics = metrics
        self._last_token_at = 0.0
        self._prompt_seen = False
        self.completion_tokens = 0
        self.ended_on_end_token = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        if self._metrics is not None:  # one generate() step costs far more than this
            now = time.perf_counter()
            if self.completion_tokens:
                self._metrics.inter_token(now - self._last_token_at)
            self._last_token_at = now
        self.completion_tokens += len(ids)
        text_ids = [i for i in ids if i not in self._end_ids]
        self.ended_on_end_token = len(text_ids) < len(ids)
        text = self._output.add(text_ids) if text_ids else ""
        if text:
            self._job.emit(GenerationChunk(text=text, completion_tokens=self.completion_tokens))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        super().__init__()
        self._should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self._should_stop(), dtype=torch.bool, device=input_ids.device
        )


class SequentialEngine(Engine):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        end_token_ids: list[int],
        stream_interval_s: float = 0.0,
        metrics: ChatMetrics | None = None,
        queue_deadline: QueueDeadline = NO_DEADLINE,
    ) -> None:
        super().__init__(model, tokenizer, end_token_ids, stream_interval_s, metrics, queue_deadline)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def _submit(self, job: Job) -> None:
        self._executor.submit(self._run, job)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if (late := self._queue_deadline.refusal(job.request.received_at)) is not None:
            job.emit(late)
            return
        self._report_sequences(running=1)
        try:
            job.emit(self._generate(job))
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting request, never lost in the executor
            job.emit(exc)
        finally:
            self._report_sequences(running=0)

    def _report_sequences(self, running: int) -> None:
        # The jobs still counted active but not running wait in the executor's queue (the running one leaves the
        # count only when its stream ends on the event loop, so at the end it is still in it too).
        if self._metrics is not None:
            self._metrics.sequences(running, max(self._jobs.active - 1, 0))

    def _generate(self, job: Job) -> GenerationChunk:
        request, sampling = job.request, job.request.sampling
        output = TextOutput(self._tokenizer, request.prompt_token_ids, sampling.stop)
        streamer = _JobStreamer(job, output, self._end_ids, self._metrics)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        input_ids = torch.tensor([request.prompt_token_ids], device=self._model.device)
        kwargs: dict[str, Any] = {}
        if not sampling.greedy:
            kwargs = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k or None,
            }
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=sampling.max_tokens,
                do_sample=not sampling.greedy,
                repetition_penalty=sampling.repetition_penalty,
                eos_token_id=sorted(self._end_ids),
                pad_token_id=self._tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList(
                    [_StopWhen(lambda: job.cancelled.is_set() or output.stopped)]
                ),
                **kwargs,
            )
        finish: FinishReason = "stop" if output.stopped or streamer.ended_on_end_token else "length"
        return GenerationChunk(output.finish(), streamer.completion_tokens, finish)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
