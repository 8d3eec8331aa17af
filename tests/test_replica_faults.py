"""A chat replica dying mid-stream: the client gets an error event and [DONE], and Serve replaces the replica.

Marked `disruptive`: conftest runs these after every other test, since the app is one per session.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray

pytestmark = pytest.mark.disruptive


def _chat_replica() -> ray.actor.ActorHandle:
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::glm-serve#Chat-tiny-glm#")
    ]
    assert len(names) == 1
    return ray.get_actor(names[0], namespace="serve")


def test_replica_killed_mid_stream_ends_with_error_then_done(http: httpx.Client) -> None:
    # Greedy: this prompt then runs to max_tokens, so the stream is still going when the replica dies
    # (sampling from the random weights may end it early with an end token).
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
    }
    events = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 5:
                ray.kill(_chat_replica(), no_restart=True)
    assert events[-1] == "data: [DONE]", events[-3:]
    assert "error" in events[-2], events[-4:]
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["type"] == "server_error" and error["message"]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if http.get("/health").status_code == 200:
            break
        time.sleep(0.5)
    reply = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert reply.status_code == 200
