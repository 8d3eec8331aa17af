"""Reading tool calls out of a model's reply, GLM-4's way: data only, never code.

GLM-4's chat template ends the prompt with a bare `<|assistant|>`. The model then writes either a newline and its
text, or a call: the function's name, a newline, and the arguments as a JSON object (several calls follow one
another, each on its own lines). ChatGLM3's demo ran `eval` on such output; here a reply is a call only if every
part of it is a declared tool's name followed by JSON that its `parameters` schema accepts. Anything else (a
truncated object, an unknown name, Python literals, code) is the assistant's text, finished with "stop".
"""

from __future__ import annotations

import json
import re
import uuid
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
            try:
                arguments, position = _DECODER.raw_decode(text, start)
            except ValueError:
                return None
            if not isinstance(arguments, dict) or not self._accepts(name_match.group(), arguments):
                return None
            calls.append(ParsedCall(name_match.group(), text[start:position]))  # the model's own JSON text
            position = _skip_blanks(text, position)  # calls are separated, and the reply may end, by blanks
        if not calls or (len(calls) > 1 and not self._parallel):
            return None
        return calls

    def _accepts(self, name: str, arguments: dict[str, Any]) -> bool:
        validator = self._validators[name]
        return validator is None or validator.is_valid(arguments)


def _skip_blanks(text: str, position: int) -> int:
    while position < len(text) and text[position] in _BLANKS:
        position += 1
    return position


def text_reply(text: str) -> str:
    """A reply that is text: GLM-4 writes a newline first, after the bare assistant tag; it is no part of it."""
    return text.removeprefix("\n")
