"""The contract between the ingress and the deployments.

These are the only types that cross a `DeploymentHandle`: the ingress validates client input into them once, and
the deployments trust them. Plain dataclasses keep the per-request pickling cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

FinishReason = Literal["stop", "length"]

# Sampling runs in float32: a temperature, repetition_penalty or top_p below this turns into inf or 0 there
# (a fuzzed 5e-324 gave NaN probabilities and failed the whole batch), so they are raised to it; a temperature
# that small samples like greedy anyway and becomes greedy, as in vLLM.
_SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request that leaves a sampling field out gets: the model's own `generation_config`, else OpenAI's."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence chooses its tokens. None in temperature, top_p, top_k or repetition_penalty: the model's
    default (`GenerationDefaults`), filled in by the chat replica with `resolve` before generation starts."""

    max_tokens: int
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 means no top-k cut
    repetition_penalty: float | None = None  # HF's: over the prompt and the reply, divides positive logits
    # OpenAI's: over the reply only, subtracted from the logits (presence once, frequency per occurrence).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's logit_bias: (token id, bias added to its logit) pairs; -100 bans a token, 100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False  # return each chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives at each position
    # An llguidance grammar (the JSON that llguidance.LLMatcher.grammar_from_json_schema / grammar_from_lark
    # give): decoding is constrained to it, and the sequence ends ("stop") once the grammar is complete.
    grammar: str | None = None

    def resolve(self, defaults: GenerationDefaults) -> SamplingParams:
        """These parameters with every left-out field taken from the model's defaults, and the float32 guards."""
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = defaults.top_p if self.top_p is None else self.top_p
        penalty = defaults.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
        return replace(
            self,
            temperature=0.0 if temperature < _SAMPLING_EPS else temperature,
            top_p=max(top_p, _SAMPLING_EPS),
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            repetition_penalty=max(penalty, _SAMPLING_EPS),
        )

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always chosen (only meaningful once resolved)."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # When the ingress took the request (time.time()): a replica's queue deadline counts from it.
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before sampling parameters), with the `top`
    most likely alternatives at that position (most likely first), as OpenAI's `logprobs.content` entries.
    `token` is its text decoded alone (U+FFFD for a part of a character); `token_bytes` the bytes it holds."""

    token: str
    logprob: float
    token_bytes: bytes
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class GenerationChunk:
    """Text generated since the previous chunk; `finish_reason` is set on the last chunk only.

    `text` never ends inside a multi-byte character and never contains (part of) a stop string, so the
    concatenated chunks are exactly the final text. `logprobs` (when asked for) has one entry per token chosen
    since the previous chunk, end token included.
    """

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None


# How a model's chat template writes a tool call after the function's name and a newline: GLM-4's JSON object of
# the arguments, or ChatGLM3's Python block "```python\ntool_call(key=value, ...)\n```".
CallSyntax = Literal["json", "python"]


@dataclass(frozen=True)
class ChatPrompt:
    """A chat rendered by the model's chat template and tokenized, with the window it must fit in and the way the
    template writes tool calls (a forced call is made to follow it)."""

    token_ids: list[int]
    max_model_len: int
    call_syntax: CallSyntax = "json"


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32, one row per input, in input order
    token_counts: list[int] = field(default_factory=list)
