"""What every engine shares: a request's job, and the async side that relays its increments to the caller.

Engines run the model on a worker thread and call `job.emit` from there; the engine's `Outbox` hands those
emissions to the replica's event loop when the engine flushes it, and `relay` turns them into an async iterator.
When the consumer goes away (a client disconnect cancels the iterator), the job is marked cancelled and the engine
drops it at its next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeGuard

from deployments.chat_engine.decode_tally import DecodeTally
from deployments.chat_engine.sampling import RowSampler
from deployments.chat_engine.sequence import Sequence
from deployments.chat_engine.token_bytes import TokenSpeller
from deployments.queue_deadline import QueueDeadline
from serve_app.errors import ServiceUnavailable
from serve_app.protocol.engine import GenerateRequest, GenerationChunk, GenerationDefaults

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics

Emitted = GenerationChunk | BaseException
# What a request that leaves sampling fields out gets when the model has no defaults of its own.
OPENAI_DEFAULTS = GenerationDefaults()


class Job:
    """One request on its way through an engine: what the worker emits goes to the outbox, which hands it to the
    request's relay on its event loop."""

    def __init__(self, request: GenerateRequest, outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue[Emitted] = asyncio.Queue()
        self.loop = loop
        self.started = False  # the outbox's: whether this stream was sent its first increment
        self.queued_at = time.perf_counter()  # reached the engine
        self._outbox = outbox

    def emit(self, item: Emitted) -> None:
        """From the engine's worker: an increment, the finishing chunk, or the error that ends the request."""
        self._outbox.put(self, item)


class Outbox:
    """The worker's side of every stream. Increments are held per job and handed to the event loop in one call
    per `flush` (the engine flushes once per turn): a call wakes the loop's thread, which competes with the worker
    for the CPU and the GIL, so one wake-up per step beats one per token per stream. A stream is sent its first
    increment and its end at once, and otherwise what it holds at the outbox's next tick, once per `interval_s`
    for all streams together: every message costs CPU in three processes (replica, ingress, proxy), and one per
    token starves the model on a small machine, while the time to first token does not change. Shared ticks
    wake the loop once per interval, not at every step where some stream's own interval has run out (16 streams:
    ~20 wake-ups a second instead of ~250; `python bench/chat.py --only glm --concurrency 16 --rates ''
    --repeat 1 --rounds 60`, alternating, five runs each: 2881 vs 2726 tokens/s on average)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next_tick = 0.0
        self._held: dict[Job, Emitted] = {}
        self._lock = threading.Lock()  # put and flush come from the worker, forget from the event loop

    def put(self, job: Job, item: Emitted) -> None:
        with self._lock:
            held = self._held.get(job)
            if held is None:
                self._held[job] = item
            elif _continues(held):  # nothing after a stream's end counts
                self._held[job] = _merge(held, item)

    def flush(self) -> None:
        """Hand every stream's due increments to its event loop: one call per loop."""
        now = time.monotonic()
        tick = now >= self._next_tick
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Emitted]]] = {}
        with self._lock:
            for job, item in list(self._held.items()):
                if tick or not job.started or not _continues(item):
                    del self._held[job]
                    job.started = True
                    by_loop.setdefault(job.loop, []).append((job, item))
            if tick and by_loop:
                self._next_tick = now + self._interval_s
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:
                # The worker must never fail for a consumer that is gone: a closed loop means nobody reads these
                # jobs any more, so they are dropped like cancelled ones.
                for job, _ in deliveries:
                    job.cancelled.set()

    def forget(self, job: Job) -> None:
        """Drop what is held for a job whose consumer went away."""
        with self._lock:
            self._held.pop(job, None)


def _continues(item: Emitted) -> TypeGuard[GenerationChunk]:
    """An increment that more of its stream follows (not the finishing chunk, not an error)."""
    return isinstance(item, GenerationChunk) and item.finish_reason is None


def _deliver(deliveries: list[tuple[Job, Emitted]]) -> None:
    for job, item in deliveries:
        job.queue.put_nowait(item)


class JobCounter:
    def __init__(self) -> None:
        self.active = 0


class Engine:
    """What the chat deployment sees of an engine; subclasses only say how a job reaches their worker.

    `stream_interval_s` batches a stream's increments in time (`Outbox`); engines call `self._outbox.flush()`
    after each forward pass.

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
        self._outbox = Outbox(stream_interval_s)
        self._metrics = metrics
        # The engine's own: it reports its step times to it.
        self.queue_deadline = queue_deadline or QueueDeadline()
        self._defaults = defaults
        self._grammar_tokenizer: Any = None
        # Built now, not at the first request with logprobs: it reads the tokenizer's whole JSON once (~0.1 s for
        # ChatGLM3's 65k vocabulary), which on the engine's thread would stall every running stream.
        self._speller = TokenSpeller(tokenizer)
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

    @property
    def decode_tally(self) -> DecodeTally | None:
        """What its decode steps have cost so far (decode_tally.py); None where the engine does not count them."""
        return None

    def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        request = replace(request, sampling=request.sampling.resolve(self._defaults))
        return relay(self._submit_unless_broken, request, self._jobs, self._outbox)

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
        return Sequence(
            job, sampler, self._tokenizer, self._end_ids, self._speller if params.logprobs else None
        )

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
    submit: Callable[[Job], None], request: GenerateRequest, counter: JobCounter, outbox: Outbox
) -> AsyncIterator[GenerationChunk]:
    """Submit a job and yield its chunks until the finishing one; a raised error is re-raised here. Chunks that
    piled up while the consumer was busy are merged into one."""
    job = Job(request, outbox, asyncio.get_running_loop())
    counter.active += 1
    try:
        submit(job)
        while True:
            item = await job.queue.get()
            while not job.queue.empty() and _continues(item):
                item = _merge(item, job.queue.get_nowait())
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        job.cancelled.set()
        outbox.forget(job)
        counter.active -= 1


def _merge(first: GenerationChunk, second: Emitted) -> Emitted:
    if isinstance(second, BaseException):
        return second
    logprobs = None
    if first.logprobs is not None or second.logprobs is not None:
        logprobs = [*(first.logprobs or ()), *(second.logprobs or ())]
    return GenerationChunk(first.text + second.text, second.completion_tokens, second.finish_reason, logprobs)
