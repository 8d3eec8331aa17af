"""glm-serve's Prometheus metrics, defined once here and recorded through `ray.serve.metrics`.

Ray exports them on each node's metrics export port next to its own (`ray_serve_*`, ...), with Ray's `ray_`
prefix: `glm_serve_http_requests` is scraped as `ray_glm_serve_http_requests_total`. Serve adds the `deployment`,
`replica` and `application` tags. Each replica makes its own recorder in its constructor (Serve's replica
context gives those tags); the chat engines take theirs as an optional argument, so they also run without Ray
(benchmarks, engine tests) and record nothing there.

This module imports nothing of FastAPI: the deployments use it too.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ray.serve.metrics import Counter, Gauge, Histogram

# Seconds. From ~1 ms (a tiny model's decode step on CPU) to minutes (a long prompt behind a full batch on a GPU).
_TTFT_BOUNDARIES = [
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]  # fmt: skip
_INTER_TOKEN_BOUNDARIES = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
]  # fmt: skip
_BATCH_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


def _per_model(kind: type[_Metric], name: str, description: str, model: str, **options: Any) -> _Metric:
    """A metric of one replica's model: tagged `model` (Serve adds deployment, replica and application)."""
    metric = kind(name, description=description, tag_keys=("model",), **options)
    metric.set_default_tags({"model": model})
    return metric


class HttpMetrics:
    """The ingress: one count per HTTP response, by route template, method and status code."""

    def __init__(self) -> None:
        self._requests = Counter(
            "glm_serve_http_requests",
            description="HTTP responses started by the ingress, by route template (unmatched paths: "
            "'unmatched'), method and status code.",
            tag_keys=("route", "method", "status"),  # type: ignore[arg-type]  # Ray annotates a 1-tuple
        )

    def response_started(self, route: str, method: str, status: int) -> None:
        self._requests.inc(1, tags={"route": route, "method": method, "status": str(status)})


class ChatMetrics:
    """A chat replica: tokens in and out, latencies, and how full its batch is."""

    def __init__(self, model: str) -> None:
        self._prompt_tokens = _per_model(
            Counter,
            "glm_serve_prompt_tokens",
            "Prompt tokens of the requests that started generating.",
            model,
        )
        self._completion_tokens = _per_model(
            Counter,
            "glm_serve_completion_tokens",
            "Tokens generated, for requests that finished or whose client went away.",
            model,
        )
        self._time_to_first_token = _per_model(
            Histogram,
            "glm_serve_time_to_first_token_seconds",
            "From a request reaching the chat replica to its first text.",
            model,
            boundaries=_TTFT_BOUNDARIES,
        )
        self._inter_token_latency = _per_model(
            Histogram,
            "glm_serve_inter_token_latency_seconds",
            "Time between two tokens of the running sequences: one sample per decode step.",
            model,
            boundaries=_INTER_TOKEN_BOUNDARIES,
        )
        self._running_sequences = _per_model(
            Gauge, "glm_serve_running_sequences", "Sequences being generated (in the running batch).", model
        )
        self._queued_sequences = _per_model(
            Gauge, "glm_serve_queued_sequences", "Sequences waiting for a place in the running batch.", model
        )
        self.sequences(0, 0)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self._time_to_first_token.observe(seconds)
        if prompt_tokens > 0:  # Ray's counters refuse 0
            self._prompt_tokens.inc(prompt_tokens)

    def completion_tokens(self, count: int) -> None:
        if count > 0:
            self._completion_tokens.inc(count)

    def inter_token(self, seconds: float) -> None:
        self._inter_token_latency.observe(seconds)

    def sequences(self, active: int, queued: int) -> None:
        self._running_sequences.set(active)
        self._queued_sequences.set(queued)


class EmbeddingMetrics:
    """An embedding replica: how much each batch merged."""

    def __init__(self, model: str) -> None:
        self._batch_requests = _per_model(
            Histogram,
            "glm_serve_embedding_batch_requests",
            "Requests (or parts of split large ones) merged into one embedding batch (@serve.batch).",
            model,
            boundaries=_BATCH_BOUNDARIES,
        )
        self._batch_inputs = _per_model(
            Histogram,
            "glm_serve_embedding_batch_inputs",
            "Input texts embedded by one batch.",
            model,
            boundaries=_BATCH_BOUNDARIES,
        )

    def batch(self, requests: int, inputs: int) -> None:
        self._batch_requests.observe(requests)
        self._batch_inputs.observe(inputs)
