"""Continuous batching: many conversations share each forward pass of one chat replica.

One worker thread owns the model. Each turn of its loop prefills at most `prefill_chunk_tokens` prompt tokens
(waves of short waiting prompts, one forward pass each with the prompts packed into rows (packing.py), or the
next chunk of a long one), then runs one decode step for every running sequence together, each at its own
position. So a joining prompt stalls the running streams by one chunk at most, however long it is, and new
streams start between steps. A sequence leaves the batch at the step it finishes, hits a stop string, or its
client goes away, and its slot is reused at once. Every per-token task (sampling, detokenization, stop strings)
runs here, off the event loop.

Failures stay with their request. A prefill wave is all-or-nothing: if anything fails before its sequences join
the batch (its pass, or any prompt's non-finite logits), its slots are freed and its requests retried one by one,
so the one that fails gets the error alone. A failure that belongs to one row of a step (its logits, its sampler,
its detokenization) ends that row only. A failed forward pass of a decode step fails the running sequences
(nothing tells which row broke it); several in a row, or any broken invariant between the batch and its KV
slots, mark the engine broken: it then refuses every request with 503 and its health check fails, so Serve
replaces the replica.

With `prefill_thread`, a second thread prefills instead (a CPU replica: its short waves on the worker's CPU, a
long prompt on every CPU, deployments/cpu_affinity.py): waves of short prompts into free KV slots above the
running ones, one wave after another without waiting for the worker to take the last, or a long prompt chunk
after chunk into the top slot, alone; it sends each prompt's first token itself, and the worker moves every wave
it finished into the batch at its next turn. Decode steps then stall for no prefill, and a new stream's first
token waits for no decode step. While the thread works on a long prompt, the worker also prefills, between its
steps as above, the prompts that have waited _HELP_AFTER_S: into the next running slots (a long one into the
staging slot), never into those the thread holds.

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

from deployments.chat_engine.decode_tally import DecodeTally
from deployments.chat_engine.jobs import Engine, Job
from deployments.chat_engine.packing import PackedPrefill
from deployments.chat_engine.sampling import Chosen, choose_tokens
from deployments.chat_engine.sequence import Sequence
from deployments.chat_engine.slot_cache import SlotKVCache
from deployments.cpu_affinity import PrefillCpus, pin_thread
from serve_app.errors import InvalidRequest

if TYPE_CHECKING:
    from serve_app.metrics import ChatMetrics

logger = logging.getLogger("ray.serve")

# A prefill thread's waves: prompts a pass takes together, at most this many tokens unless one is longer. Its
# first tokens come when the whole pass is done, and a pass costs about its tokens, so small waves send most first
# tokens sooner (bench/chat.py --concurrency 16 at the default 4 rounds, one run each: TTFT p50 60 ms vs 101 ms
# with waves of up to 512 tokens).
_PREFILL_THREAD_WAVE_TOKENS = 128
# While the prefill thread works on a long prompt (a wave of more than _PREFILL_THREAD_WAVE_TOKENS), the worker also
# prefills the prompts that have waited this long, between its decode steps. With 1,000-token prompts the thread
# alone took them one by one (bench/chat.py --only glm --concurrency 16 --prompt-tokens 1000, two runs each: TTFT
# p50 433 / 494 ms vs 777 / 1032, p99 897 / 900 vs 1501 / 1695; 50 ms gave 518 / 467 and 1007 / 997). Short prompts
# are left to the thread: its passes are short, and the worker's would stall every stream's next token for them
# (at 80 tokens, helping raised the TTFT p50 from 71-86 ms to 104-147).
_HELP_AFTER_S = 0.1

# Decode steps failing one after another: past this, the model (or the engine) is broken, not one request.
_MAX_FAILED_STEPS = 3


class ContinuousBatchingEngine(Engine):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        end_token_ids: list[int],
        max_num_seqs: int,
        max_model_len: int,
        prefill_chunk_tokens: int = 2048,
        prefill_thread: bool = False,
        prefill_cpus: PrefillCpus | None = None,
        **options: Any,
    ) -> None:
        """`options`: the `Engine` keyword arguments (stream interval, metrics, queue deadline, defaults).
        `prefill_cpus`: where the prefill thread runs its short waves and its long prompts (None: where the thread
        that builds the engine may)."""
        super().__init__(model, tokenizer, end_token_ids, **options)
        self._max_model_len = max_model_len
        self._chunk_tokens = prefill_chunk_tokens
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
        self._running: list[Sequence] = []  # row i uses KV slot i
        # A prompt longer than a chunk, being prefilled into the staging slot: its sequence and tokens done.
        self._staged: tuple[Sequence, int] | None = None
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self._failed_steps = 0  # decode steps failed in a row
        self._break_requested = False  # fault injection (break_for_tests)
        self._reported_sequences = (-1, -1)  # (running, waiting) last sent to the metrics
        self._tally = DecodeTally()
        # The prefill thread's slots: those of the wave it works on and of the waves it finished, until the worker
        # moves them into the batch (_release_thread_slots says where they lie).
        self._prefill_front = self._cache.prefill_front()
        self._thread_taken = 0
        self._thread_end = 0  # above the highest slot of its short waves while it holds any
        self._thread_long = False  # whether what it holds is a long prompt (in the top slot)
        # Slots the worker took for its own prefill (a wave in its pass, or its staged prompt): with a prefill
        # thread, each takes prompts only while slots are free beside what the other holds.
        self._worker_taken = 0
        self._prefilled: list[tuple[Sequence, int]] = []  # (sequence, the slot its prompt was prefilled into)
        self._prefill_wakeup = threading.Event()
        self._prefill_cpus = prefill_cpus
        self._prefill_placed: set[int] | None = None  # where the prefill thread is pinned now
        self._prefill_thread: threading.Thread | None = None
        if prefill_thread:
            self._prefill_thread = threading.Thread(target=self._prefill_loop, name="prefill", daemon=True)
        self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
        self._thread.start()
        if self._prefill_thread is not None:
            self._prefill_thread.start()
        logger.info(
            "continuous batching: %d slots x %d tokens, KV cache %.1f MiB",
            max_num_seqs,
            max_model_len,
            self._cache.nbytes / 2**20,
        )

    @property
    def running_sequences(self) -> int:
        return len(self._running)

    @property
    def decode_tally(self) -> DecodeTally:
        return self._tally

    @property
    def waiting_sequences(self) -> int:
        return len(self._waiting) + (self._staged is not None) + self._thread_taken

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
        (self._wakeup if self._prefill_thread is None else self._prefill_wakeup).set()

    def check_alive(self) -> None:
        super().check_alive()
        # An error outside the guarded steps ends the loop: every request would then wait forever.
        if not self._closed and not self._thread.is_alive():
            raise RuntimeError("the continuous-batching loop thread has died")
        if not self._closed and self._prefill_thread is not None and not self._prefill_thread.is_alive():
            raise RuntimeError("the prefill thread has died")

    def break_for_tests(self) -> None:
        self._break_requested = True  # applied by the worker at its next turn: it alone touches the cache
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._prefill_wakeup.set()
        self._thread.join(timeout=10)
        if self._prefill_thread is not None:
            self._prefill_thread.join(timeout=10)

    # The worker thread from here on.

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                try:
                    self._turn()
                except Exception as exc:  # a bug of ours: say so, stop serving, let Serve replace the replica
                    logger.exception("continuous-batching loop failed")
                    self._break(f"its loop failed: {exc!r}")
                finally:
                    self._outbox.flush()

    def _turn(self) -> None:
        if self._break_requested:
            self._break_requested = False
            self._cache.add_sequence()  # a slot that no row owns
        if self.broken is not None:
            self._refuse_all()
            self._idle()
            return
        self._drop_cancelled()
        self._refuse_late()
        # The running sequences' previous token came at the end of the last step: the prefill of those joining
        # now stalls them, so it counts in their inter-token latency. Joiners' previous token comes at the end of
        # their prefill.
        turn_started = time.perf_counter()
        step_started = turn_started if self._running else 0.0
        self._admit()
        self._outbox.flush()  # the joiners' first tokens: before the decode step, not after it
        self._check_invariants()
        if self._metrics is not None:
            self._report_sequences(self._metrics)
        if not self._running:
            if not self._prefill_work():
                self._idle()
            else:
                self.queue_deadline.observe(time.perf_counter() - turn_started)  # a prefill chunk's turn
            return
        step_started = step_started or time.perf_counter()
        try:
            self._decode_step()
        except Exception as exc:
            logger.exception("decode step failed")
            self._failed_steps += 1
            self._fail_running(exc)
            if self._failed_steps >= _MAX_FAILED_STEPS:
                self._break(f"{self._failed_steps} decode steps failed in a row (last: {exc!r})")
            return
        self._failed_steps = 0
        self._check_invariants()
        now = time.perf_counter()
        self.queue_deadline.observe(now - turn_started)
        if self._metrics is not None:
            self._metrics.inter_token(now - step_started)

    def _prefill_work(self) -> bool:
        """Whether the worker's next turn has prefill work: prompts to prefill, or with a prefill thread, prompts
        it prefilled to move into the batch, or a backlog to help it with."""
        if self._prefill_thread is not None:
            return bool(self._prefilled) or self._helps_prefill()
        return self._staged is not None or bool(self._waiting)

    def _helps_prefill(self) -> bool:
        """With a prefill thread: whether the worker prefills this turn too, stalling its decode step for it: while
        its staged prompt lasts, and while the thread works on a long prompt and some prompt has waited
        _HELP_AFTER_S."""
        if self._staged is not None:
            return True
        if not self._thread_on_long_wave():
            return False  # the thread is free, or soon will be
        with self._lock:
            if not self._waiting or not self._free_slots():
                return False  # nothing to help with, or no slot to help into (an idle worker would spin)
            return time.perf_counter() - self._waiting[0].queued_at > _HELP_AFTER_S

    def _thread_on_long_wave(self) -> bool:
        """Whether the prefill thread is busy with a prompt longer than its wave budget (the worker may help)."""
        return self._thread_long

    def _idle(self) -> None:
        """Wait for work (a job, a close); what the outbox holds goes out first. While the prefill thread is on a
        long wave, look again every _HELP_AFTER_S for prompts that have waited long enough to help with."""
        self._outbox.flush()
        self._wakeup.wait(_HELP_AFTER_S if self._thread_on_long_wave() else None)
        self._wakeup.clear()

    def _check_invariants(self) -> None:
        """Row i of the batch is KV slot i, and nothing that finished still holds a slot."""
        rows, slots = len(self._running), len(self._cache.lengths)
        if rows != slots or slots > self._cache.num_slots or any(s.done for s in self._running):
            self._break(f"its batch ({rows} rows) and its KV cache ({slots} slots in use) disagree")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            logger.error("the chat engine is broken and refuses every request until replaced: %s", reason)
            self.broken = reason
        self._refuse_all()

    def _refuse_all(self) -> None:
        refusal = self.unavailable()
        if self._staged is not None:
            self._staged[0].fail(refusal)
            self._staged = None
        with self._lock:
            prefilled, self._prefilled = self._prefilled, []
            self._release_thread_slots(len(prefilled))
        for sequence, _ in prefilled:
            if not sequence.done:
                sequence.fail(refusal)
        self._settle_worker_slots()
        for sequence in self._running:
            if not sequence.done:
                sequence.fail(refusal)
        self._running.clear()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(refusal)

    def _report_sequences(self, metrics: ChatMetrics) -> None:
        # Only on change: most steps change neither count, and a gauge update costs more than this comparison.
        counts = (len(self._running), len(self._waiting))
        if counts != self._reported_sequences:
            self._reported_sequences = counts
            metrics.sequences(*counts)

    def _admit(self) -> None:
        """Prefill before the next decode step, at most the chunk budget of prompt tokens: the next chunk of the
        staged prompt; else waves of waiting prompts (or the first chunk of a long one) while there are free
        slots. The prompts of a burst reach the engine one by one, so those that came during a wave's pass join
        in a further wave before the running sequences' next step, while the budget lasts. With a prefill
        thread: move the prompts it prefilled into the batch, and prefill only to help it with a backlog."""
        if self._prefill_thread is not None:
            self._join_prefilled()
            if not self._helps_prefill():
                return
        if self._staged is not None:
            return self._prefill_next_chunk()
        budget = self._chunk_tokens
        while True:
            used = self._admit_wave(budget)
            budget -= used
            if not used or budget <= 0 or not self._waiting or self._staged is not None:
                return  # the turn sends the last wave's first tokens
            self._outbox.flush()  # this wave's first tokens, before the next wave's pass

    def _admit_wave(self, budget: int) -> int:
        """One prefill forward pass of waiting prompts within `budget` tokens (a long prompt's first chunk only
        with the whole chunk budget); the prompt tokens it took."""
        with self._lock:
            if self._prefill_thread is not None and not self._thread_long:
                # The thread's short waves take the slots above the batch, where this prefill would write: it may
                # be writing there now, its long prompt just done.
                return 0
            # Beside a prefill thread, only the prompts it has left waiting: it takes the others soon enough.
            queued_before = None if self._prefill_thread is None else time.perf_counter() - _HELP_AFTER_S
            jobs, tokens = self._take_wave(
                budget,
                fresh=budget == self._chunk_tokens,
                free=self._free_slots(),
                queued_before=queued_before,
            )
            self._worker_taken = len(jobs)
        sequences = self._sequences(jobs)
        if len(sequences) == 1 and tokens > self._chunk_tokens:
            self._staged = (sequences[0], 0)
            self._prefill_next_chunk()
            return self._chunk_tokens
        if sequences:
            self._prefill_wave(sequences)
        self._settle_worker_slots()
        return tokens

    def _settle_worker_slots(self) -> None:
        """The worker's prefill is done (its sequences joined the batch or failed), but for its staged prompt."""
        with self._lock:
            self._worker_taken = int(self._staged is not None)

    def _free_slots(self) -> int:
        """Under the lock: the KV slots neither the batch, nor the prefill thread, nor the worker's own prefill
        holds."""
        return self._cache.num_slots - len(self._running) - self._thread_taken - self._worker_taken

    def _take_wave(
        self, budget: int, fresh: bool, free: int, queued_before: float | None = None
    ) -> tuple[list[Job], int]:
        """Under the lock: the waiting prompts of the next wave within `budget` tokens, at most `free` of them,
        and their tokens (with `queued_before`, only those that reached the engine before then). The first prompt
        goes whatever its length in a `fresh` pass (one that follows no other before the next decode step); a
        long one goes alone, in chunks."""
        jobs: list[Job] = []
        tokens = 0
        while self._waiting and len(jobs) < free:
            job = self._waiting[0]
            if queued_before is not None and job.queued_at >= queued_before:
                break
            length = len(job.request.prompt_token_ids)
            if tokens + length > budget and (jobs or not fresh):
                break  # joins a later wave
            self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            jobs.append(job)
            tokens += length
            if length > self._chunk_tokens:
                break  # a long prompt goes alone, in chunks
        return jobs, tokens

    def _refuse_late(self) -> None:
        """Refuse the jobs that waited past the queue deadline: the oldest are at the head of the queue."""
        now = time.time()
        with self._lock:
            while self._waiting:
                job = self._waiting[0]
                late = self.queue_deadline.refusal(job.request.received_at, now)
                if late is None and not job.cancelled.is_set():
                    return
                self._waiting.popleft()
                if late is not None:
                    job.emit(late)

    def _sequences(self, jobs: list[Job]) -> list[Sequence]:
        """The jobs' sequences; a request whose sampler cannot be built fails here, before any model work."""
        sequences = []
        for job in jobs:
            try:
                sequences.append(self.new_sequence(job, self._vocab_size))
            except Exception as exc:  # noqa: BLE001 - reported to that request alone
                logger.warning("request %s refused: %r", job.request.request_id, exc)
                job.emit(exc)
        return sequences

    def _prefill_next_chunk(self) -> None:
        """Prefill the staged prompt's next chunk; after its last, it joins the batch with its first token."""
        assert self._staged is not None
        sequence, done = self._staged
        prompt = sequence.job.request.prompt_token_ids
        if sequence.job.cancelled.is_set():
            self._staged = None
            self._settle_worker_slots()
            return
        length = min(self._chunk_tokens, len(prompt) - done)
        try:
            logits = self._prefill_chunk(prompt, done, length)
            if done + length < len(prompt):
                self._staged = (sequence, done + length)
                return
            self._staged = None
            (choice,) = choose_tokens([sequence.sampler], logits)
            self._cache.commit_staged(len(prompt))
        except Exception as exc:
            logger.exception("chunked prefill failed")
            self._staged = None
            sequence.fail(exc)
        else:
            self._running.append(sequence)
            self._accept(sequence, choice)
            self._release_done()
        self._settle_worker_slots()

    def _prefill_chunk(
        self,
        prompt: list[int],
        start: int,
        length: int,
        cache: SlotKVCache | None = None,
        slot: int | None = None,
    ) -> torch.Tensor:
        """One forward pass over prompt[start:start+length] in `slot` (default: the staging slot); the last
        position's logits."""
        cache = cache or self._cache
        device = self._model.device
        input_ids = torch.tensor([prompt[start : start + length]], dtype=torch.long, device=device)
        positions = torch.arange(start, start + length, device=device)
        keys = torch.arange(start + length, device=device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, query, key]: causal over all chunks
        cache.prepare_chunk(start, length, slot)
        hidden = self._decoder(
            input_ids=input_ids,
            position_ids=positions[None, :],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        cache.finish_step()
        return self._lm_head(hidden[:, -1]).float()

    def _prefill_wave(self, sequences: list[Sequence]) -> None:
        try:
            chosen = self._prefill(sequences)
        except Exception as exc:
            if len(sequences) > 1:  # nothing of the wave was kept: retry alone, so a bad prompt fails alone
                for sequence in sequences:
                    self._prefill_wave([sequence])
            else:
                logger.exception("prefill failed")
                sequences[0].fail(exc)
            return
        for sequence, choice in zip(sequences, chosen, strict=True):  # committed: these now hold slots
            self._running.append(sequence)
            self._accept(sequence, choice)
        self._release_done()

    def _prefill(self, sequences: list[Sequence]) -> list[Chosen]:
        """One forward pass over the new prompts and their first choices; on failure, the KV cache is as before."""
        slots = [self._cache.add_sequence() for _ in sequences]
        try:
            return self._first_choices(sequences, slots, self._cache)
        except BaseException:
            for slot in reversed(slots):  # the newest slots: nothing moves
                self._cache.remove_sequence(slot)
            raise

    def _first_choices(self, sequences: list[Sequence], slots: list[int], cache: SlotKVCache) -> list[Chosen]:
        logits = self._prefill_slots([s.job for s in sequences], slots, cache)
        if len(sequences) > 1 and not bool(torch.isfinite(logits).all()):
            # Prompts packed into one row share its attention: one prompt's non-finite states make its
            # neighbours' logits non-finite too. Alone, each gets its own (before sampling, which would draw from
            # seeded generators).
            raise FloatingPointError("a prefill pass gave non-finite logits")
        return choose_tokens([s.sampler for s in sequences], logits)

    def _prefill_slots(self, jobs: list[Job], slots: list[int], cache: SlotKVCache) -> torch.Tensor:
        """One forward pass over the new prompts, packed into rows; returns each one's next-token logits ([rows,
        vocab] float32)."""
        device = self._model.device
        packed = PackedPrefill([job.request.prompt_token_ids for job in jobs], slots)
        position_ids, mask = packed.positions_and_mask(device)
        cache.prepare_prefill(packed.segments)
        hidden = self._decoder(
            input_ids=torch.tensor(packed.tokens, dtype=torch.long, device=device),
            position_ids=position_ids,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        cache.finish_step()
        return self._lm_head(hidden[packed.last_positions(device)]).float()

    # The prefill thread (prefill_thread=True) from here on, and the worker's side of its hand-over.

    def _prefill_loop(self) -> None:
        # Placed before each wave (_place_prefill_thread), at the replica's own priority. At niceness +10 (set while
        # it was confined to the CPUs the pin left, to leave the serving path its CPU) it prefilled later on the
        # engine's CPU, and streams joined the batch later (bench/chat.py --only engine --only glm --concurrency 16,
        # six alternating pairs: 2543 vs 2430 tokens/s on the mean, 13.6-13.8 vs 12.9-13.2 sequences per step, 0.84
        # vs 0.79 of the engine alone; 1,000-token prompts the same).
        with torch.inference_mode():
            while not self._closed:
                try:
                    prefilled = self._prefill_next_wave()
                except Exception as exc:  # a bug of ours: say so, stop serving, let Serve replace the replica
                    logger.exception("prefill thread failed")
                    self.broken = self.broken or f"its prefill thread failed: {exc!r}"
                    self._wakeup.set()  # the worker refuses every request
                    prefilled = False
                if not prefilled:
                    self._prefill_wakeup.wait()
                    self._prefill_wakeup.clear()

    def _prefill_next_wave(self) -> bool:
        """Prefill the next wave of waiting prompts (a long prompt chunk after chunk), send their first tokens,
        and hand them to the worker. False when there is none to take now: nothing waits, no slot is free, or the
        worker has yet to take a long prompt, or the waves before a long one."""
        with self._lock:
            if self.broken is not None or self._thread_long:
                return False
            held = self._thread_taken
            # Beside waves the worker has yet to take, only a short one. A long one goes alone, into the top slot:
            # the worker may help beside it, into the slots above the batch, only while they hold nothing else.
            base = max(len(self._running) + self._worker_taken + held, self._thread_end)
            budget = min(_PREFILL_THREAD_WAVE_TOKENS, self._chunk_tokens)
            jobs, tokens = self._take_wave(budget, fresh=not held, free=self._cache.num_slots - base)
            if not jobs:
                return False
            long = tokens > _PREFILL_THREAD_WAVE_TOKENS
            self._thread_taken += len(jobs)
            self._thread_long = long
            if not long:
                self._thread_end = base + len(jobs)
        if long:
            self._wakeup.set()  # an idle worker watches for prompts to help with meanwhile
        self._place_prefill_thread(long)
        sequences = self._sequences(jobs)
        if long:
            # The top slot: the worker's own prefill goes into the next running ones meanwhile.
            slots = [self._cache.num_slots - 1]
        else:
            slots = list(range(base, base + len(sequences)))
        if len(sequences) == 1 and tokens > self._chunk_tokens:
            prefilled = self._prefill_long(sequences[0], slots[0])
        else:
            prefilled = self._prefill_above(sequences, slots)
        self._outbox.flush()  # the first tokens, now: not after the worker's next step
        kept = [(s, slot) for s, slot in prefilled if not s.done]
        with self._lock:
            self._prefilled += kept
            self._release_thread_slots(len(jobs) - len(kept))
        self._wakeup.set()
        return True

    def _place_prefill_thread(self, long: bool) -> None:
        """Pin the prefill thread where its next wave runs (deployments/cpu_affinity.py cpus_for_prefill)."""
        if self._prefill_cpus is None:
            return
        cpus = self._prefill_cpus.long_prompts if long else self._prefill_cpus.short_waves
        if cpus != self._prefill_placed:
            pin_thread(cpus)
            self._prefill_placed = cpus

    def _release_thread_slots(self, count: int) -> None:
        """Under the lock: the prefill thread no longer holds `count` of its slots (moved into the batch, or their
        prompts failed, finished or were refused).

        Its short waves take slots upwards from above the batch, the worker's own prefill and its earlier
        waves, until it holds none: the worker moves the finished ones into its next running slots, in
        ascending order (SlotKVCache.commit), so each lands at or below where it was, and below every slot the
        thread may be writing meanwhile."""
        self._thread_taken -= count
        if not self._thread_taken:
            self._thread_end, self._thread_long = 0, False

    def _prefill_above(self, sequences: list[Sequence], slots: list[int]) -> list[tuple[Sequence, int]]:
        """Prefill a wave into `slots`, free ones above the running ones, in ascending order."""
        try:
            chosen = self._first_choices(sequences, slots, self._prefill_front)
        except Exception as exc:
            if len(sequences) == 1:
                logger.exception("prefill failed")
                sequences[0].fail(exc)
                return []
            # Nothing of the wave was kept: retry alone, each into its own slot, so a bad prompt fails alone.
            return [p for s, slot in zip(sequences, slots) for p in self._prefill_above([s], [slot])]
        for sequence, choice in zip(sequences, chosen, strict=True):
            self._accept(sequence, choice)
        return list(zip(sequences, slots))

    def _prefill_long(self, sequence: Sequence, slot: int) -> list[tuple[Sequence, int]]:
        prompt = sequence.job.request.prompt_token_ids
        try:
            for start in range(0, len(prompt), self._chunk_tokens):
                if sequence.job.cancelled.is_set():
                    return []
                length = min(self._chunk_tokens, len(prompt) - start)
                logits = self._prefill_chunk(prompt, start, length, self._prefill_front, slot)
            (choice,) = choose_tokens([sequence.sampler], logits)
        except Exception as exc:
            logger.exception("chunked prefill failed")
            sequence.fail(exc)
            return []
        self._accept(sequence, choice)
        return [(sequence, slot)]

    def _join_prefilled(self) -> None:
        """The worker: move the waves the prefill thread finished into the batch, lowest slot first, each into the
        lowest free slot, so none is overwritten before it is moved."""
        with self._lock:
            prefilled, self._prefilled = self._prefilled, []
        if not prefilled:
            return
        for sequence, slot in sorted(prefilled, key=lambda prefill: prefill[1]):
            if not sequence.done and not sequence.job.cancelled.is_set():
                self._cache.commit(slot, len(sequence.job.request.prompt_token_ids))
                self._running.append(sequence)
        with self._lock:
            self._release_thread_slots(len(prefilled))
        self._prefill_wakeup.set()

    def _decode_step(self) -> None:
        device = self._model.device
        positions = self._cache.prepare_decode()
        input_ids = torch.tensor([[s.last_token] for s in self._running], device=device)
        mask = self._cache.decode_mask()
        with self._tally.forward(len(self._running)):
            out = self._model(
                input_ids=input_ids,
                position_ids=positions[:, None],
                attention_mask=mask,
                cache=self._cache,
                use_cache=True,
            )
        self._cache.finish_step()
        chosen = choose_tokens([s.sampler for s in self._running], out.logits[:, -1, :].float())
        for sequence, choice in zip(self._running, chosen, strict=True):
            self._accept(sequence, choice)
        self._release_done()

    def _accept(self, sequence: Sequence, choice: Chosen) -> None:
        """Hand a row its token; whatever fails here (its choice, its detokenization) ends that row alone."""
        try:
            if isinstance(choice, BaseException):
                raise choice
            sequence.accept(choice)
        except Exception as exc:  # noqa: BLE001 - told to that request's client
            logger.warning("sequence %s failed: %r", sequence.job.request.request_id, exc)
            sequence.fail(exc)

    def _release_done(self) -> None:
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
        if self._prefill_thread is not None:
            self._prefill_wakeup.set()  # a free slot: a prompt may be waiting for one

    def _fail_running(self, exc: BaseException) -> None:
        for sequence in self._running:
            sequence.fail(exc)
        while self._running:
            self._release(len(self._running) - 1)
