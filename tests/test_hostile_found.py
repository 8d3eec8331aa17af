"""The failures the hostile-input suite found, each with the answer it gets now (a 4xx naming the field).

Before, each was a 500; the first one also left the chat replica answering 500 to everyone (a KV-cache slot with
no row). The seed routes answer in their own shape: FastAPI's 422 list, whose `loc` names the field.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.hostile import Raw, encode

USER = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
SAMPLED = {"messages": USER, "max_tokens": 2, "temperature": 0.7}

# (what was sent, path, body, status now, the field it names)
FOUND: list[tuple[str, str, Any, int, str]] = [
    ("seed beyond 64 bits", "/v1/chat/completions", {**SAMPLED, "seed": -(2**70)}, 400, "seed"),
    ("seed 2**64", "/v1/chat/completions", {**SAMPLED, "seed": 2**64}, 400, "seed"),
    ("lone surrogate in content", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, 400, "messages.0.content"),
    ("lone surrogate in a text part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, 400, "messages.0.content"),
    ("lone surrogate in model", "/v1/chat/completions", {"model": "\ud800", "messages": USER}, 400, "model"),
    ("lone surrogate in stop", "/v1/chat/completions", {**SAMPLED, "stop": "\udfff"}, 400, "stop"),
    ("lone surrogate in an embedding input", "/v1/embeddings", {"input": ["ok", "\ud800"]}, 400, "input"),
    ("lone surrogate in a /tokenize prompt", "/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("lone surrogate in /tokenize messages", "/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),
    ("lone surrogate in GLM-API's /tokenize", "/tokenize", {"prompt": "\ud800", "max_tokens": 3}, 400, "prompt"),
    ("token id beyond 64 bits", "/detokenize", {"tokens": [2**70]}, 400, "tokens.0"),
    ("NaN temperature, GLM-API", "/chat", {"messages": USER, "temperature": float("nan")}, 422, "glm_api.temperature"),
    ("lone surrogate, GLM-API", "/chat", {"messages": [{"role": "user", "content": "\ud800"}]}, 422, "glm_api.messages.0.content"),
    ("lone surrogate, web demo query", "/chat", {"query": "\ud800"}, 422, "web_demo.query"),
    ("lone surrogate, web demo history", "/stream", {"query": "x", "history": [["\ud800", "b"]]}, 422, "history.0.0"),
    ("NaN top_p, web demo", "/stream", {"query": "x", "top_p": float("nan")}, 422, "top_p"),
    ("lone surrogate, GLM-API embedding", "/embedding", {"prompt": ["\ud800"]}, 422, "prompt.0"),
    ("NaN as a GLM-API embedding input", "/embedding", {"prompt": [float("nan")]}, 422, "prompt.0"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "body", "status", "field"), FOUND, ids=[f[0] for f in FOUND])
def test_found_failure_is_a_client_error_naming_the_field(
    http: httpx.Client, case: str, path: str, body: Any, status: int, field: str
) -> None:
    response = http.post(path, content=encode(body), headers=JSON)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == field
    else:
        locations = [".".join(str(p) for p in error["loc"][1:]) for error in response.json()["detail"]]
        assert field in locations, locations


@pytest.mark.parametrize("path", ["/chat", "/stream", "/embedding"])
def test_a_body_nested_to_the_parsers_limit_gets_the_seeds_422(http: httpx.Client, path: str) -> None:
    """A body nested just as deep as the JSON parser takes: the seed routes' 422 echoes it back, and at some depths
    only encoding the answer itself ran past the recursion limit (a 500; found by a long hostile run)."""
    statuses = set()
    for depth in range(700, 1001):
        body = Raw('{"a":' * depth + "1" + "}" * depth)
        response = http.post(path, content=encode(body), headers=JSON)
        assert response.status_code in (400, 422), (depth, response.text[:200])
        assert "detail" in response.json()
        statuses.add(response.status_code)
    assert statuses == {400, 422}  # the sweep crosses the parser's limit


def test_deep_or_huge_json_is_a_400_in_each_shape(http: httpx.Client) -> None:
    for body in (Raw("[" * 5_000 + "]" * 5_000), {"messages": USER, "max_tokens": Raw("9" * 5_000)}):
        openai_style = http.post("/v1/chat/completions", content=encode(body), headers=JSON)
        seed_style = http.post("/chat", content=encode(body), headers=JSON)
        assert openai_style.status_code == 400 and "error" in openai_style.json(), openai_style.text
        assert seed_style.status_code == 400 and "detail" in seed_style.json(), seed_style.text
