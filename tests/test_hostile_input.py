"""Hostile input over the real Serve app: every case is a 4xx in the route's own error shape or a 200, never a
5xx or a hang, and after each route's batch the server answers a fixed greedy and a fixed seeded request exactly
as before it (unchanged, not just alive).

Property-based (hypothesis, `tests/hostile.py`); `GLM_SERVE_HOSTILE_EXAMPLES=N` runs N random cases per route
instead of the fixed short profile.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.hostile import ROUTES, SETTINGS, USER, Raw, Route, encode, hostile_bodies

# Requests whose replies must not change while hostile requests come and go.
_GREEDY = {
    "messages": [{"role": "user", "content": "Tell me about Ray Serve."}],
    "max_tokens": 12,
    "temperature": 0,
}
_SEEDED = {**_GREEDY, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "repetition_penalty": 1.2}


def _replies(http: httpx.Client) -> list[str]:
    answers = [http.post("/v1/chat/completions", json=body) for body in (_GREEDY, _SEEDED)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json()["choices"][0]["message"]["content"] for a in answers]


@pytest.fixture(scope="module")
def reference_replies(http: httpx.Client) -> list[str]:
    return _replies(http)


def _check_answer(route: Route, response: httpx.Response) -> None:
    status = response.status_code
    assert status == 200 or 400 <= status < 500, f"{route.name} answered {status}: {response.text[:500]}"
    if status == 200:
        return
    body = response.json()
    if route.seed_shape:
        assert "detail" in body, body
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


def _send(http: httpx.Client, route: Route, content: bytes, headers: dict[str, str] | None = None) -> int:
    response = http.request(
        route.method, route.path, content=content, headers=headers or {"content-type": "application/json"}
    )
    _check_answer(route, response)  # a stream is read whole: a hang is the client's timeout
    return response.status_code


def _replaced_top(route: Route, key: str, value: Any) -> Any:
    return {**route.body, key: value}


@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
def test_hostile_bodies(http: httpx.Client, reference_replies: list[str], route: Route) -> None:
    @SETTINGS
    @given(body=hostile_bodies(route))
    # The failures this suite found first, kept as fixed cases (README, "Validation").
    @example(body=_replaced_top(route, "seed", -(2**70)))
    @example(body=_replaced_top(route, "max_tokens", float("nan")))
    @example(body=_replaced_top(route, "model", "\ud800"))
    @example(body=Raw("[" * 5_000 + "]" * 5_000))
    def send(body: Any) -> None:
        statuses[_send(http, route, encode(body)) // 100] += 1

    statuses: Counter[int] = Counter()
    send()
    assert statuses[4] > 0, f"no hostile case was refused: {statuses}"  # guards the generator itself
    assert _replies(http) == reference_replies, f"the server's replies changed after {route.name}'s batch"


_ENCODINGS = {
    "utf-8": lambda text: text.encode("utf-8"),
    "utf-16": lambda text: text.encode("utf-16"),
    "utf-32-le": lambda text: text.encode("utf-32-le"),
    "latin-1": lambda text: text.encode("latin-1", errors="replace"),
    "invalid utf-8": lambda text: text.encode("utf-8").replace(b"hi", b"h\xff\xfe"),
    "gzip": lambda text: gzip.compress(text.encode("utf-8")),
    "bom": lambda text: b"\xef\xbb\xbf" + text.encode("utf-8"),
    "empty": lambda _: b"",
    "truncated": lambda text: text.encode("utf-8")[: len(text) // 2],
}
_CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-16",
    "application/json; charset=nonsense",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/json, text/plain",
]


@SETTINGS
@given(
    route=st.sampled_from(ROUTES),
    encoding=st.sampled_from(sorted(_ENCODINGS)),
    content_type=st.sampled_from(_CONTENT_TYPES),
    content_encoding=st.sampled_from([None, "gzip", "br", "identity"]),
)
def test_odd_content_types_and_encodings(
    http: httpx.Client, route: Route, encoding: str, content_type: str | None, content_encoding: str | None
) -> None:
    content = _ENCODINGS[encoding](json.dumps({**route.body, "user": "héllo"}, ensure_ascii=False))
    headers = {"content-type": content_type} if content_type else {}
    if content_encoding:
        headers["content-encoding"] = content_encoding
    _send(http, route, content, headers)


@SETTINGS
@given(
    path=st.one_of(
        st.text(max_size=40).map(lambda text: quote(text, safe="")),
        st.sampled_from(["%ED%A0%80", "%FF%FE", "%00", "a" * 5_000, "..%2F..", "tiny-glm/../../x"]),
    )
)
def test_hostile_model_ids(http: httpx.Client, path: str) -> None:
    route = Route("GET", "/v1/models/{model_id}", None, ())
    _check_answer(route, http.get("/v1/models/" + path))


def test_server_unchanged_after_everything(http: httpx.Client, reference_replies: list[str]) -> None:
    assert http.get("/health").status_code == 200
    assert _replies(http) == reference_replies
    tokenized = http.post("/tokenize", json={"messages": USER})
    assert tokenized.status_code == 200 and tokenized.json()["count"] > 0
