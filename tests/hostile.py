"""Hostile request bodies for tests/test_hostile_input.py: valid bodies per route, and values no client should send.

A case is a valid body with one field (or the whole body) replaced, removed, or joined by an unknown one; values
are integers far beyond 64 bits, NaN and infinities, empty and huge strings and lists, lone surrogates, deep
JSON and wrong types. `encode` writes what `json.dumps` cannot (NaN, lone surrogates as escapes, deep nesting,
integers with thousands of digits) as the raw JSON text a client can send anyway.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# About a minute for the whole suite here; GLM_SERVE_HOSTILE_EXAMPLES=500 for a long, randomized run.
_LONG_RUN = os.environ.get("GLM_SERVE_HOSTILE_EXAMPLES")
SETTINGS = settings(
    max_examples=int(_LONG_RUN) if _LONG_RUN else 25,
    derandomize=not _LONG_RUN,  # CI sees the same cases each run; a long run explores
    deadline=None,  # a chat answer's time is the model's, not a property of the input
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

USER = [{"role": "user", "content": "hi"}]
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Raw:
    """JSON text placed verbatim where the value would go (deep nesting, numbers json.dumps cannot write)."""

    text: str


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    body: Any
    fields: tuple[Path, ...]
    seed_shape: bool = False  # errors as the seed servers gave them ({"detail"}), not OpenAI's envelope

    variant: str = ""  # which of a path's bodies: dialects, streaming

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}" + (f" ({self.variant})" if self.variant else "")


_SAMPLING = ("temperature", "top_p", "max_tokens")
ROUTES = [
    Route(
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-glm", "messages": USER, "max_tokens": 2, "temperature": 0},
        (
            ("model",),
            ("messages",),
            ("messages", 0),
            ("messages", 0, "role"),
            ("messages", 0, "content"),
            ("messages", 0, "name"),
            ("messages", 0, "metadata"),
            *[(k,) for k in _SAMPLING],
            ("max_completion_tokens",),
            ("top_k",),
            ("repetition_penalty",),
            ("presence_penalty",),
            ("frequency_penalty",),
            ("n",),
            ("seed",),
            ("stop",),
            ("stream",),
            ("stream_options",),
            ("user",),
        ),
    ),
    Route(
        "POST",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.7,
            "seed": 1,
        },
        (
            ("messages", 0, "content", 0),
            ("messages", 0, "content", 0, "text"),
            ("messages", 0, "content", 0, "type"),
            ("stream_options", "include_usage"),
            ("seed",),
            ("stop",),
        ),
        variant="stream, text parts",
    ),
    Route(
        "POST",
        "/v1/embeddings",
        {"input": ["hello", "world"]},
        (("model",), ("input",), ("input", 0), ("encoding_format",), ("dimensions",), ("user",)),
    ),
    Route(
        "POST",
        "/tokenize",
        {"model": "tiny-glm", "messages": USER, "add_generation_prompt": True, "return_token_strs": True},
        (
            ("model",),
            ("messages",),
            ("messages", 0, "content"),
            ("add_generation_prompt",),
            ("return_token_strs",),
            ("prompt",),
        ),
        variant="messages",
    ),
    Route(
        "POST",
        "/tokenize",
        {
            "messages": [*USER, {"role": "assistant", "content": "The answer is"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        (
            ("messages", 1, "content"),
            ("messages", 1, "role"),
            ("continue_final_message",),
            ("add_special_tokens",),
        ),
        variant="continue the final message",
    ),
    Route(
        "POST",
        "/tokenize",
        {"prompt": "hello", "add_special_tokens": False},
        (("prompt",), ("add_special_tokens",), ("messages",)),
        variant="prompt",
    ),
    Route(
        "POST",
        "/tokenize",
        {"prompt": "hello", "max_tokens": 8},
        (("prompt",), ("max_tokens",), ("model",)),
        variant="GLM-API",
    ),
    Route("POST", "/detokenize", {"tokens": [5, 6, 7]}, (("model",), ("tokens",), ("tokens", 0))),
    Route(
        "POST",
        "/chat",
        {"messages": USER, "max_tokens": 2, "temperature": 0, "stream": False},
        (
            ("messages",),
            ("messages", 0, "role"),
            ("messages", 0, "content"),
            ("messages", 0, "metadata"),
            ("messages", 0, "tools"),
            ("model",),
            ("stream",),
            ("chunk",),
            ("repetition_penalty",),
            *[(k,) for k in _SAMPLING],
        ),
        seed_shape=True,
        variant="GLM-API",
    ),
    Route(
        "POST",
        "/chat",
        {"query": "hi", "history": [["a", "b"]], "max_tokens": 2, "temperature": 0},
        (("query",), ("history",), ("history", 0), ("history", 0, 0), ("model",), *[(k,) for k in _SAMPLING]),
        seed_shape=True,
        variant="web demo",
    ),
    Route(
        "POST",
        "/stream",
        {"query": "hi", "history": [["a", "b"]], "max_tokens": 2, "temperature": 0},
        (("query",), ("history",), ("history", 0, 1), ("model",), *[(k,) for k in _SAMPLING]),
        seed_shape=True,
    ),
    Route(
        "POST", "/embedding", {"prompt": ["hello"]}, (("model",), ("prompt",), ("prompt", 0)), seed_shape=True
    ),
]

_LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

HOSTILE_VALUES: st.SearchStrategy[Any] = st.one_of(
    # integers: far beyond 64 bits, at the edges, as floats
    st.integers(min_value=2**63, max_value=2**400),
    st.integers(min_value=-(2**400), max_value=-(2**63) - 1),
    st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, -1, 0, 1, 10**30, 1e308, -1e308, 5e-324, 1e-320]),
    st.builds(lambda digits: Raw("9" * digits), st.integers(4301, 20_000)),  # past Python's int parse limit
    st.sampled_from([Raw("1e999"), Raw("-1e999"), Raw("1E400"), Raw("-0"), Raw("0.0e-400")]),
    # non-finite floats (Python's json reads NaN and Infinity)
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    # strings: empty, huge, lone surrogates, marker text, any text
    st.just(""),
    st.just("x" * 300_000),
    st.builds(
        lambda a, s, b: a + s + b, st.text(max_size=8), st.sampled_from(_LONE_SURROGATES), st.text(max_size=8)
    ),
    st.sampled_from(["<|user|>", "[gMASK]<sop>", "<|endoftext|>", "\x00", "\U000f0000", "\ufeff", "🙂" * 50]),
    st.text(max_size=30),
    # lists: empty, huge, wrong items; nesting deep enough to hit recursion limits
    st.just([]),
    st.just(["x"] * 5_000),
    st.just([1] * 20_000),
    st.lists(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)), max_size=5),
    st.builds(lambda depth: Raw("[" * depth + "]" * depth), st.integers(50, 100_000)),
    st.builds(lambda depth: Raw('{"a":' * depth + "1" + "}" * depth), st.integers(50, 100_000)),
    # wrong types
    st.none(),
    st.booleans(),
    st.just({}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _placeholder(index: int) -> str:
    return f"__raw_{index}__"


def encode(body: Any) -> bytes:
    """The JSON text of `body`: NaN/Infinity as Python writes them, lone surrogates as \\u escapes, `Raw` verbatim."""
    raws: list[Raw] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value)
            return _placeholder(len(raws) - 1)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(body), allow_nan=True, ensure_ascii=True)
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(_placeholder(index)), raw.text, 1)
    return text.encode("ascii")


def _replaced(body: Any, path: Path, value: Any, remove: bool) -> Any:
    if not path:
        return value
    body = json.loads(json.dumps(body))  # a copy
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if remove:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return body


@st.composite
def hostile_bodies(draw: st.DrawFn, route: Route) -> Any:
    """The route's valid body with one field (or all of it) replaced or removed, or an unknown field added."""
    action = draw(st.sampled_from(["replace"] * 8 + ["remove", "unknown", "whole"]))
    if action == "whole":
        return draw(HOSTILE_VALUES)
    if action == "unknown":
        return {**route.body, draw(st.text(min_size=1, max_size=10)): draw(HOSTILE_VALUES)}
    path = draw(st.sampled_from(route.fields))
    if action == "remove":
        try:
            return _replaced(route.body, path, None, remove=True)
        except (KeyError, IndexError):
            return route.body
    return _replaced(route.body, path, draw(HOSTILE_VALUES), remove=False)
