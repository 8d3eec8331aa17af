"""GLM-API's interface (seed 000) as ../shared/COMPAT.md gives it, served by the same deployments as /v1."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest

USER = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好 😀"}]


def _events(http: httpx.Client, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def _content(line: str) -> dict[str, Any]:
    assert line.startswith("data: ")
    return json.loads(line[len("data: ") :])


def test_chat_answers_like_glm_api(http: httpx.Client) -> None:
    body = http.post("/chat", json={"messages": USER, "max_tokens": 12}).json()
    assert set(body) == {"model", "object", "created", "choices", "usage"}
    assert body["model"] == "tiny-glm" and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_default_max_tokens_fits_a_small_window(http: httpx.Client) -> None:
    # GLM-API's default of 4096 exceeds the tiny model's 2048 window: it is capped, not refused.
    response = http.post("/chat", json={"messages": USER, "max_tokens": None, "temperature": 0, "stop": None})
    assert response.status_code == 200


@pytest.mark.parametrize("chunk", [True, False])
def test_stream_framing(http: httpx.Client, chunk: bool) -> None:
    lines = _events(
        http, {"messages": USER, "stream": True, "chunk": chunk, "max_tokens": 24, "temperature": 0}
    )
    assert not any(line.startswith("event:") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [_content(line) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    texts = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert texts and all(texts) and all("\ufffd" not in t for t in texts)
    whole = http.post("/chat", json={"messages": USER, "max_tokens": 24, "temperature": 0}).json()
    final = "".join(texts) if chunk else texts[-1]
    assert final.strip() == whole["choices"][0]["message"]["content"]
    if not chunk:  # each delta is the whole text so far
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))


def test_last_message_from_the_assistant_is_invalid(http: httpx.Client) -> None:
    messages = USER + [{"role": "assistant", "content": "hi"}]
    response = http.post("/chat", json={"messages": messages})
    assert response.status_code == 400 and response.json() == {"detail": "Invalid request"}


@pytest.mark.parametrize(
    "body",
    [{"messages": [{"role": "wizard", "content": "x"}]}, {"stream": True}, {"messages": []}],
    ids=["unknown role", "no messages", "empty messages"],
)
def test_malformed_chat_is_422(http: httpx.Client, body: dict[str, Any]) -> None:
    response = http.post("/chat", json=body)
    assert response.status_code == 422 and isinstance(response.json()["detail"], list)


def test_prompt_beyond_the_window_is_4xx(http: httpx.Client) -> None:
    response = http.post("/chat", json={"messages": [{"role": "user", "content": "word " * 4000}]})
    assert 400 <= response.status_code < 500 and "context length" in response.json()["detail"]


def test_embedding_one_vector_per_prompt_in_order(http: httpx.Client) -> None:
    prompts = ["你好", "hello world", "ray serve"]
    body = http.post("/embedding", json={"model": "all-MiniLM-L6-v2", "prompt": prompts}).json()
    assert body["model"] == "all-MiniLM-L6-v2" and body["object"] == "embedding"
    assert len(body["data"]) == 3 and all(len(v) == 384 for v in body["data"])
    single = http.post("/embedding", json={"prompt": ["hello world"]}).json()["data"][0]
    assert single == pytest.approx(body["data"][1], abs=1e-5)


def test_embedding_errors(http: httpx.Client) -> None:
    assert http.post("/embedding", json={"prompt": "a string"}).status_code == 422
    unknown = http.post("/embedding", json={"model": "text2vec-large-chinese", "prompt": ["x"]})
    assert unknown.status_code == 404 and "text2vec-large-chinese" in unknown.json()["detail"]


def test_models_cards(http: httpx.Client) -> None:
    body = http.get("/models").json()
    assert body["object"] == "list"
    kinds = {card["id"]: card["object"] for card in body["data"]}
    assert kinds == {
        "tiny-glm": "chat.completion",
        "tiny-glm-tools": "chat.completion",
        "all-MiniLM-L6-v2": "embedding",
    }
    for card in body["data"]:
        assert isinstance(card["created"], int) and card["owned_by"]
        assert card["root"] is None and card["parent"] is None and card["permission"] is None


def test_tokenize_like_glm_api(http: httpx.Client) -> None:
    prompt = "给你一个机会，你会想逃离你所在的虚拟世界吗？"
    body = http.post("/tokenize", json={"prompt": prompt, "max_tokens": 4096}).json()
    assert body["model"] == "tiny-glm" and body["object"] == "tokenizer"
    prefix = http.post("/detokenize", json={"tokens": body["tokenIds"][:2]}).json()["prompt"]
    assert prefix == "[gMASK]<sop>"
    assert len(body["tokenIds"]) == len(body["tokens"]) + 2
    cut = http.post("/tokenize", json={"prompt": prompt, "max_tokens": 5}).json()
    assert cut["tokenIds"] == body["tokenIds"][:5] and cut["tokens"] == body["tokens"]
