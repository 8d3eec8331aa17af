"""Choosing each sequence's next token with its own sampling parameters, inside a shared batch.

Every sampled sequence owns a `torch.Generator` seeded from its request, so the same seed and request give the
same text whatever else shares the batch, and in either engine (the sequential one chooses through this code
too). Plain greedy rows are decided together by one argmax; the rest row by row, on the device, and the whole
step's choices reach the host in one transfer: the only host sync a decode step needs.

A row whose logits are not finite (a broken model, an overflow) or whose parameters fail fails alone: its
choice is the exception, and the other rows of the batch go on.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

import torch

from serve_app.protocol.engine import SamplingParams

# torch.Generator.manual_seed takes any 64-bit pattern; the edge validates seeds as signed 64-bit integers, and
# anything else that reaches here is folded into that range rather than raised after a prefill.
_SEED_BITS = 2**64 - 1


class TokenConstraint(Protocol):
    """What the sampler needs of a grammar (`deployments.chat_engine.grammar.GrammarConstraint`)."""

    def forbid(self, logits: torch.Tensor) -> None: ...

    def advance(self, token_id: int) -> None: ...

    @property
    def complete(self) -> bool: ...


@dataclass(frozen=True)
class Choice:
    """A row's next token, with its log-probability and the most likely alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


Chosen = Choice | BaseException


class RowSampler:
    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
        constraint: TokenConstraint | None = None,
    ) -> None:
        """`params` must be resolved (`SamplingParams.resolve`): no field left to the model's defaults."""
        if None in (params.temperature, params.top_p, params.top_k, params.repetition_penalty):
            raise ValueError("sampling parameters must be resolved against the model's defaults first")
        self.params = params
        self.constraint = constraint
        self._temperature = float(params.temperature or 0.0)
        self._top_p = float(params.top_p or 1.0)
        self._top_k = int(params.top_k or 0)
        self._repetition_penalty = float(params.repetition_penalty or 1.0)
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self._generator.manual_seed(seed & _SEED_BITS)
        self._seen: torch.Tensor | None = None
        if self._repetition_penalty != 1.0:
            # HF's repetition penalty covers the prompt and the reply: every token id seen so far.
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt = torch.tensor([t for t in prompt_token_ids if 0 <= t < vocab_size], dtype=torch.long)
            self._seen[prompt.to(device)] = True
        self._bias: torch.Tensor | None = None
        if params.logit_bias:
            self._bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            for token, bias in params.logit_bias:
                if 0 <= token < vocab_size:
                    self._bias[token] = bias
        self._counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI's penalties cover the reply only.
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Decided by the batch's shared argmax: nothing changes this row's logits."""
        return (
            self.params.greedy
            and self._seen is None
            and self._counts is None
            and self._bias is None
            and self.constraint is None
            and not self.params.logprobs
        )

    @property
    def complete(self) -> bool:
        """The grammar (if any) accepts nothing more: the sequence must end."""
        return self.constraint is not None and self.constraint.complete

    def observe(self, token_id: int) -> None:
        """Record the token this row chose (call once per chosen token, end tokens included)."""
        if self._seen is not None:
            self._seen[token_id] = True
        if self._counts is not None:
            self._counts[token_id] += 1
        if self.constraint is not None:
            self.constraint.advance(token_id)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token from one row of logits ([vocab], float32, finite), as a 0-d tensor on the device."""
        logits = self.penalized(logits)
        if self.params.greedy:
            return torch.argmax(logits)
        logits = logits / self._temperature
        if self._top_k and self._top_k < logits.numel():
            kth = torch.topk(logits, self._top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self._top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Drop a token once the tokens before it already cover top_p; the first token always stays.
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= self._top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self._generator)[0]

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits after its bias, penalties and grammar: what temperature, top-k and top-p act on."""
        params = self.params
        if self._seen is None and self._counts is None and self._bias is None and self.constraint is None:
            return logits
        logits = logits.clone()
        if self._bias is not None:
            logits += self._bias
        if self._seen is not None:
            seen = logits[self._seen]
            penalty = self._repetition_penalty
            logits[self._seen] = torch.where(seen < 0, seen * penalty, seen / penalty)
        if self._counts is not None:
            logits -= params.frequency_penalty * self._counts
            logits -= params.presence_penalty * (self._counts > 0).float()
        if self.constraint is not None:
            self.constraint.forbid(logits)
        return logits


def choose_tokens(samplers: list[RowSampler], logits: torch.Tensor) -> list[Chosen]:
    """Next token for every row of `logits` ([rows, vocab] float32); a failing row gets its exception."""
    finite = torch.isfinite(logits).all(dim=-1)
    # Non-finite rows fail below; zeroed here so that no kernel sees NaN (on CUDA, multinomial would assert and
    # take the whole device context with it).
    logits = torch.where(finite[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    chosen = torch.argmax(logits, dim=-1)
    failed: dict[int, BaseException] = {}
    picks: dict[int, torch.Tensor] = {}
    for row, sampler in enumerate(samplers):
        if sampler.plain_greedy:
            continue
        try:
            picks[row] = sampler.choose(logits[row])
        except Exception as exc:  # noqa: BLE001 - this row's own failure (e.g. its grammar), reported to it alone
            failed[row] = exc
    if picks:
        rows = torch.tensor(list(picks), device=logits.device)
        chosen = chosen.index_put((rows,), torch.stack(list(picks.values())))
    tokens, is_finite = torch.stack([chosen, finite.long()]).tolist()  # the step's one host sync
    logprobs = _logprobs(samplers, logits, tokens)
    results: list[Chosen] = []
    for row, token in enumerate(tokens):
        if row in failed:
            results.append(failed[row])
        elif not is_finite[row]:
            results.append(FloatingPointError("the model gave non-finite logits for this sequence"))
        else:
            token_logprob, top = logprobs.get(row, (None, ()))
            results.append(Choice(int(token), token_logprob, top))
    return results


def _logprobs(
    samplers: list[RowSampler], logits: torch.Tensor, tokens: list[int]
) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]]:
    """Log-probabilities under the model's own distribution (before penalties and temperature), as OpenAI's."""
    rows = [row for row, sampler in enumerate(samplers) if sampler.params.logprobs]
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    log_probs = torch.log_softmax(logits[index], dim=-1)
    chosen = log_probs.gather(1, torch.tensor([[tokens[row]] for row in rows], device=logits.device))
    k = max(samplers[row].params.top_logprobs for row in rows)
    top_values, top_ids = torch.topk(log_probs, k, dim=-1) if k else (log_probs[:, :0], log_probs[:, :0])
    chosen_list, values, ids = chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist()
    out = {}
    for i, row in enumerate(rows):
        wanted = samplers[row].params.top_logprobs
        top = tuple((int(ids[i][j]), values[i][j]) for j in range(wanted))
        out[row] = (chosen_list[i], top)
    return out
