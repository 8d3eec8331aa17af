"""Constrained decoding: an llguidance grammar decides which tokens a sequence may take next.

The ingress builds the grammar (`json_schema_grammar`, `lark_grammar`) and checks it there, with no tokenizer, so
a schema the engine cannot enforce is a 400 before any model work. A chat replica builds one `grammar_tokenizer`
per model and one `GrammarConstraint` per constrained sequence; the sampler calls `forbid` on the sequence's logits
row before choosing, `advance` with the token chosen, and ends the sequence once the grammar is `complete`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

if TYPE_CHECKING:
    import torch
    from llguidance._lib import JsonCompileOptions


# JSON as `json.dumps` writes it: no free whitespace, so a model cannot spend its tokens on blanks (a flexible
# grammar let the random tiny model write dozens of newlines between two keys).
COMPACT_JSON: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class UnenforceableGrammar(ValueError):
    """A schema or grammar that llguidance cannot enforce; the message says why."""


def _checked(grammar: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise UnenforceableGrammar(messages[0] if messages else "the grammar is invalid")
    return grammar


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON text valid for `schema`; UnenforceableGrammar if llguidance cannot enforce it."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT_JSON)
    except ValueError as exc:
        raise UnenforceableGrammar(str(exc)) from None
    return _checked(grammar)


def lark_grammar(lark: str) -> str:
    """A Lark grammar (llguidance's dialect, `%json {...}` included; put COMPACT_JSON under a schema's
    "x-guidance" key for compact JSON there), checked."""
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark))


def grammar_tokenizer(hf_tokenizer: Any, end_token_ids: list[int] | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of a fast Hugging Face tokenizer (~1 s to build: once per replica and model).

    `end_token_ids`: the tokens that end a reply, which a complete grammar allows and nothing else; by default
    eos and a GLM's turn ends (`<|user|>`, `<|observation|>`: after a call GLM-4 writes the latter, and a grammar
    that forbade it would leave the model only worse ways to go on).
    """
    import llguidance.hf

    from deployments.model_files import end_token_ids as turn_end_ids

    ends = end_token_ids or turn_end_ids(None, hf_tokenizer)
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=ends or None)


class GrammarConstraint:
    """One sequence's position in its grammar."""

    def __init__(self, grammar: str, ll_tokenizer: llguidance.LLTokenizer) -> None:
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        self._vocab_size = ll_tokenizer.vocab_size
        if self._matcher.is_error():
            raise UnenforceableGrammar(self._matcher.get_error())

    def allowed(self) -> np.ndarray:
        """A bool per token id of the tokenizer: may it come next?"""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(words, bitorder="little")[: self._vocab_size].astype(bool)

    def forbid(self, logits_row: torch.Tensor) -> None:
        """Set to -inf, in place, every logit the grammar does not allow next (ids past the tokenizer's too)."""
        import torch

        allowed = torch.from_numpy(self.allowed()).to(logits_row.device)
        vocab = min(self._vocab_size, logits_row.shape[-1])
        logits_row[:vocab].masked_fill_(~allowed[:vocab], float("-inf"))
        logits_row[vocab:] = float("-inf")

    def advance(self, token_id: int) -> None:
        # A token outside the mask puts the matcher in its error state, which stops it: the sequence then ends
        # (`complete`) instead of running on unconstrained.
        self._matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """Nothing but an end token can follow (or the matcher failed): the sequence is done."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())
