"""Choosing each sequence's next token with its own sampling parameters, inside a shared batch.

Every sampled sequence owns a `torch.Generator` seeded from its request, so the same seed and request give the
same text whatever else shares the batch. Greedy rows without a repetition penalty are decided together by one
argmax; the rest row by row (a batch holds tens of rows, so the loop is cheap next to the forward pass).
"""

from __future__ import annotations

import secrets

import torch

from serve_app.protocol.engine import SamplingParams


class RowSampler:
    def __init__(
        self, params: SamplingParams, prompt_token_ids: list[int], vocab_size: int, device: torch.device
    ) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self._seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            # HF's repetition penalty covers the prompt and the reply: every token id seen so far.
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(prompt_token_ids, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self._seen is None

    def observe(self, token_id: int) -> None:
        if self._seen is not None:
            self._seen[token_id] = True

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits ([vocab], float32)."""
        params = self.params
        if self._seen is not None:
            logits = logits.clone()
            seen = logits[self._seen]
            logits[self._seen] = torch.where(
                seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty
            )
        if params.greedy:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Drop a token once the tokens before it already cover top_p; the first token always stays.
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self._generator))


def choose_tokens(samplers: list[RowSampler], logits: torch.Tensor) -> list[int]:
    """Next token for every row of `logits` ([rows, vocab])."""
    chosen = torch.argmax(logits, dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if not sampler.plain_greedy:
            chosen[row] = sampler.choose(logits[row])
    return chosen
