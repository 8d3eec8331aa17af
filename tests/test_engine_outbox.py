"""The engines' outbox: what the worker emits reaches the event loop in few wake-ups, and ends at once."""

from __future__ import annotations

import time
from typing import Any

from deployments.chat_engine.jobs import Job, Outbox
from serve_app.protocol.engine import GenerateRequest, GenerationChunk, SamplingParams

INTERVAL_S = 0.5


class RecordingLoop:
    """Stands in for the replica's event loop: each call is one wake-up of its thread, recorded with what it
    carries as (request id, text, finish reason)."""

    def __init__(self) -> None:
        self.wakeups: list[list[tuple[str, str, str | None]]] = []

    def call_soon_threadsafe(self, _deliver: Any, deliveries: list[tuple[Job, GenerationChunk]]) -> None:
        self.wakeups.append([(job.request.request_id, c.text, c.finish_reason) for job, c in deliveries])


def _jobs(outbox: Outbox, loop: RecordingLoop, *names: str) -> list[Job]:
    return [Job(GenerateRequest(n, [1], SamplingParams(max_tokens=8)), outbox, loop) for n in names]  # type: ignore[arg-type]


def test_streams_share_the_ticks_after_their_first_increments() -> None:
    outbox, loop = Outbox(INTERVAL_S), RecordingLoop()
    a, b = _jobs(outbox, loop, "a", "b")
    a.emit(GenerationChunk("a1", 1))
    outbox.flush()
    b.emit(GenerationChunk("b1", 1))  # joins between two ticks: its first increment goes at once all the same
    outbox.flush()
    a.emit(GenerationChunk("a2", 2))
    b.emit(GenerationChunk("b2", 2))
    outbox.flush()
    a.emit(GenerationChunk("a3", 3))
    outbox.flush()
    assert loop.wakeups == [[("a", "a1", None)], [("b", "b1", None)]]
    time.sleep(INTERVAL_S)
    outbox.flush()  # the tick: both streams' held text, in one wake-up
    assert loop.wakeups[2:] == [[("a", "a2a3", None), ("b", "b2", None)]]


def test_an_end_is_not_held_for_the_tick() -> None:
    outbox, loop = Outbox(INTERVAL_S), RecordingLoop()
    (a,) = _jobs(outbox, loop, "a")
    a.emit(GenerationChunk("a1", 1))
    outbox.flush()
    a.emit(GenerationChunk("a2", 2))
    outbox.flush()
    a.emit(GenerationChunk("a3", 3, "stop"))
    outbox.flush()
    assert loop.wakeups == [[("a", "a1", None)], [("a", "a2a3", "stop")]]
