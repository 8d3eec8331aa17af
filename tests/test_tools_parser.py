"""The tool-call parser and the streamed reply, in process, on the replies a model could write (hostile ones too).

A reply is a call only if all of it is declared tools' names, each followed by arguments its schema accepts (GLM-4's
JSON object, or ChatGLM3's `tool_call(...)` block of literals); anything else is the assistant's text. Nothing in a
reply is ever run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.protocol.openai_tools import FunctionCall, ToolDefinition
from serve_app.tools.parser import ToolCallParser, text_reply
from serve_app.tools.streaming import ToolReplyStream, call_deltas
from tests.hostile import SETTINGS
from tests.tool_model import WEATHER_TOOLS

TOOLS = [ToolDefinition.model_validate(tool) for tool in WEATHER_TOOLS]
PARSER = ToolCallParser(TOOLS)
PWNED = Path("/tmp/glm-serve-tools-pwned")

VALID = [
    ('get_weather\n{"city": "Paris"}', [("get_weather", {"city": "Paris"})]),
    ('get_time\n{"timezone": "Asia/Tokyo"}\n', [("get_time", {"timezone": "Asia/Tokyo"})]),
    (
        'get_weather\n{"city": "Paris"}\nget_weather\n{"city": "Tokyo"}',
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
    ),
    # Special tokens between two calls are dropped by decoding: the calls then follow each other directly.
    (
        'get_weather\n{"city": "A"}get_time\n{"timezone": "B"}',
        [("get_weather", {"city": "A"}), ("get_time", {"timezone": "B"})],
    ),
    # ChatGLM3's way, as it writes it (the content after its name line starts with a space).
    ("get_weather\n ```python\ntool_call(city='北京')\n```", [("get_weather", {"city": "北京"})]),
    (
        'get_time\n```python\ntool_call(timezone="Asia/Tokyo")\n```\n',
        [("get_time", {"timezone": "Asia/Tokyo"})],
    ),
    (
        'get_weather\n```python\ntool_call(city=\'A\')\n```\nget_time\n{"timezone": "B"}',
        [("get_weather", {"city": "A"}), ("get_time", {"timezone": "B"})],
    ),
    # A double-quoted string that is JSON means what JSON says (a forced call writes JSON values): an escaped
    # slash is a slash, and a surrogate pair one character; Python would keep the backslash, and two halves.
    ('get_weather\n ```python\ntool_call(city="A\\/B")\n```', [("get_weather", {"city": "A/B"})]),
    ('get_weather\n ```python\ntool_call(city="\\ud83d\\ude00")\n```', [("get_weather", {"city": "😀"})]),
    ("get_weather\n ```python\ntool_call(city='A\\'s')\n```", [("get_weather", {"city": "A's"})]),
    ('get_weather\n ```python\ntool_call(city="\\x41" "B")\n```', [("get_weather", {"city": "AB"})]),
]

HOSTILE = {
    "truncated JSON": 'get_weather\n{"city": "Par',
    "unclosed object": 'get_weather\n{"city": "Paris"',
    "unknown name": 'delete_everything\n{"path": "/"}',
    "name prefix": 'get_weath\n{"city": "Paris"}',
    "python literal dict": "get_weather\n{'city': 'Paris'}",
    "python None": 'get_weather\n{"city": None}',
    "python True": 'get_time\n{"timezone": True}',
    "python call syntax": "get_weather\ndict(city='Paris')",
    "chatglm3: unclosed block": "get_weather\n```python\ntool_call(city='Paris')",
    "chatglm3: another function": "get_weather\n```python\ndict(city='Paris')\n```",
    "chatglm3: positional argument": "get_weather\n```python\ntool_call('Paris')\n```",
    "chatglm3: **mapping": "get_weather\n```python\ntool_call(**{'city': 'Paris'})\n```",
    "chatglm3: an expression": "get_weather\n```python\ntool_call(city='Par' + 'is')\n```",
    "chatglm3: an f-string": "get_weather\n```python\ntool_call(city=f'{open(\"/etc/passwd\").read()}')\n```",
    "chatglm3: a second statement": f"get_weather\n```python\ntool_call(city='Paris'); open('{PWNED}', 'w')\n```",
    "chatglm3: code as a value": f"get_weather\n```python\ntool_call(city=__import__('os').system('touch {PWNED}'))\n```",
    "chatglm3: a name as a value": "get_weather\n```python\ntool_call(city=Paris)\n```",
    "chatglm3: schema: wrong type": "get_weather\n```python\ntool_call(city=7)\n```",
    "chatglm3: a lone surrogate": "get_weather\n```python\ntool_call(city='\\ud800')\n```",
    "chatglm3: a surrogate pair in Python": "get_weather\n```python\ntool_call(city='\\ud83d\\ude00')\n```",
    "chatglm3: a lone surrogate in JSON": 'get_weather\n```python\ntool_call(city="\\udc00")\n```',
    "chatglm3: syntax error": "get_weather\n```python\ntool_call(city='Paris'\n```",
    "eval would run it": f'get_weather\n__import__("os").system("touch {PWNED}")',
    "code inside the object": f'get_weather\n{{"city": __import__("os").system("touch {PWNED}")}}',
    "NaN": 'get_weather\n{"city": NaN}',
    "schema: missing required": 'get_weather\n{"town": "Paris"}',
    "schema: extra property": 'get_weather\n{"city": "Paris", "rm": "-rf"}',
    "schema: wrong type": 'get_weather\n{"city": 7}',
    "arguments not an object": 'get_weather\n["Paris"]',
    "trailing text": 'get_weather\n{"city": "Paris"} and then some',
    "no newline after the name": 'get_weather {"city": "Paris"}',
    "leading text": 'Sure! get_weather\n{"city": "Paris"}',
    "plain text": "\nIt is sunny.",
    "empty": "",
    "a second call truncated": 'get_weather\n{"city": "Paris"}\nget_weather\n{"ci',
}


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_calls_are_parsed(text: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    calls = PARSER.parse(text)
    assert calls is not None
    assert [(call.name, json.loads(call.arguments)) for call in calls] == expected


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_anything_else_is_text_and_never_runs(text: str) -> None:
    PWNED.unlink(missing_ok=True)
    assert PARSER.parse(text) is None
    assert not PWNED.exists()


def test_chatglm3_json_strings_are_read_where_they_are_written() -> None:
    """A node's column counts UTF-8 bytes: a JSON string after other text on its line, non-ASCII included, or on a
    line after a "\r\n", still reads with JSON's meaning."""
    parser = ToolCallParser(
        [ToolDefinition.model_validate({"type": "function", "function": {"name": "note"}})]
    )
    text = 'note\n ```python\ntool_call(title=\'北京\', body="a\\/b",\r\n tags=["\\ud83d\\ude00"])\n```'
    calls = parser.parse(text)
    assert calls is not None
    assert json.loads(calls[0].arguments) == {"title": "北京", "body": "a/b", "tags": ["😀"]}


def test_two_calls_without_parallel_calls_are_text() -> None:
    assert ToolCallParser(TOOLS, parallel=False).parse(VALID[2][0]) is None
    assert ToolCallParser(TOOLS, parallel=False).parse(VALID[0][0]) is not None


@pytest.mark.parametrize(
    "value",
    [
        "{1, 2}",
        "b'bytes'",
        "1e999",
        "-1e999",
        "1j",
        "...",
        "{1: 'a'}",
        "[x for x in 'ab']",
        "(lambda: 0)",
        "-'a'",
        "'\\ud800'",
        "{'\\udfff': 1}",
    ],
)
def test_chatglm3_values_must_be_json_literals_even_without_a_schema(value: str) -> None:
    free = ToolCallParser([ToolDefinition.model_validate({"type": "function", "function": {"name": "f"}})])
    assert free.parse(f"f\n```python\ntool_call(a={value})\n```") is None
    calls = free.parse("f\n```python\ntool_call(a=(1, -2.5), b={'k': [True, None]}, c=null, d=false)\n```")
    assert calls is not None and json.loads(calls[0].arguments) == {
        "a": [1, -2.5],
        "b": {"k": [True, None]},
        "c": None,
        "d": False,
    }


# What a model may write inside ChatGLM3's block: keywords with Python literals (escapes of every kind in their
# strings, numbers JSON cannot hold, containers), JSON's names, and text that is no Python at all.
_ESCAPES = st.sampled_from(
    ["\\ud83d", "\\udfff", "\\x00", "\\n", "\\\\", "\\U0001f600", "\\N{SNOWMAN}", "\\777"]
)
_STRING = st.lists(st.one_of(st.text(max_size=3), _ESCAPES), max_size=4).map(
    lambda parts: f"'{''.join(parts)}'"
)
_SCALAR = st.one_of(
    _STRING,
    st.sampled_from(
        ["1", "-2.5", "1e999", "-0", "0x1F", "1_000", "10**400", "None", "True", "null", "x", "..."]
    ),
)
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: f"[{', '.join(items)}]"),
        st.lists(st.tuples(_STRING, inner), max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"
        ),
    ),
    max_leaves=6,
)
_KEYWORDS = st.lists(st.tuples(st.sampled_from(["a", "b", "city"]), _VALUE), max_size=3).map(
    lambda keywords: ", ".join(f"{name}={value}" for name, value in keywords)
)


@SETTINGS
@given(arguments=st.one_of(_KEYWORDS, st.text(max_size=40)))
def test_any_chatglm3_block_is_a_call_the_answer_can_carry_or_text(arguments: str) -> None:
    free = ToolCallParser([ToolDefinition.model_validate({"type": "function", "function": {"name": "f"}})])
    calls = free.parse(f"f\n```python\ntool_call({arguments})\n```")
    for call in calls or []:
        FunctionCall(
            name=call.name, arguments=call.arguments
        )  # what the answer is built from: it must validate
        assert isinstance(json.loads(call.arguments), dict)


def test_a_schema_jsonschema_cannot_read_still_needs_an_object() -> None:
    odd = ToolDefinition.model_validate(
        {"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}
    )
    parser = ToolCallParser([odd])
    assert parser.parse('f\n{"a": 1}') is not None
    assert parser.parse("f\n[1]") is None


def _streamed(pieces: list[str]) -> tuple[list[str], str, list[tuple[str, str]]]:
    """What a stream sends per increment, what it sends at the end, and the calls as the SDK accumulates them."""
    stream = ToolReplyStream(PARSER)
    sent = [stream.feed(piece) for piece in pieces]
    held, calls = stream.finish()
    accumulated: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    for deltas in call_deltas(calls):
        for delta in deltas:
            if delta.id is not None:  # the first delta of a call: its id, type and name
                assert delta.type == "function" and delta.function.name and delta.index not in ids
                ids[delta.index] = delta.id
                accumulated[delta.index] = [delta.function.name, ""]
            accumulated[delta.index][1] += delta.function.arguments or ""
    assert len(set(ids.values())) == len(ids)
    return sent, held, [(name, arguments) for name, arguments in accumulated.values()]


def test_stream_sends_text_at_once_without_the_leading_newline() -> None:
    sent, held, calls = _streamed(["\nIt is", " sunny."])
    assert sent == ["It is", " sunny."] and held == "" and calls == []


def test_stream_holds_a_call_then_sends_it_as_deltas() -> None:
    text = VALID[2][0]
    sent, held, calls = _streamed([text[i : i + 5] for i in range(0, len(text), 5)])
    assert all(piece == "" for piece in sent) and held == ""
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Tokyo"}),
    ]


def test_stream_releases_text_once_it_cannot_be_a_call() -> None:
    sent, held, calls = _streamed(["get_wea", "ther is nice", " today"])
    assert sent == ["", "get_weather is nice", " today"] and held == "" and calls == []


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_stream_sends_hostile_replies_as_text(text: str) -> None:
    sent, held, calls = _streamed([text[i : i + 3] for i in range(0, len(text), 3)])
    assert calls == []
    assert "".join(sent) + held == text_reply(text)
