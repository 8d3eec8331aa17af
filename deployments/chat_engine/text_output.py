"""Token ids in, exact text increments out.

`IncrementalDetokenizer` decodes a small sliding window of ids (as vLLM does) and holds text back while it ends
in an incomplete character (U+FFFD), so no increment ever holds half a character; byte sequences that can never
form a character (a model may emit them) are dropped rather than sent as U+FFFD. `StopStringMatcher` holds back
any tail that could still become a stop string, so the stop string itself is never sent. `TextOutput` joins them:
the increments it returns, concatenated, are exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first generated one, so tokenizers that drop a leading space when a
# token is decoded alone (sentencepiece) still decode the first generated token as they will in context.
_PROMPT_CONTEXT = 4


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        """Return the text that `token_ids` completes; empty while a character is still incomplete."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held once generation ends, less any incomplete trailing character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        window_text = self._decode(self._ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or (window_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window_text[len(prefix_text) :].replace(_REPLACEMENT, "")


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop string was found)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            safe, self._pending = self._pending[: min(hits)], ""
            return safe, True
        held = self._held_tail_length()
        cut = len(self._pending) - held
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, False

    def _held_tail_length(self) -> int:
        longest = min(len(self._pending), max(len(s) for s in self._stops) - 1)
        for length in range(longest, 0, -1):
            tail = self._pending[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


class TextOutput:
    """The text side of one sequence: feed generated ids, get increments and whether a stop string ended it."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], stops: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = StopStringMatcher(stops)
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        return self.add_text(self._detokenizer.add(token_ids))

    def finish(self) -> str:
        """The held-back tail once generation ends; an incomplete trailing character is dropped."""
        tail = self.add_text(self._detokenizer.flush())
        return tail if self.stopped else tail + self._stops.flush()

    def add_text(self, text: str) -> str:
        if self.stopped:
            return ""
        text, self.stopped = self._stops.feed(text)
        return text
