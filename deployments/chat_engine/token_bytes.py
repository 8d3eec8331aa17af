"""A generated token as OpenAI's logprobs name it: its text, and its own bytes.

Decoded alone, a token that holds part of a character reads as U+FFFD, whose UTF-8 says nothing of the part the
token holds. Its bytes come from the vocabulary instead: byte-level BPE (GLM-4's tokenizers) spells each byte as
one character of a fixed alphabet, and SentencePiece (ChatGLM3's) writes a space as `▁` and a byte it has no piece
for as `<0xNN>`. Joined, the bytes of a reply's tokens are then its text's UTF-8, which is what OpenAI's `bytes`
are for.

Not llguidance's `LLTokenizer.decode_bytes` (grammar.py builds one per replica for constrained decoding): it keeps
byte 0xFF as its mark of a special token and spells the byte-level token that is that byte as b"" (the tiny GLM's
id 194), it reads fast tokenizers only, and it takes ~0.5 s to build for ChatGLM3's vocabulary against ~0.1 s here.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_PIECE = "\u2581"


class TokenSpeller:
    """One per replica: the tokenizer's decoder is read once, and each token is spelled once, when first asked."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # Added tokens (the control tokens) are their own text, not vocabulary pieces.
        self._added = frozenset(getattr(tokenizer, "added_tokens_decoder", {}))
        decoders = _decoder_steps(tokenizer)
        self._byte_alphabet = _byte_alphabet() if "ByteLevel" in decoders else None
        self._byte_fallback = "ByteFallback" in decoders
        self._spaces = "Metaspace" in decoders or _SPACE_PIECE in decoders
        self._spelled: dict[int, tuple[str, bytes]] = {}

    def spell(self, token_id: int) -> tuple[str, bytes]:
        """The token's text decoded alone, and its bytes."""
        spelled = self._spelled.get(token_id)
        if spelled is None:
            text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
            spelled = self._spelled[token_id] = (text, self._bytes(token_id, text))
        return spelled

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = None if token_id in self._added else self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_alphabet is not None and all(char in self._byte_alphabet for char in piece):
                return bytes(self._byte_alphabet[char] for char in piece)
            byte_piece = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
            if byte_piece is not None:
                return bytes([int(byte_piece[1], 16)])
            if self._spaces:
                return piece.replace(_SPACE_PIECE, " ").encode()
        # Any other tokenizer: the text decoded alone (exact for every token that holds whole characters).
        return text.encode("utf-8", "surrogatepass")


def _decoder_steps(tokenizer: Any) -> set[str]:
    """The kinds of step in the fast tokenizer's decoder, and the strings its Replace steps replace."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: set[str] = set()

    def walk(step: Any) -> None:
        if isinstance(step, dict):
            if isinstance(step.get("type"), str):
                found.add(step["type"])
            if step.get("type") == "Replace" and isinstance(step.get("pattern"), dict):
                found.update(value for value in step["pattern"].values() if isinstance(value, str))
            for value in step.values():
                walk(value)
        elif isinstance(step, list):
            for value in step:
                walk(value)

    walk(json.loads(backend.to_str()).get("decoder"))
    return found


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: character -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}
