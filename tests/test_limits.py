"""Per-request limits: over each one, a 413 or 400 that names it, on the /v1 and the seed routes alike.

The small limits are those of the `secured` ingress (tests/secured_app.py LIMITS); the session app shows the
defaults (an 8 MiB body limit).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.secured_app import LIMITS, SecuredApp

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def limited(secured: SecuredApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.url, headers=secured.auth(), timeout=120) as client:
        yield client


def _openai_error(response: httpx.Response, status: int, limit: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert f"limits.{limit}" in error["message"] and str(LIMITS[limit]) in error["message"]
    return dict(error)


def _seed_error(response: httpx.Response, status: int, limit: str) -> str:
    assert response.status_code == status, response.text
    detail = str(response.json()["detail"])
    assert f"limits.{limit}" in detail and str(LIMITS[limit]) in detail
    return detail


def _padding(size: int) -> dict[str, Any]:
    """A chat body of about `size` bytes whose every field is valid: only its size is wrong."""
    return {"messages": USER, "max_tokens": 4, "user": "x" * size}


def test_body_over_the_limit_by_content_length(limited: httpx.Client) -> None:
    error = _openai_error(limited.post("/v1/chat/completions", json=_padding(5000)), 413, "max_body_bytes")
    assert error["code"] == "request_too_large"
    _seed_error(limited.post("/chat", json=_padding(5000)), 413, "max_body_bytes")
    # Just under the limit is fine.
    assert limited.post("/v1/chat/completions", json=_padding(3800)).status_code == 200


def test_body_over_the_limit_without_content_length(limited: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: the size is only known by counting
        yield b'{"messages": [{"role": "user", "content": "hi"}], "user": "'
        for _ in range(64):
            yield b"x" * 1000
        yield b'"}'

    response = limited.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    _openai_error(response, 413, "max_body_bytes")


def test_default_body_limit_is_8_mib(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"input": "x" * (8 * 1024 * 1024 + 1)})
    assert response.status_code == 413
    assert "8388608 bytes (limits.max_body_bytes)" in response.json()["error"]["message"]


def test_embedding_inputs_per_request(limited: httpx.Client) -> None:
    error = _openai_error(
        limited.post("/v1/embeddings", json={"input": ["a", "b", "c", "d"]}), 400, "max_embedding_inputs"
    )
    assert error["param"] == "input"
    _seed_error(
        limited.post("/embedding", json={"prompt": ["a", "b", "c", "d"]}), 400, "max_embedding_inputs"
    )
    assert len(limited.post("/v1/embeddings", json={"input": ["a", "b", "c"]}).json()["data"]) == 3


def test_embedding_input_length(limited: httpx.Client) -> None:
    body = {"input": ["short", "y" * 101]}
    error = _openai_error(limited.post("/v1/embeddings", json=body), 400, "max_embedding_input_chars")
    assert error["param"] == "input.1"
    _seed_error(limited.post("/embedding", json={"prompt": ["y" * 101]}), 400, "max_embedding_input_chars")
    assert limited.post("/v1/embeddings", json={"input": "y" * 100}).status_code == 200


def test_message_count(limited: httpx.Client) -> None:
    five = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 2 + USER
    error = _openai_error(limited.post("/v1/chat/completions", json={"messages": five}), 400, "max_messages")
    assert error["param"] == "messages"
    _seed_error(limited.post("/chat", json={"messages": five}), 400, "max_messages")
    # The web demo's history counts two messages per exchange: two exchanges and the query make five.
    history = [["hi", "yo"], ["hi", "yo"]]
    _seed_error(limited.post("/stream", json={"query": "hi", "history": history}), 400, "max_messages")
    _openai_error(limited.post("/tokenize", json={"messages": five}), 400, "max_messages")


def test_message_length(limited: httpx.Client) -> None:
    long = [{"role": "system", "content": "ok"}, {"role": "user", "content": "z" * 201}]
    error = _openai_error(
        limited.post("/v1/chat/completions", json={"messages": long}), 400, "max_message_chars"
    )
    assert error["param"] == "messages.1.content"
    _seed_error(limited.post("/chat", json={"query": "z" * 201}), 400, "max_message_chars")
    # /tokenize: a raw prompt in either dialect is held to the same length.
    error = _openai_error(limited.post("/tokenize", json={"prompt": "z" * 201}), 400, "max_message_chars")
    assert error["param"] == "prompt"
    _openai_error(
        limited.post("/tokenize", json={"prompt": "z" * 201, "max_tokens": 8}), 400, "max_message_chars"
    )
    assert limited.post("/tokenize", json={"prompt": "z" * 200}).status_code == 200


def test_max_tokens_over_the_cap(limited: httpx.Client) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"messages": USER, field: 17}
        error = _openai_error(limited.post("/v1/chat/completions", json=body), 400, "max_completion_tokens")
        assert error["param"] == field
    # Omitted, max_tokens means the cap.
    usage = limited.post("/v1/chat/completions", json={"messages": USER, "temperature": 0}).json()["usage"]
    assert 1 <= usage["completion_tokens"] <= 16
    # The seed routes are capped instead: GLM-API sends 4096 unless told otherwise.
    seed = limited.post("/chat", json={"messages": USER, "temperature": 0})
    assert seed.status_code == 200 and 1 <= seed.json()["usage"]["completion_tokens"] <= 16


def test_server_is_healthy_after_refusals(limited: httpx.Client, http: httpx.Client) -> None:
    limited.post("/v1/chat/completions", json=_padding(50_000))
    limited.post("/v1/embeddings", json={"input": ["x" * 101] * 10})
    assert limited.get("/health").status_code == 200 and http.get("/health").status_code == 200
    reply = limited.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
