"""The contract between the ingress and the deployments.

These are the only types that cross a `DeploymentHandle`: the ingress validates client input into them once, and
the deployments trust them. Plain dataclasses keep the per-request pickling cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FinishReason = Literal["stop", "length"]

# Sampling runs in float32: a temperature, repetition_penalty or top_p below this turns into inf or 0 there
# (a fuzzed 5e-324 gave NaN probabilities and failed the whole batch), so they are raised to it; a temperature
# that small samples like greedy anyway and becomes greedy, as in vLLM.
_SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.temperature < _SAMPLING_EPS:
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_p", max(self.top_p, _SAMPLING_EPS))
        object.__setattr__(self, "repetition_penalty", max(self.repetition_penalty, _SAMPLING_EPS))

    @property
    def greedy(self) -> bool:
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
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class GenerationChunk:
    """Text generated since the previous chunk; `finish_reason` is set on the last chunk only.

    `text` never ends inside a multi-byte character and never contains (part of) a stop string, so the
    concatenated chunks are exactly the final text.
    """

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ChatPrompt:
    """A chat rendered by the model's chat template and tokenized, with the window it must fit in."""

    token_ids: list[int]
    max_model_len: int


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32, one row per input, in input order
    token_counts: list[int] = field(default_factory=list)
