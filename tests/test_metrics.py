"""Prometheus metrics on Ray's metrics endpoint: requests, tokens, latencies, sequences and embedding batches move."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from serve_app.profiles import CHAT_MODEL, EMBEDDING_MODEL, cpu_demo_args

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello! 你好"}]
SENTENCES = ["The cat sits on the mat.", "深度学习改变了自然语言处理。", "Ray Serve scales deployments 🚀"]
# Ray exports an application's metrics under its own `ray_` prefix.
PREFIX = "ray_glm_serve_"
# Metrics reach the endpoint a report interval (1 s in the session's Ray) or two after they are recorded; a loaded
# machine can take much longer.
DEADLINE_S = 120

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(metrics_url: str) -> Samples:
    """This Ray session's glm-serve samples (other Ray instances on this machine can show up on its endpoint)."""
    import ray

    session = ray.get_runtime_context().get_session_name()
    text = httpx.get(metrics_url, timeout=30).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith(PREFIX)
        for sample in family.samples
        if sample.labels.get("SessionName") == session
    }


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` (all replicas) whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, tags), value in samples.items() if n == PREFIX + name and wanted <= tags)


def _poll(metrics_url: str, done: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        samples = _scrape(metrics_url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.fixture(scope="module")
def before(metrics_url: str, http: httpx.Client) -> Samples:
    http.get("/health")  # let the ingress start its metrics if no request has reached it yet
    return _scrape(metrics_url)


def test_requests_tokens_latencies_and_batches_move(
    metrics_url: str, before: Samples, http: httpx.Client, client: openai.OpenAI
) -> None:
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, temperature=0, max_tokens=8)
    assert reply.usage is not None
    prompt_tokens, completion_tokens = reply.usage.prompt_tokens, reply.usage.completion_tokens
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=HELLO,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    prompt_tokens += usage.prompt_tokens
    completion_tokens += usage.completion_tokens
    assert len(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES).data) == 3
    bad = http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": HELLO, "temperature": -1})
    assert bad.status_code == 400
    assert http.get("/v1/models/no-such-model").status_code == 404
    assert http.get("/no/such/path").status_code == 404

    def moved(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    expected: dict[str, Callable[[], bool]] = {
        "chat 200s": lambda: moved("http_requests_total", route="/v1/chat/completions", status="200") >= 2,
        "chat 400": lambda: moved("http_requests_total", route="/v1/chat/completions", status="400") >= 1,
        "embeddings 200": lambda: moved("http_requests_total", route="/v1/embeddings", status="200") >= 1,
        "model 404 by template": lambda: (
            moved("http_requests_total", route="/v1/models/{model_id}", method="GET", status="404") >= 1
        ),
        "unmatched 404": lambda: moved("http_requests_total", route="unmatched", status="404") >= 1,
        "prompt tokens": lambda: moved("prompt_tokens_total", model=CHAT_MODEL) >= prompt_tokens,
        "completion tokens": lambda: moved("completion_tokens_total", model=CHAT_MODEL) >= completion_tokens,
        "time to first token": lambda: (
            moved("time_to_first_token_seconds_count", model=CHAT_MODEL) >= 2
            and moved("time_to_first_token_seconds_sum", model=CHAT_MODEL) > 0
        ),
        # Two replies of up to 8 tokens: at least one decode step after the first token.
        "inter-token latency": lambda: (
            moved("inter_token_latency_seconds_count", model=CHAT_MODEL) >= 1
            and moved("inter_token_latency_seconds_sum", model=CHAT_MODEL) > 0
        ),
        "embedding batch": lambda: (
            moved("embedding_batch_requests_count", model=EMBEDDING_MODEL) >= 1
            and moved("embedding_batch_inputs_sum", model=EMBEDDING_MODEL) >= len(SENTENCES)
        ),
    }
    after: Samples = {}

    def all_moved(samples: Samples) -> bool:
        nonlocal after
        after = samples
        return all(check() for check in expected.values())

    _poll(metrics_url, all_moved)
    seen = sorted(
        (dict(tags).get("route"), dict(tags).get("status"), value)
        for (name, tags), value in after.items()
        if name == PREFIX + "http_requests_total"
    )
    assert [what for what, check in expected.items() if not check()] == [], f"http_requests_total: {seen}"


def _chat_limits() -> tuple[int, int]:
    chat = cpu_demo_args()["chat_models"][0]
    return chat["max_num_seqs"], chat["deployment"]["max_ongoing_requests"]


def _running_sequences(http: httpx.Client) -> int:
    """As the chat replica itself reports it (GET /health): no metric report interval in between."""
    status = http.get("/health").json()["deployments"][f"chat:{CHAT_MODEL}"]
    return int(status.get("running_sequences", 0))


def test_sequence_gauges_follow_the_running_batch_and_its_queue(
    metrics_url: str, http: httpx.Client, client: openai.OpenAI, parts: Any
) -> None:
    max_num_seqs, max_ongoing = _chat_limits()
    # More streams than the batch has slots (and no more than the replica admits): the rest wait in the engine.
    extra = min(8, max_ongoing - max_num_seqs)
    assert extra >= 1, "the profile leaves the chat replica no room for a queue"
    # Should one be refused anyway (503 + Retry-After), it is sent again, as the SDK does by default.
    patient = client.with_options(max_retries=3)

    def long_stream(max_tokens: int) -> int:
        reply = patient.chat.completions.create(
            # End tokens banned, so each runs to max_tokens.
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            logit_bias={str(token): -100 for token in parts[2]},
        )
        return sum(1 for _ in reply)

    peak_active = peak_queued = 0.0
    with ThreadPoolExecutor(max_num_seqs + extra) as pool:
        # A full batch first, and the extra streams only once the replica runs it: they then wait for a slot for
        # most of its 512 steps (~4-8 s at 32 streams here), several of Ray's metric reports (1 s apart in the
        # tests), however spread out the batch's own arrivals were. Sent all at once, the queue was sometimes
        # never seen: the arrivals through the Serve proxy spread over more than a stream's length.
        load = [pool.submit(long_stream, 512) for _ in range(max_num_seqs)]
        deadline = time.monotonic() + DEADLINE_S
        while _running_sequences(http) < max_num_seqs and not any(future.done() for future in load):
            assert time.monotonic() < deadline, "the batch never filled"
            time.sleep(0.1)
        load += [pool.submit(long_stream, 16) for _ in range(extra)]
        while not all(future.done() for future in load):
            samples = _scrape(metrics_url)
            peak_active = max(peak_active, _total(samples, "running_sequences", model=CHAT_MODEL))
            peak_queued = max(peak_queued, _total(samples, "queued_sequences", model=CHAT_MODEL))
            time.sleep(0.3)
        assert all(future.result() > 0 for future in load)
    assert 1 <= peak_active <= max_num_seqs
    assert peak_queued >= 1, f"running peaked at {peak_active}, queued never seen"
    # Once every stream has ended, both gauges come back to 0.
    idle = _poll(
        metrics_url,
        lambda s: (
            _total(s, "running_sequences", model=CHAT_MODEL) == 0
            and _total(s, "queued_sequences", model=CHAT_MODEL) == 0
        ),
    )
    assert _total(idle, "running_sequences", model=CHAT_MODEL) == 0
    assert _total(idle, "queued_sequences", model=CHAT_MODEL) == 0
    # Present, not just absent-and-read-as-0.
    assert any(name == PREFIX + "queued_sequences" for name, _ in idle)
