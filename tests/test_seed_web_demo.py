"""ChatGLM-web-stream-demo's interface (seed 001) as ../shared/COMPAT.md gives it."""

from __future__ import annotations

import json
from typing import Any

import httpx

HISTORY = [["你好", "你好！有什么可以帮你？"]]


def _delta_events(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    events, name = [], None
    with http.stream("POST", "/stream", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                assert name == "delta"
                events.append(json.loads(line[len("data: ") :]))
    return events


def test_chat_returns_the_history_with_the_new_exchange(http: httpx.Client) -> None:
    body = http.post("/chat", json={"query": "再见 😀", "history": HISTORY, "max_tokens": 8}).json()
    assert body["success"] is True and body["query"] == "再见 😀"
    assert body["history"] == HISTORY + [["再见 😀", body["response"]]]


def test_history_may_be_omitted(http: httpx.Client) -> None:
    body = http.post("/chat", json={"query": "hi", "max_tokens": 4}).json()
    assert body["history"] == [["hi", body["response"]]]


def test_stream_deltas_join_to_the_final_response(http: httpx.Client) -> None:
    body = {
        "query": "讲个故事 🚀",
        "history": HISTORY,
        "max_tokens": 40,
        "temperature": 0,
    }  # greedy: no early end
    events = _delta_events(http, body)
    *running, final = events
    assert running and all(e["finished"] is False for e in running)
    assert all("\ufffd" not in e["delta"] for e in running)
    joined = ""
    for event in running:
        joined += event["delta"]
        assert event["response"] == joined
    assert final["finished"] is True and final["delta"] == "[EOS]"
    assert final["response"] == joined and final["query"] == "讲个故事 🚀"
    assert final["history"] == HISTORY + [["讲个故事 🚀", joined]]


def test_stream_has_no_done_marker(http: httpx.Client) -> None:
    with http.stream("POST", "/stream", json={"query": "hi", "max_tokens": 3}) as response:
        assert "[DONE]" not in response.read().decode()


def test_clear_frees_cached_memory(http: httpx.Client) -> None:
    response = http.get("/clear")
    assert response.status_code == 200 and response.json() == {"success": True}


def test_bad_history_is_422(http: httpx.Client) -> None:
    response = http.post("/chat", json={"query": "hi", "history": [["only a question"]]})
    assert response.status_code == 422
