"""Many streams at once through the real app: exact, independent, and cancelled when the client leaves."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

MODEL = "tiny-glm"


def _body(i: int, max_tokens: int = 32, stream: bool = False) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"stream number {i} 你好"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _stream_text(http: httpx.Client, i: int) -> str:
    deltas = []
    with http.stream("POST", "/v1/chat/completions", json=_body(i, stream=True)) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and "content" in choices[0]["delta"]:
                    deltas.append(choices[0]["delta"]["content"])
    assert all("\ufffd" not in d for d in deltas)
    return "".join(deltas)


def _chat_status(http: httpx.Client) -> dict[str, Any]:
    status: dict[str, Any] = http.get("/health").json()["deployments"][f"chat:{MODEL}"]
    return status


def test_sixteen_simultaneous_streams_equal_their_sequential_results(http: httpx.Client) -> None:
    sequential = [
        http.post("/v1/chat/completions", json=_body(i)).json()["choices"][0]["message"]["content"]
        for i in range(16)
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        streamed = list(pool.map(lambda i: _stream_text(http, i), range(16)))
    assert streamed == sequential
    assert len(set(sequential)) > 1


def test_disconnected_streams_leave_the_batch(base_url: str, http: httpx.Client, parts: Any) -> None:
    # The end tokens banned: every stream would run its 1500 tokens, whatever the random weights say.
    never_ending = {"logit_bias": {str(token): -100 for token in parts[2]}}
    clients = [httpx.Client(base_url=base_url, timeout=60) for _ in range(8)]
    streams: list[Any] = []
    try:
        for i, client in enumerate(clients):
            context = client.stream(
                "POST", "/v1/chat/completions", json=_body(i, max_tokens=1500, stream=True) | never_ending
            )
            response = context.__enter__()
            lines = response.iter_lines()
            for _ in range(4):  # the role chunk and some text: generation is under way
                next(lines)
            # Kept with its response: a line iterator that is garbage-collected closes the response, which
            # disconnects the client (the server then rightly drops the sequence before this test means to).
            streams.append((context, lines))
        status = _chat_status(http)
        assert status["open_streams"] == 8 and status["running_sequences"] == 8, status
    finally:
        for context, _ in streams:
            context.__exit__(None, None, None)
        for client in clients:
            client.close()

    def left() -> bool:
        status = _chat_status(http)
        return status["running_sequences"] == 0 and status["open_streams"] == 0

    deadline = time.monotonic() + 10
    while not left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left(), _chat_status(http)  # the engine freed the slots of the streams still generating
    reply = http.post("/v1/chat/completions", json=_body(0, max_tokens=4))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_health_counts_the_decode_steps_and_rows_that_requests_cost(http: httpx.Client, parts: Any) -> None:
    # The end tokens banned: each reply is exactly max_tokens long, its first token from the prefill, the others
    # from one decode step each.
    max_tokens, requests = 12, 4
    body = {"logit_bias": {str(token): -100 for token in parts[2]}}
    before = _chat_status(http)["decode"]
    with ThreadPoolExecutor(max_workers=requests) as pool:
        replies = list(
            pool.map(
                lambda i: http.post("/v1/chat/completions", json=_body(i, max_tokens) | body).json(),
                range(requests),
            )
        )
    after = _chat_status(http)["decode"]
    assert [reply["usage"]["completion_tokens"] for reply in replies] == [max_tokens] * requests
    rows, steps = after["rows"] - before["rows"], after["steps"] - before["steps"]
    assert rows == requests * (max_tokens - 1)
    assert max_tokens - 1 <= steps <= rows
    wall, cpu = after["forward_s"] - before["forward_s"], after["forward_cpu_s"] - before["forward_cpu_s"]
    assert 0 < cpu <= wall + 0.01  # the worker thread's own CPU time within the passes' wall time
