"""What every engine shares: a request's job, and the async side that relays its increments to the caller.

Engines run the model on a worker thread and call `job.emit` from there; `JobStream` turns those emissions into
an async iterator on the replica's event loop. When the consumer goes away (a client disconnect cancels the
iterator), the job is marked cancelled and the engine drops it at its next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from deployments.chat_engine.sampling import RowSampler
from deployments.chat_engine.sequence import Sequence
from deployments.queue_deadline import QueueDeadline
from serve_app.errors import ServiceUnavailable
from serve_app.protocol.engine import GenerateRequest, GenerationChunk, GenerationDefaults

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics

Emitted = GenerationChunk | BaseException
# What a request that leaves sampling fields out gets when the model has no defaults of its own.
OPENAI_DEFAULTS = GenerationDefaults()


@dataclass
class Job:
    request: GenerateRequest
    emit: Callable[[Emitted], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobCounter:
    def __init__(self) -> None:
        self.active = 0


class Engine:
    """What the chat deployment sees of an engine; subclasses only say how a job reaches their worker.

    `stream_interval_s` batches a stream's increments in time: every message costs CPU in three processes
    (replica, ingress, proxy), so sending one per token starves the model on a small machine. The first
    increment always goes out at once, so time to first token does not change.

    `metrics` records the engine's inter-token latency and sequence counts; None (no Ray replica) records nothing.
    `queue_deadline` refuses a job that waited too long for its turn (in engine steps, timed by the engine).
    `defaults` fill in the sampling fields a request left out (the model's generation_config). `retry_after_s` is
    what a refusal of a broken engine says.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        end_token_ids: list[int],
        stream_interval_s: float = 0.0,
        metrics: ChatMetrics | None = None,
        queue_deadline: QueueDeadline | None = None,
        defaults: GenerationDefaults = OPENAI_DEFAULTS,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._end_ids = frozenset(end_token_ids)
        self._jobs = JobCounter()
        self._stream_interval_s = stream_interval_s
        self._metrics = metrics
        # The engine's own: it reports its step times to it.
        self.queue_deadline = queue_deadline or QueueDeadline()
        self._defaults = defaults
        self._grammar_tokenizer: Any = None
        # Why the engine can no longer serve (set by its worker); then every request is refused and the health
        # check fails until Serve replaces the replica.
        self.broken: str | None = None

    @property
    def open_streams(self) -> int:
        """Requests whose stream is open on this replica: running, waiting, or relaying their last chunks."""
        return self._jobs.active

    @property
    def running_sequences(self) -> int:
        """Sequences the engine is generating now (the batch); drops at the step a client leaves."""
        raise NotImplementedError

    @property
    def waiting_sequences(self) -> int:
        raise NotImplementedError

    def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        request = replace(request, sampling=request.sampling.resolve(self._defaults))
        return relay(self._submit_unless_broken, request, self._jobs, self._stream_interval_s)

    def _submit_unless_broken(self, job: Job) -> None:
        if self.broken is not None:
            raise self.unavailable()
        self._submit(job)

    def _submit(self, job: Job) -> None:
        raise NotImplementedError

    def unavailable(self) -> ServiceUnavailable:
        """The refusal of a broken engine: retry, another replica (or this one's replacement) will serve it."""
        return ServiceUnavailable(
            "The model replica serving this request is unhealthy and being replaced. Please retry after a short "
            "wait.",
            "replica_unavailable",
            self.queue_deadline.retry_after_s,
        )

    def new_sequence(self, job: Job, vocab_size: int) -> Sequence:
        """A request's sequence: its sampler (with its grammar, if it has one) and its text output."""
        params = job.request.sampling
        constraint = None
        if params.grammar is not None:
            from deployments.chat_engine.grammar import GrammarConstraint, grammar_tokenizer

            if self._grammar_tokenizer is None:  # once per replica, on first use
                self._grammar_tokenizer = grammar_tokenizer(self._tokenizer)
            constraint = GrammarConstraint(params.grammar, self._grammar_tokenizer)
        sampler = RowSampler(params, job.request.prompt_token_ids, vocab_size, self._model.device, constraint)
        return Sequence(job, sampler, self._tokenizer, self._end_ids)

    def check_alive(self) -> None:
        """Raise if the engine can no longer serve (for the replica's health check)."""
        if self.broken is not None:
            raise RuntimeError(f"the chat engine is broken: {self.broken}")

    def break_for_tests(self) -> None:
        """Fault injection (`ChatDeployment.break_engine_for_tests`): put the engine in a state it must detect."""
        self.broken = "broken on purpose by a test"

    def close(self) -> None:
        pass


async def relay(
    submit: Callable[[Job], None], request: GenerateRequest, counter: JobCounter, interval_s: float = 0.0
) -> AsyncIterator[GenerationChunk]:
    """Submit a job and yield its chunks until the finishing one; a raised error is re-raised here.

    After the first chunk, chunks that arrive within `interval_s` of the last one sent are merged into one.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Emitted] = asyncio.Queue()

    def emit(item: Emitted) -> None:
        # Called from the engine's worker, which must never fail for a consumer that is gone: a closed loop
        # means nobody reads this job any more, so it is dropped like a cancelled one.
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            job.cancelled.set()

    job = Job(request, emit)
    counter.active += 1
    try:
        submit(job)
        next_send = 0.0
        while True:
            item = await queue.get()
            wait = next_send - loop.time()
            if wait > 0 and isinstance(item, GenerationChunk) and item.finish_reason is None:
                await asyncio.sleep(wait)
            # Merge what piled up while we were away: fewer, larger messages through Ray.
            while not queue.empty() and isinstance(item, GenerationChunk) and item.finish_reason is None:
                item = _merge(item, queue.get_nowait())
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
            next_send = loop.time() + interval_s
    finally:
        job.cancelled.set()
        counter.active -= 1


def _merge(first: GenerationChunk, second: Emitted) -> Emitted:
    if isinstance(second, BaseException):
        return second
    logprobs = None
    if first.logprobs is not None or second.logprobs is not None:
        logprobs = [*(first.logprobs or ()), *(second.logprobs or ())]
    return GenerationChunk(first.text + second.text, second.completion_tokens, second.finish_reason, logprobs)
