"""Back-pressure: beyond a deployment's max_ongoing_requests + max_queued_requests, requests are answered 503 with
Retry-After at once (in each route's error shape, streams included), and the server serves again right after.

The limits are tiny here, so they live in a second application of the session's Serve instance (its own chat
replica, tokenizer and ingress under /backpressure): the shared app's limits stay as every other test needs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.extra_app import extra_app

APP = "backpressure"
PREFIX = "/backpressure"
SMALL = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}


def _tiny_limits_args(tiny_glm_path: str) -> dict[str, Any]:
    return {
        "chat_models": [
            {
                "name": "tiny-glm",
                "path": tiny_glm_path,
                "device": "cpu",
                "cpu_threads": 1,
                "max_num_seqs": 1,
                # One request on the replica, one waiting in the ingress; a third is refused.
                "deployment": {**SMALL, "max_ongoing_requests": 1, "max_queued_requests": 1},
            }
        ],
        "tokenizer": SMALL,
        "ingress": SMALL,
    }


@pytest.fixture(scope="module")
def tiny_limits_url(base_url: str, tiny_glm_path: str) -> Iterator[str]:
    with extra_app(base_url, APP, PREFIX, _tiny_limits_args(tiny_glm_path), healthy_within_s=180) as url:
        yield url


@pytest.mark.parametrize("profile", ["serve_config.yaml", "cpu demo"])
def test_every_deployment_bounds_its_queue_and_says_when_to_retry(profile: str, tiny_glm_path: str) -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    from serve_app.builder import bind_graph, parse_config
    from serve_app.profiles import cpu_demo_args

    if profile == "cpu demo":
        args = cpu_demo_args()
    else:
        serve_config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
        args = serve_config["applications"][0]["args"]
    built = build_serve_app(bind_graph(parse_config(args)), name="glm-serve")
    assert len(built.deployments) >= 3
    for deployment in built.deployments:
        config = deployment._deployment_config
        assert 1 <= config.max_queued_requests <= 4 * config.max_ongoing_requests, deployment.name
        assert config.backpressure_config.retry_after_s >= 1, deployment.name


def _chat(stream: bool, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
    }


# (path, body, answers in the OpenAI envelope): every chat route, streaming and not.
BURST = [
    ("/v1/chat/completions", _chat(stream=True), True),
    ("/v1/chat/completions", _chat(stream=True), True),
    ("/v1/chat/completions", _chat(stream=False), True),
    ("/chat", _chat(stream=True), False),
    ("/chat", _chat(stream=False), False),
    ("/stream", {"query": "hi", "history": [], "max_tokens": 4}, False),
    ("/chat", {"query": "hi", "history": [], "max_tokens": 4}, False),
]


async def _burst_while_busy(url: str, end_ids: list[int]) -> list[tuple[bool, httpx.Response]]:
    """Hold the chat replica with one long stream, send the burst, and let the long stream go once at most one
    request of the burst (the one that may wait in the queue) is still unanswered."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        # End tokens banned: the hold runs all its 1900 tokens, whatever the random weights say.
        hold = _chat(stream=True, max_tokens=1900) | {"logit_bias": {str(token): -100 for token in end_ids}}
        async with client.stream("POST", "/v1/chat/completions", json=hold) as holding:
            assert holding.status_code == 200
            # Kept: a line iterator that is garbage-collected closes the response, and so the hold.
            held_lines = holding.aiter_lines()
            await anext(held_lines)  # generating: the replica's one slot is taken

            async def send(path: str, body: dict[str, Any]) -> httpx.Response:
                response = await client.post(path, json=body)
                await response.aread()
                return response

            tasks = [asyncio.create_task(send(path, body)) for path, body, _ in BURST]
            pending: set[asyncio.Task[httpx.Response]] = set(tasks)
            while len(pending) > 1:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Full, not broken: /health keeps the server in a load balancer's rotation.
            health = await client.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["deployments"]["chat:tiny-glm"] == {"saturated": True}
        # The long stream is closed here: its replica slot frees, and a queued request runs.
        answers = await asyncio.gather(*tasks)
    return [(openai_shape, answer) for (_, _, openai_shape), answer in zip(BURST, answers)]


def test_requests_beyond_the_queue_get_503_with_retry_after_then_service_resumes(
    tiny_limits_url: str, parts: Any
) -> None:
    answers = asyncio.run(_burst_while_busy(tiny_limits_url, parts[2]))

    statuses = [answer.status_code for _, answer in answers]
    assert set(statuses) <= {200, 503}, statuses
    # One slot on the replica (held) and one in the queue: every other request of the burst is refused.
    assert statuses.count(503) >= len(BURST) - 1, statuses
    for openai_shape, answer in answers:
        if answer.status_code != 503:
            continue
        # Refused before the first byte: a plain JSON error, never a 200 event stream that carries an error.
        assert answer.headers["content-type"].startswith("application/json"), answer.headers
        assert int(answer.headers["retry-after"]) >= 1
        body = answer.json()
        if openai_shape:
            error = body["error"]
            assert (error["type"], error["code"]) == ("server_error", "overloaded"), error
            assert "overloaded" in error["message"]
        else:
            assert set(body) == {"detail"} and "overloaded" in body["detail"], body

    # The load is gone: the next request is served, with no waiting for anything to recover.
    after = httpx.post(f"{tiny_limits_url}/v1/chat/completions", json=_chat(stream=False), timeout=120)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["finish_reason"] in {"stop", "length"}
