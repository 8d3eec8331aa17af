"""How long a request may wait inside a replica for its turn before it is refused instead of served late.

Serve bounds how many requests wait (max_ongoing_requests, max_queued_requests), not for how long. Under
overload the requests a replica admitted would otherwise wait behind each other for many seconds and hold the
server busy long after the load has gone; past the deadline a request is answered 503 + Retry-After, which the
ingress still sends as a status code because nothing of the answer has gone out yet.

The wait counts from the request's arrival at the ingress, so it covers the queue in front of the replica too.
Wall-clock time, since the ingress and the replica may run on different machines (whose clocks NTP keeps
within milliseconds of each other; deadlines are seconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from serve_app.config import ChatModelConfig, EmbeddingModelConfig
from serve_app.errors import ServiceUnavailable, overloaded


@dataclass(frozen=True)
class QueueDeadline:
    max_wait_s: float | None = None  # None: wait as long as it takes
    retry_after_s: float = 1.0

    @classmethod
    def of(cls, model: ChatModelConfig | EmbeddingModelConfig) -> QueueDeadline:
        """A model's deadline, refused with the same Retry-After as its deployment's back-pressure."""
        return cls(model.max_queue_wait_s, model.deployment.backpressure_config.retry_after_s)

    def refusal(self, received_at: float, now: float | None = None) -> ServiceUnavailable | None:
        """The error for a request received at `received_at` (time.time()) if it has waited too long, else None."""
        if self.max_wait_s is None:
            return None
        if (now if now is not None else time.time()) - received_at <= self.max_wait_s:
            return None
        return overloaded(self.retry_after_s)


NO_DEADLINE = QueueDeadline()
