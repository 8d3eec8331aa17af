"""How long a request may wait inside a replica for its turn before it is refused instead of served late.

Serve bounds how many requests wait (max_ongoing_requests, max_queued_requests), not for how long. Under
overload the requests a replica admitted would otherwise wait behind each other for many seconds and hold the
server busy long after the load has gone; past the deadline a request is answered 503 + Retry-After, which the
ingress still sends as a status code because nothing of the answer has gone out yet.

The deadline is not a constant tuned on one machine: it is a number of batches (an embedding batch, a chat
engine step) times the time a batch takes on this replica, as it measures it. On a machine twice as slow, or
beside a busy neighbour, batches take twice as long and a request may wait twice as long: the load the server is
rated for (a number of clients, that is, of batches to wait behind) is served, never refused, on any machine;
what waits longer than that many batches is an overload. A floor (`min_wait_s`) keeps the deadline sane while the
measure is still young, e.g. when a burst makes an idle replica's quick steps slow.

An overload slows the batches too (on a small machine its HTTP work takes the model's CPU), and a deadline that
followed would let the overload's backlog wait ever longer: an embedding replica so measured under 10x load let
requests wait 40 s and refused the normal load after it (bench/overload.py). So a replica that knows its queue
says how deep it was (`queued_batches`), and a batch taken with more than half the deadline's batches waiting is
not learnt from: the pace is learnt at loads the replica is rated for, also on a slower or busier machine. And a
request that the work already waiting would carry past the deadline is refused on arrival (`batches_ahead`), in
milliseconds rather than after waiting out the deadline, so the backlog never holds more than the deadline's worth.

The wait counts from the request's arrival at the ingress, so it covers the queue in front of the replica too.
Wall-clock time, since the ingress and the replica may run on different machines (whose clocks NTP keeps
within milliseconds of each other; deadlines are seconds).
"""

from __future__ import annotations

import time

from serve_app.config import ChatModelConfig, EmbeddingModelConfig
from serve_app.errors import ServiceUnavailable, overloaded

# Weight of the newest batch in the running mean: it follows a change of pace within ~10 batches, and one odd
# batch (a garbage collection, a long prompt's chunk) moves it by a tenth.
_NEWEST_WEIGHT = 0.1


class QueueDeadline:
    """`batches` x the measured seconds per batch, at least `min_wait_s`; `batches=None`: no deadline.

    The replica reports each batch's duration (`observe`, from the one thread or loop that runs its batches;
    other threads only read); until the first one, nothing is refused: no request has waited behind a batch yet.
    """

    def __init__(
        self, batches: float | None = None, min_wait_s: float = 0.0, retry_after_s: float = 1.0
    ) -> None:
        self.batches = batches
        self.min_wait_s = min_wait_s
        self.retry_after_s = retry_after_s
        self._batch_s: float | None = None

    @classmethod
    def of(cls, model: ChatModelConfig | EmbeddingModelConfig) -> QueueDeadline:
        """A model's deadline, refused with the same Retry-After as its deployment's back-pressure."""
        retry_after_s = model.deployment.backpressure_config.retry_after_s
        if model.queue_deadline is None:
            return cls(retry_after_s=retry_after_s)
        return cls(model.queue_deadline.batches, model.queue_deadline.min_wait_s, retry_after_s)

    def observe(self, batch_s: float, queued_batches: float = 0.0) -> None:
        """One batch took `batch_s` seconds, with `queued_batches` batches' worth of work waiting when it began."""
        if self.batches is None:
            return
        if self._batch_s is not None and queued_batches > self.batches / 2:
            return  # an overload's pace (the first batch is learnt whatever the load: there is nothing else yet)
        previous = self._batch_s
        self._batch_s = batch_s if previous is None else previous + _NEWEST_WEIGHT * (batch_s - previous)

    @property
    def batch_s(self) -> float | None:
        """The measured seconds per batch (None before the first)."""
        return self._batch_s

    @property
    def max_wait_s(self) -> float | None:
        """How long a request may wait now; None: as long as it takes."""
        if self.batches is None or self._batch_s is None:
            return None
        return max(self.min_wait_s, self.batches * self._batch_s)

    def refusal(
        self, received_at: float, now: float | None = None, batches_ahead: float = 0.0
    ) -> ServiceUnavailable | None:
        """The error for a request received at `received_at` (time.time()) if it has waited too long, or, with
        `batches_ahead` of work in front of it, would have by its turn; else None. Refused on arrival, a request
        that could not be served in time costs its client milliseconds, not the deadline."""
        max_wait_s, batch_s = self.max_wait_s, self._batch_s
        if max_wait_s is None or batch_s is None:
            return None
        waited = (now if now is not None else time.time()) - received_at
        if waited + batches_ahead * batch_s <= max_wait_s:
            return None
        return overloaded(self.retry_after_s)

    def status(self) -> dict[str, float | None]:
        """For /health: how long a request may wait now and the batch time it comes from."""
        max_wait_s, batch_s = self.max_wait_s, self._batch_s
        return {
            "queue_deadline_s": None if max_wait_s is None else round(max_wait_s, 3),
            "batch_ms": None if batch_s is None else round(batch_s * 1000, 2),
        }
