"""Replicas that die or break: clients get a clean answer (an error event and [DONE] mid-stream, 503 with
Retry-After otherwise), never a hang, and Serve replaces the replica.

Marked `disruptive`: conftest runs these after every other test, since the app is one per session.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
import ray

from tests.serve_logs import failed_requests_logged

pytestmark = pytest.mark.disruptive

CHAT = "Chat-tiny-glm"
EMBEDDING = "Embedding-all-MiniLM-L6-v2"


def _replica_actor_name(deployment: str, replica_id: str = "") -> str:
    """Serve's name for a replica's actor (with no id: the prefix its deployment's replicas share)."""
    return f"SERVE_REPLICA::glm-serve#{deployment}#{replica_id}"


def _replica_names(deployment: str) -> set[str]:
    return {
        str(a["name"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(_replica_actor_name(deployment))
    }


def _replica_name(deployment: str) -> str:
    names = _replica_names(deployment)
    assert len(names) == 1, names
    return names.pop()


def _settled(deployment: str) -> bool:
    """Every replica Serve counts is RUNNING and is a live actor. Serve's controller may learn of a killed replica
    seconds after its replacement serves: until then its status still counts the dead one as RUNNING, and after,
    the replacement is STARTING (alive, but sent nothing until it has loaded its model)."""
    from ray import serve

    states = serve.status().applications["glm-serve"].deployments[deployment].replica_states
    return set(states) == {"RUNNING"} and sum(states.values()) == len(_replica_names(deployment))


def _chat_replica() -> ray.actor.ActorHandle:
    return ray.get_actor(_replica_name(CHAT), namespace="serve")


def _until(condition_met: object, timeout_s: float = 180) -> float:
    """Poll until `condition_met()` is true; the seconds it took (printed by the tests, never asserted)."""
    assert callable(condition_met)
    start = time.monotonic()
    while not condition_met():
        assert time.monotonic() - start < timeout_s, f"not recovered within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - start


def _assert_unavailable(response: httpx.Response, *codes: str) -> None:
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] in (codes or ("replica_unavailable",)), error


def test_replica_killed_mid_stream_ends_with_error_then_done(http: httpx.Client, parts: Any) -> None:
    # End tokens banned: the stream runs to max_tokens, so it is still going when the replica dies.
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
        "logit_bias": {str(token): -100 for token in parts[2]},
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


TEXTS = [f"sentence number {i} about replicas that fail while they embed" for i in range(64)]


def test_embedding_replicas_killed_under_load_answer_503_then_recover(http: httpx.Client) -> None:
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def keep_embedding() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as client:
            while not stop.is_set():
                answers.append(client.post("/v1/embeddings", json={"input": TEXTS}))

    clients = [threading.Thread(target=keep_embedding) for _ in range(6)]
    for thread in clients:
        thread.start()
    _until(lambda: len(answers) >= 6)
    served_before = len(answers)
    killed = _replica_names(EMBEDDING)
    for name in killed:  # all of them (the CPU profile runs two): no request can avoid it
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    stop.set()  # each client ends after the request it has in flight
    for thread in clients:
        thread.join(timeout=120)
    # No request hangs: every client got its answer (httpx would have raised after 60 s otherwise).
    assert not any(thread.is_alive() for thread in clients)

    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses[served_before:], statuses  # the requests in flight when the replica died
    for answer in answers:
        if answer.status_code == 503:
            # Lost with the replica; or sent to it just before and still waiting for its replacement (which loads
            # the model) when the queue deadline passed.
            _assert_unavailable(answer, "replica_unavailable", "overloaded")

    def embeds() -> bool:
        answer = http.post("/v1/embeddings", json={"input": ["back again"]})
        assert answer.status_code in {200, 503}, answer.text
        return answer.status_code == 200

    _until(embeds)
    print(
        f"in flight at the kill: {statuses[served_before:]}; "
        f"embeddings served again {time.monotonic() - killed_at:.1f} s after the replica was killed"
    )
    # Back to full strength for the tests after this one: every killed replica replaced, and running.
    _until(lambda: _replica_names(EMBEDDING).isdisjoint(killed) and _settled(EMBEDDING))
    assert len(_replica_names(EMBEDDING)) == len(killed)


def test_a_broken_model_fails_its_health_check_and_its_replica_is_replaced(http: httpx.Client) -> None:
    from ray import serve

    # Replicas that an earlier test's kill replaced may still be starting: the router sends them nothing yet.
    _until(lambda: _settled(CHAT) and _settled(EMBEDDING))
    before = {deployment: _replica_names(deployment) for deployment in (CHAT, EMBEDDING)}
    for deployment, replicas in before.items():
        # A handle call reaches one replica, chosen by Serve: called until every replica has been broken.
        handle = serve.get_deployment_handle(deployment, app_name="glm-serve")
        broken: set[str] = set()
        for _ in range(200):
            hit = handle.break_model_for_tests.remote().result()
            assert hit["tensors"] > 0
            broken.add(_replica_actor_name(deployment, hit["replica"]))
            if broken >= replicas:
                break
        assert broken >= replicas, (broken, replicas)
    # The fault is real: the poisoned model computes NaN, which JSON carries as null.
    poisoned = http.post("/v1/embeddings", json={"input": ["hello"]})
    assert poisoned.status_code != 200 or None in poisoned.json()["data"][0]["embedding"], poisoned.text[:200]

    def replaced() -> bool:
        gone = all(_replica_names(deployment).isdisjoint(replicas) for deployment, replicas in before.items())
        return gone and http.get("/health").status_code == 200

    print(f"broken replicas replaced in {_until(replaced):.1f} s")
    vector = http.post("/v1/embeddings", json={"input": ["hello"]}).json()["data"][0]["embedding"]
    assert all(isinstance(value, float) for value in vector)
    reply = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert reply.status_code == 200, reply.text


def test_a_broken_engine_answers_503_until_serve_replaces_its_replica(http: httpx.Client) -> None:
    from ray import serve

    before = _replica_name(CHAT)
    handle = serve.get_deployment_handle(CHAT, app_name="glm-serve")
    handle.break_engine_for_tests.remote().result()
    broken_at = time.monotonic()
    statuses: list[int] = []

    refused_ids: list[str] = []

    def replaced() -> bool:
        reply = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        )
        statuses.append(reply.status_code)
        if (
            reply.status_code == 503
        ):  # refused by the broken engine, or waited past the deadline for its successor
            _assert_unavailable(reply, "replica_unavailable", "overloaded")
            refused_ids.append(reply.headers["x-request-id"])
        return reply.status_code == 200 and before not in _replica_names(CHAT)

    _until(replaced)
    # Meanwhile every request was told to retry (503 + Retry-After): never a 500, never a hang.
    assert set(statuses) <= {200, 503} and statuses[0] == 503, statuses
    # A refusal is an answer, not a failure of the replica: none is logged as a failed request (an ERROR with
    # its traceback, which an overload would repeat hundreds of times).
    failed = failed_requests_logged(CHAT)
    assert refused_ids and not failed & set(refused_ids), failed & set(refused_ids)
    print(
        f"broken engine: {statuses.count(503)} requests answered 503, replaced in {time.monotonic() - broken_at:.1f} s"
    )
