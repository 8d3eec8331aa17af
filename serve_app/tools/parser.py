"""Reading tool calls out of a model's reply, GLM-4's and ChatGLM3's ways: data only, never code.

Both chat templates end the prompt with a bare `<|assistant|>`. The model then writes either a newline and its
text, or a call: the function's name, a newline, and the arguments. GLM-4 writes them as a JSON object; ChatGLM3
as a Python block, "```python\ntool_call(city='Paris')\n```", which its demo ran with `eval`. Here the block is
read as a syntax tree whose keyword values must all be literals (strings, numbers, booleans, None, lists, dicts):
nothing in it is ever run. Several calls follow one another, each on its own lines. A reply is a call only if every
part of it is a declared tool's name followed by arguments that its `parameters` schema accepts. Anything else (a
truncated object, an unknown name, code) is the assistant's text, finished with "stop".
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import jsonschema

from serve_app.protocol.openai_tools import ToolDefinition

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BLANKS = " \t\r\n"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _no_constants(name: str) -> Any:
    # json accepts NaN and Infinity, which are not JSON: a reply holding them is not a valid call.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _validator(tool: ToolDefinition) -> jsonschema.protocols.Validator | None:
    schema = tool.function.parameters
    if not schema:
        return None
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError:
        return None  # a schema jsonschema cannot read: the arguments need only be an object
    return validator_class(schema)


class ToolCallParser:
    """Parses replies against one request's tools (the schemas are compiled once per request)."""

    def __init__(self, tools: list[ToolDefinition], parallel: bool = True) -> None:
        self._validators = {tool.function.name: _validator(tool) for tool in tools}
        self._parallel = parallel

    @property
    def names(self) -> set[str]:
        return set(self._validators)

    def may_start_call(self, text: str) -> bool:
        """Could a reply that starts with `text` still turn out to be a call? (A call starts with a tool's name.)"""
        first_line, newline, _ = text.partition("\n")
        if newline:
            return first_line in self._validators
        return any(name.startswith(first_line) for name in self._validators)

    def parse(self, text: str) -> list[ParsedCall] | None:
        """The calls the whole reply makes, or None if it is not (entirely) valid calls."""
        calls: list[ParsedCall] = []
        position = 0
        while position < len(text):
            name_match = _NAME.match(text, position)
            if name_match is None or name_match.group() not in self._validators:
                return None
            position = name_match.end()
            if not text.startswith("\n", position):
                return None
            start = _skip_blanks(text, position)
            read = _read_chatglm3_call if text.startswith(_CHATGLM3_OPEN, start) else _read_json_object
            found = read(text, start)
            if found is None:
                return None
            arguments, arguments_json, position = found
            if not self._accepts(name_match.group(), arguments):
                return None
            calls.append(ParsedCall(name_match.group(), arguments_json))
            position = _skip_blanks(text, position)  # calls are separated, and the reply may end, by blanks
        if not calls or (len(calls) > 1 and not self._parallel):
            return None
        return calls

    def _accepts(self, name: str, arguments: dict[str, Any]) -> bool:
        validator = self._validators[name]
        return validator is None or validator.is_valid(arguments)


def _read_json_object(text: str, start: int) -> tuple[dict[str, Any], str, int] | None:
    """GLM-4's arguments: a JSON object, kept as the model's own text."""
    try:
        arguments, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(arguments, dict):
        return None
    return arguments, text[start:end], end


_CHATGLM3_OPEN = "```python\n"
_CHATGLM3_CLOSE = "\n```"
# What ChatGLM3's own history turns hold (the chat template writes them so): JSON's names, for nested values.
_JSON_NAMES = {"true": True, "false": False, "null": None}


def _read_chatglm3_call(text: str, start: int) -> tuple[dict[str, Any], str, int] | None:
    """ChatGLM3's arguments: `tool_call(name=literal, ...)` alone in a Python block, as JSON text."""
    body = start + len(_CHATGLM3_OPEN)
    close = text.find(_CHATGLM3_CLOSE, body)
    if close < 0:
        return None
    try:
        # A reply's invalid escapes ('\q') are its text's business, not the log's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Python reads "\r\n" and "\r" in source as "\n" (strings included): the same code, one kind of line end.
            source = text[body:close].strip().replace("\r\n", "\n").replace("\r", "\n")
            tree = ast.parse(source, mode="eval").body
        if not (
            isinstance(tree, ast.Call)
            and isinstance(tree.func, ast.Name)
            and tree.func.id == "tool_call"
            and not tree.args
        ):
            return None
        arguments: dict[str, Any] = {}
        literals = _Literals(source)
        for keyword in tree.keywords:
            if keyword.arg is None:  # **mapping
                return None
            arguments[keyword.arg] = literals.read(keyword.value)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return arguments, json.dumps(arguments, ensure_ascii=False), close + len(_CHATGLM3_CLOSE)


class _Literals:
    """The JSON values that literal nodes of `source` write; ValueError for anything else (names, calls,
    operators, sets...).

    A double-quoted string that is also a JSON string means what JSON says: a forced call's values are JSON
    (tools/constraints.py), and JSON's escaped slash and surrogate pairs read differently in Python."""

    def __init__(self, source: str) -> None:
        # Nodes give their place as line numbers and UTF-8 byte columns: each line encoded once, so that reading
        # a block of many strings stays linear (ast.get_source_segment splits the whole source per call).
        self._lines = [line.encode() for line in source.split("\n")]

    def read(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self._string(node)
        if isinstance(node, ast.Constant) and (
            node.value is None or isinstance(node.value, (bool, int, float))
        ):
            if isinstance(node.value, float) and not math.isfinite(node.value):  # 1e999: not JSON
                raise ValueError("not a finite number")
            return node.value
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)
        ):
            return -self.read(node.operand)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.read(element) for element in node.elts]
        if isinstance(node, ast.Dict):
            if not all(isinstance(key, ast.Constant) and isinstance(key.value, str) for key in node.keys):
                raise ValueError("a dict key that is not a string")  # a None key is **mapping
            return {self._string(key): self.read(value) for key, value in zip(node.keys, node.values)}  # type: ignore[arg-type]
        if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
            return _JSON_NAMES[node.id]
        raise ValueError(f"not a literal: {ast.dump(node)[:40]}")

    def _string(self, node: ast.Constant) -> str:
        if node.lineno == node.end_lineno and node.end_col_offset is not None:  # a JSON string is one line
            line = self._lines[node.lineno - 1]
            written = line[node.col_offset : node.end_col_offset].decode(errors="replace")
            if written.startswith('"'):
                try:
                    value = json.loads(written)
                except ValueError:
                    pass  # Python's own escapes, or strings written side by side
                else:
                    if isinstance(value, str):
                        return _text(value)
        return _text(str(node.value))


def _text(value: str) -> str:
    """A string that is text: Python's escapes can write a lone surrogate, which no answer can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("a lone surrogate") from exc
    return value


def _skip_blanks(text: str, position: int) -> int:
    while position < len(text) and text[position] in _BLANKS:
        position += 1
    return position


def text_reply(text: str) -> str:
    """A reply that is text: GLM-4 writes a newline first, after the bare assistant tag; it is no part of it."""
    return text.removeprefix("\n")
