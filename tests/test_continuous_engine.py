"""The continuous-batching engine in-process, held to transformers' own `generate` on the tiny GLM."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import pytest

from deployments.chat_engine.continuous import ContinuousBatchingEngine
from deployments.chat_engine.packing import pack_rows
from deployments.chat_engine.sequential import SequentialEngine
from deployments.cpu_affinity import PrefillCpus
from deployments.queue_deadline import QueueDeadline
from serve_app.errors import ServiceUnavailable, overloaded
from serve_app.protocol.engine import GenerateRequest, SamplingParams
from tests.engine_harness import Outcome, collect, generate_text, prompt_ids, request, run


@pytest.fixture(scope="module")
def engines(parts: tuple[Any, Any, list[int]]) -> Any:
    model, tokenizer, ends = parts
    continuous = ContinuousBatchingEngine(model, tokenizer, ends, max_num_seqs=6, max_model_len=2048)
    yield continuous, SequentialEngine(model, tokenizer, ends)
    continuous.close()


def test_batched_greedy_equals_generate_one_at_a_time(engines: Any, parts: Any) -> None:
    """The CI check that the engine drives this transformers release right: token for token its own generate."""
    continuous, sequential = engines
    model, tokenizer, ends = parts
    requests = [request(tokenizer, i) for i in range(10)]  # more than the 6 slots: some wait, then join
    expected = [generate_text(model, tokenizer, ends, r) for r in requests]
    assert run(continuous, requests) == expected
    assert [run(sequential, [r])[0] for r in requests] == expected
    assert continuous.open_streams == 0 and continuous.running_sequences == 0


def test_seeded_sample_does_not_depend_on_its_batch(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    tokenizer = parts[1]
    seeded = request(tokenizer, 0, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    alone = run(continuous, [seeded])[0]
    crowded = run(continuous, [seeded] + [request(tokenizer, i, temperature=1.0) for i in range(1, 6)])[0]
    assert alone == crowded
    other_seed = run(continuous, [request(tokenizer, 0, temperature=0.9, top_p=0.9, top_k=40, seed=12)])[0]
    assert other_seed != alone


def test_repetition_penalty_matches_transformers(engines: Any, parts: Any) -> None:
    continuous, sequential = engines
    model, tokenizer, ends = parts
    penalized = request(tokenizer, 3, repetition_penalty=1.3)
    expected = generate_text(model, tokenizer, ends, penalized, repetition_penalty=1.3)
    assert run(continuous, [penalized]) == run(sequential, [penalized]) == [expected]
    assert run(continuous, [penalized]) != run(continuous, [request(tokenizer, 3)])


def test_stop_string_is_not_returned(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    text = run(continuous, [request(parts[1], 2)])[0][0]
    stop = text[8:11]
    stopped = run(continuous, [request(parts[1], 2, stop=(stop,))])[0]
    assert stopped[0] == text[: text.index(stop)] and stopped[2] == "stop"


def test_a_failing_prefill_fails_only_its_request(engines: Any, parts: Any) -> None:
    continuous, _ = engines
    tokenizer = parts[1]
    broken = GenerateRequest(
        "bad", [10**6], SamplingParams(max_tokens=4, temperature=0.0)
    )  # id past the vocab
    good = request(tokenizer, 1)

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(
                collect(continuous, broken), collect(continuous, good), return_exceptions=True
            )
        )

    failed, served = asyncio.run(both())
    assert isinstance(failed, (IndexError, RuntimeError))
    assert served == run(continuous, [good])[0]


@pytest.mark.parametrize("kind", ["continuous", "sequential"])
def test_a_request_that_waits_past_the_queue_deadline_is_refused_and_the_running_one_is_not(
    parts: tuple[Any, Any, list[int]], kind: str
) -> None:
    model, tokenizer, _ = parts
    # One step's time, at least 50 ms: the holder's steps are timed before the queued request is looked at.
    deadline = QueueDeadline(batches=1, min_wait_s=0.05, retry_after_s=2)
    # No end tokens: the holder keeps the one slot for all its 1000 steps, whatever the random weights say.
    if kind == "continuous":
        engine: Any = ContinuousBatchingEngine(
            model, tokenizer, [], max_num_seqs=1, max_model_len=2048, queue_deadline=deadline
        )
    else:
        engine = SequentialEngine(model, tokenizer, [], queue_deadline=deadline)
    holder = GenerateRequest(
        "holder", prompt_ids(tokenizer, 0), SamplingParams(max_tokens=1000, temperature=0.0)
    )

    async def hold_then_queue() -> tuple[Outcome, BaseException]:
        held = asyncio.create_task(collect(engine, holder))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable) as refused:
            await collect(engine, request(tokenizer, 1))
        return await held, refused.value

    try:
        (_, tokens, finish), refusal = asyncio.run(hold_then_queue())
    finally:
        engine.close()
    assert (tokens, finish) == (1000, "length")
    assert (refusal.status_code, refusal.code, refusal.headers) == (503, "overloaded", {"Retry-After": "2"})
    assert engine.queue_deadline is deadline and 0 < deadline.batch_s < 1  # type: ignore[operator]
    assert engine.open_streams == 0


def test_a_refusal_keeps_its_retry_after_when_ray_carries_it_to_the_ingress() -> None:
    import pickle

    from ray.exceptions import RayTaskError

    carried = pickle.loads(pickle.dumps(overloaded(3)))
    as_raised = RayTaskError("generate", "traceback", carried).as_instanceof_cause()
    assert isinstance(as_raised, ServiceUnavailable)
    assert (as_raised.status_code, as_raised.code, as_raised.headers) == (
        503,
        "overloaded",
        {"Retry-After": "3"},
    )


@pytest.mark.parametrize(
    ("prefill_thread", "chunk_tokens"),
    [(False, 16), (True, 16), (True, 2048)],
    ids=["worker", "thread", "thread-whole"],
)
def test_prompts_prefilled_in_chunks_or_on_a_prefill_thread_equal_generate(
    parts: Any, prefill_thread: bool, chunk_tokens: int
) -> None:
    """More requests than slots, so some wait and join while others decode. Chunks of 16 tokens: most of these
    prompts (~15-120 tokens) are prefilled over several passes, into the staging slot, between decode steps (the
    worker) or beside them (a prefill thread, which writes short ones into free slots above the running ones and
    hands them over); short ones still go in waves. One request ends with its first token and never joins."""
    model, tokenizer, ends = parts
    engine = ContinuousBatchingEngine(
        model,
        tokenizer,
        ends,
        max_num_seqs=4,
        max_model_len=512,
        prefill_chunk_tokens=chunk_tokens,
        prefill_thread=prefill_thread,
    )
    try:
        requests = [request(tokenizer, i) for i in (0, 7, 1, 9, 3, 5, 6, 8)]
        requests.append(request(tokenizer, 2, max_tokens=1))
        assert max(len(r.prompt_token_ids) for r in requests) > 3 * 16
        assert run(engine, requests) == [generate_text(model, tokenizer, ends, r) for r in requests]
        assert engine.running_sequences == 0 and engine.waiting_sequences == 0
    finally:
        engine.close()


class _SlowPrefillThread(ContinuousBatchingEngine):
    """A prefill thread whose every pass takes 0.3 s longer, so prompts wait behind it past the time after which
    the worker helps it with them; records which thread took each prompt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.takers: list[str] = []
        self.turns = 0  # the worker's
        super().__init__(*args, prefill_thread=True, **kwargs)

    def _turn(self) -> None:
        self.turns += 1
        super()._turn()

    def _sequences(self, jobs: list[Any]) -> list[Any]:
        self.takers += [threading.current_thread().name] * len(jobs)
        return super()._sequences(jobs)

    # The sleep after the pass: its prompts' keys and values are in their slots all that time.
    def _prefill_above(self, *args: Any) -> Any:
        prefilled = super()._prefill_above(*args)
        time.sleep(0.3)
        return prefilled

    def _prefill_long(self, *args: Any) -> Any:
        prefilled = super()._prefill_long(*args)
        time.sleep(0.3)
        return prefilled


@pytest.mark.parametrize("chunk_tokens", [16, 2048], ids=["chunks", "whole"])
def test_the_worker_prefills_the_prompts_a_busy_prefill_thread_leaves_waiting(
    parts: Any, chunk_tokens: int
) -> None:
    """Both threads prefill at once: the prefill thread into the top free slots, the worker (while the thread
    works on a long prompt and another has waited) into the next running ones, or a long prompt into the staging
    slot; neither may write over the other's prompts, so each request still gets what `generate` gives."""
    model, tokenizer, ends = parts
    engine = _SlowPrefillThread(
        model, tokenizer, ends, max_num_seqs=4, max_model_len=512, prefill_chunk_tokens=chunk_tokens
    )
    try:
        # The thread's first pass is a long prompt (over its wave budget): the worker helps only then.
        requests = [request(tokenizer, i) for i in (15, 0, 12, 7, 1, 14, 3, 10)]
        assert len(requests[0].prompt_token_ids) > 128
        assert run(engine, requests) == [generate_text(model, tokenizer, ends, r) for r in requests]
        assert set(engine.takers) == {"prefill", "continuous-batching"}, engine.takers
        assert engine.running_sequences == 0 and engine.waiting_sequences == 0
    finally:
        engine.close()


def test_a_worker_with_no_slot_to_help_into_waits_instead_of_spinning(parts: Any) -> None:
    """One slot, held by the prefill thread's long prompt for 0.3 s after its pass, while another prompt waits
    past the time after which the worker would help: there is nowhere to help into, so the worker waits."""
    model, tokenizer, ends = parts
    engine = _SlowPrefillThread(model, tokenizer, ends, max_num_seqs=1, max_model_len=512)
    try:
        requests = [request(tokenizer, i, max_tokens=4) for i in (15, 0)]
        assert run(engine, requests) == [generate_text(model, tokenizer, ends, r) for r in requests]
        assert engine.takers == ["prefill", "prefill"]
        # A few timed looks while it waits, and the decode steps; a spinning worker turns thousands of times.
        assert engine.turns < 100, engine.turns
    finally:
        engine.close()


class _SlowFirstPass(ContinuousBatchingEngine):
    """Records its prefill waves and decode steps. Its first wave's pass lasts until another prompt is waiting:
    that prompt arrived during the pass, as the prompts of a burst do (the ingress sends them one by one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.events: list[tuple[str, int]] = []
        self.in_first_pass = threading.Event()
        super().__init__(*args, **kwargs)

    def _prefill_wave(self, sequences: list[Any]) -> None:
        if not self.events:
            self.in_first_pass.set()
            give_up = time.monotonic() + 30
            while not self._waiting and time.monotonic() < give_up:
                time.sleep(0.001)
        self.events.append(("wave", len(sequences)))
        super()._prefill_wave(sequences)

    def _decode_step(self) -> None:
        self.events.append(("decode", len(self._running)))
        super()._decode_step()


def test_a_prompt_that_arrives_during_a_prefill_pass_joins_before_the_next_decode_step(parts: Any) -> None:
    model, tokenizer, ends = parts
    engine = _SlowFirstPass(model, tokenizer, ends, max_num_seqs=4, max_model_len=512)
    first, second = request(tokenizer, 0), request(tokenizer, 1)

    async def second_during_first_pass() -> list[Outcome]:
        started = asyncio.create_task(collect(engine, first))
        while not engine.in_first_pass.is_set():
            await asyncio.sleep(0.001)
        joining = asyncio.create_task(collect(engine, second))
        return [await started, await joining]

    try:
        outcomes = asyncio.run(second_during_first_pass())
    finally:
        engine.close()
    # The running sequence's next step waits for the newcomer's prefill (within the chunk budget): both then
    # decode together, instead of one step more for the first and one wave later for the second.
    assert engine.events[:3] == [("wave", 1), ("wave", 1), ("decode", 2)], engine.events[:6]
    assert outcomes == [generate_text(model, tokenizer, ends, r) for r in (first, second)]


def test_a_prefill_row_holds_as_many_prompts_as_fit_beside_the_longest() -> None:
    lengths = [10, 3, 7, 2, 9, 1]
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    assert rows == [[0], [4, 5], [2, 1], [3]]  # first fit, longest first: 4 rows of 10 instead of 6


class _OneWave(ContinuousBatchingEngine):
    """Prefills nothing until `wave` prompts are waiting, so they share one pass; records each pass's prompts."""

    def __init__(self, *args: Any, wave: int, **kwargs: Any) -> None:
        self.wave = wave
        self.passes: list[list[int]] = []  # the prompts' lengths
        super().__init__(*args, **kwargs)

    def _admit(self) -> None:
        give_up = time.monotonic() + 30
        while not self.passes and len(self._waiting) < self.wave and time.monotonic() < give_up:
            time.sleep(0.001)
        super()._admit()

    def _prefill_slots(self, jobs: list[Any], slots: list[int], cache: Any) -> Any:
        self.passes.append([len(job.request.prompt_token_ids) for job in jobs])
        return super()._prefill_slots(jobs, slots, cache)


def test_prompts_that_share_a_row_of_a_prefill_pass_each_see_only_themselves(parts: Any) -> None:
    model, tokenizer, ends = parts
    requests = [request(tokenizer, i) for i in (9, 0, 1, 4, 2)]
    engine = _OneWave(model, tokenizer, ends, max_num_seqs=5, max_model_len=512, wave=len(requests))
    try:
        outcomes = run(engine, requests)
    finally:
        engine.close()
    first = engine.passes[0]
    assert len(first) == len(requests) and len(pack_rows(first)) < len(first), engine.passes
    # A prompt that saw its row's neighbours, or counted its positions from theirs, would answer otherwise.
    assert outcomes == [generate_text(model, tokenizer, ends, r) for r in requests]


@pytest.mark.parametrize("engine_class", [ContinuousBatchingEngine, SequentialEngine])
def test_a_stream_gets_its_first_increment_at_once_then_one_message_per_interval(
    engine_class: Any, parts: Any
) -> None:
    """The engines' outbox: with an interval longer than the whole generation, a stream is sent two messages
    (its first increment, then the rest with its end), with the same text as one message per token."""
    model, tokenizer, ends = parts
    options = {"max_num_seqs": 2, "max_model_len": 512} if engine_class is ContinuousBatchingEngine else {}
    generate = request(tokenizer, 4, max_tokens=16)

    async def messages(engine: Any) -> list[Any]:
        return [chunk async for chunk in engine.stream(generate)]

    sent: dict[float, list[Any]] = {}
    for interval_s in (0.0, 60.0):
        engine = engine_class(model, tokenizer, ends, stream_interval_s=interval_s, **options)
        try:
            sent[interval_s] = asyncio.run(messages(engine))
        finally:
            engine.close()
    per_token, per_interval = sent[0.0], sent[60.0]
    assert len(per_token) > 8 and len(per_interval) == 2
    assert "".join(c.text for c in per_interval) == "".join(c.text for c in per_token)
    assert per_interval[0] == per_token[0]  # the first increment is not held back
    assert per_interval[-1].finish_reason == per_token[-1].finish_reason is not None


class _WaveOfThree(ContinuousBatchingEngine):
    """A prefill thread that takes its first wave only once three prompts wait; records each pass's prompt count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.waves: list[int] = []
        super().__init__(*args, prefill_thread=True, **kwargs)

    def _prefill_next_wave(self) -> bool:
        give_up = time.monotonic() + 30
        while not self.waves and len(self._waiting) < 3 and time.monotonic() < give_up:
            time.sleep(0.001)
        return super()._prefill_next_wave()

    def _first_choices(self, sequences: list[Any], slots: list[int], cache: Any) -> Any:
        self.waves.append(len(sequences))
        return super()._first_choices(sequences, slots, cache)


def test_a_failing_prefill_on_the_prefill_thread_fails_only_its_request(parts: Any) -> None:
    model, tokenizer, ends = parts
    engine = _WaveOfThree(model, tokenizer, ends, max_num_seqs=4, max_model_len=512)
    # An id past the vocabulary fails the pass of its whole wave: the wave's prompts are prefilled again alone,
    # each into its own slot.
    broken = GenerateRequest("bad", [10**6], SamplingParams(max_tokens=4, temperature=0.0))
    good = [request(tokenizer, i) for i in (1, 2)]
    try:
        failed, *served = run(engine, [broken, *good], return_exceptions=True)
        assert isinstance(failed, (IndexError, RuntimeError))
        assert served == [generate_text(model, tokenizer, ends, r) for r in good]
        assert engine.waves[0] == 3, engine.waves  # the three shared the failed pass
        engine.check_alive()
    finally:
        engine.close()


class _LateHandOver(ContinuousBatchingEngine):
    """A worker that takes the prefill thread's finished waves only once two wait (or 0.3 s has passed), so the
    thread prefills the next wave while the last waits for the worker; records how many prompts each hand-over
    moved into the batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handed_over: list[int] = []
        super().__init__(*args, prefill_thread=True, **kwargs)

    def _join_prefilled(self) -> None:
        give_up = time.monotonic() + 0.3
        while self._prefilled and len(self._prefilled) < 2 and time.monotonic() < give_up:
            time.sleep(0.001)
        if self._prefilled:
            self.handed_over.append(len(self._prefilled))
        super()._join_prefilled()


def test_the_prefill_thread_prefills_the_next_wave_while_the_last_waits_for_the_worker(parts: Any) -> None:
    """Waves of one prompt each (two of these do not fit in a wave's 128 tokens): the thread writes each into
    the slots above the waves the worker has yet to take, and the worker moves them down into the batch while
    the thread writes the next. One prompt ends with its first token (its slot stays a gap), one is over the
    wave budget (alone, in the top slot, once the waves before it are in the batch). Slots run out: later
    prompts reuse those the first ones left."""
    model, tokenizer, ends = parts
    engine = _LateHandOver(model, tokenizer, ends, max_num_seqs=5, max_model_len=512)
    try:
        requests = [request(tokenizer, i) for i in (8, 9, 10, 15, 11, 8)]
        requests.insert(2, request(tokenizer, 7, max_tokens=1))
        lengths = sorted(len(r.prompt_token_ids) for r in requests)
        assert lengths[0] + lengths[1] > 128 and lengths[-1] > 128, lengths
        assert run(engine, requests) == [generate_text(model, tokenizer, ends, r) for r in requests]
        assert max(engine.handed_over) >= 2, engine.handed_over
        assert engine.running_sequences == 0 and engine.waiting_sequences == 0
        engine.check_alive()
    finally:
        engine.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity on this OS")
def test_the_prefill_thread_runs_each_wave_on_its_cpus_at_the_replicas_priority(parts: Any) -> None:
    model, tokenizer, ends = parts
    before = os.sched_getaffinity(0)
    cpus = PrefillCpus(short_waves={min(before)}, long_prompts=set(before))
    engine = ContinuousBatchingEngine(
        model, tokenizer, ends, max_num_seqs=2, max_model_len=512, prefill_thread=True, prefill_cpus=cpus
    )

    def placed_after(generate: GenerateRequest) -> set[int]:
        """Where the thread is pinned once it has prefilled `generate` (it stays there until its next wave)."""
        run(engine, [generate])
        (thread,) = [t for t in threading.enumerate() if t.name == "prefill"]
        assert thread.native_id is not None
        # At the caller's priority, not below it: it shares the engine's CPU (continuous.py says why).
        if sys.platform.startswith("linux"):
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == os.getpriority(os.PRIO_PROCESS, 0)
        return os.sched_getaffinity(thread.native_id)

    try:
        long = request(tokenizer, 15, max_tokens=2)
        assert len(long.prompt_token_ids) > 128  # over the thread's wave budget
        assert placed_after(request(tokenizer, 0, max_tokens=2)) == cpus.short_waves
        assert placed_after(long) == cpus.long_prompts
        assert placed_after(request(tokenizer, 1, max_tokens=2)) == cpus.short_waves
        assert os.sched_getaffinity(0) == before  # the caller's own
    finally:
        engine.close()
