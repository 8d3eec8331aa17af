"""A streamed reply to a request with tools: text passes through as soon as it cannot be a call, a call is held.

A call's arguments are only known to be a valid call once the reply ends (the JSON may be cut short, the schema
may refuse it), and a streamed fragment cannot be taken back. So a reply that may still be a call is held; at
its end it is sent as `delta.tool_calls` (per call: index, id, type and name first, then argument fragments, as
the `openai` SDK's stream helpers accumulate them), or, if it is no valid call, as the text it is.
"""

from __future__ import annotations

from serve_app.protocol.openai_tools import FunctionCallDelta, ToolCallDelta
from serve_app.tools.parser import ParsedCall, ToolCallParser, new_call_id, text_reply

_ARGUMENT_FRAGMENT_CHARS = 32


class ToolReplyStream:
    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._held = ""
        self._passing = False  # decided: text
        self._started = False  # some text was sent already

    def feed(self, text: str) -> str:
        """The text to send now for this increment ("" while the reply may still be a call)."""
        if self._passing:
            return text
        self._held += text
        if self._parser.may_start_call(self._held):
            return ""
        self._passing = True
        return self._release()

    def _release(self) -> str:
        text, self._held = self._held, ""
        if not self._started:
            self._started = True
            text = text_reply(text)
        return text

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """At the reply's end: the text still held, or the calls it makes."""
        if self._passing:
            return "", []
        calls = self._parser.parse(self._held)
        if calls is not None:
            return "", calls
        return self._release(), []


def call_deltas(calls: list[ParsedCall]) -> list[list[ToolCallDelta]]:
    """The `delta.tool_calls` of successive chunks: each call's header, then its arguments in fragments."""
    deltas: list[list[ToolCallDelta]] = []
    for index, call in enumerate(calls):
        header = FunctionCallDelta(name=call.name, arguments="")
        deltas.append([ToolCallDelta(index=index, id=new_call_id(), type="function", function=header)])
        for start in range(0, len(call.arguments), _ARGUMENT_FRAGMENT_CHARS):
            fragment = call.arguments[start : start + _ARGUMENT_FRAGMENT_CHARS]
            deltas.append([ToolCallDelta(index=index, function=FunctionCallDelta(arguments=fragment))])
    return deltas
