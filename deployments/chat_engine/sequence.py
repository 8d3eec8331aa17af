"""One request's generation, token by token, as both engines run it: what it emits and when it ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deployments.chat_engine.sampling import Choice, RowSampler
from deployments.chat_engine.text_output import TextOutput
from deployments.chat_engine.token_bytes import TokenSpeller
from serve_app.protocol.engine import FinishReason, GenerationChunk, TokenLogprob

if TYPE_CHECKING:
    from deployments.chat_engine.jobs import Job


class Sequence:
    """A request's sampler, its text, and where it stands. `accept` takes each chosen token; once `done`, the
    finishing chunk has been emitted and the sequence takes nothing more."""

    def __init__(
        self,
        job: Job,
        sampler: RowSampler,
        tokenizer: Any,
        end_ids: frozenset[int],
        speller: TokenSpeller | None = None,
    ) -> None:
        request = job.request
        self.job = job
        self.sampler = sampler
        self._speller = speller
        self._output = TextOutput(tokenizer, request.prompt_token_ids, request.sampling.stop)
        self._end_ids = end_ids
        self._logprobs: list[TokenLogprob] | None = [] if request.sampling.logprobs else None
        self.completion_tokens = 0
        self.last_token = -1
        self.done = False

    @property
    def stopped(self) -> bool:
        """A stop string or the grammar's end was reached: the text is complete."""
        return self._output.stopped or self.sampler.complete

    def accept(self, choice: Choice) -> None:
        """Take the token chosen for this sequence; emit its text, or finish."""
        token = choice.token
        self.completion_tokens += 1
        self.sampler.observe(token)
        if self._logprobs is not None:
            self._logprobs.append(self._token_logprob(choice))
        if token in self._end_ids:
            return self.finish("stop")
        text = self._output.add([token])
        if text:
            self.job.emit(GenerationChunk(text, self.completion_tokens, None, self._take_logprobs()))
        if self.stopped:
            return self.finish("stop")
        if self.completion_tokens >= self.job.request.sampling.max_tokens:
            return self.finish("length")
        self.last_token = token

    def fail(self, exc: BaseException) -> None:
        """End this sequence with an error, told to its client alone."""
        self.done = True
        self.job.emit(exc)

    def finish(self, reason: FinishReason) -> None:
        self.done = True
        self.job.emit(
            GenerationChunk(self._output.finish(), self.completion_tokens, reason, self._take_logprobs())
        )

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if self._logprobs is None:
            return None
        taken, self._logprobs = self._logprobs, []
        return taken

    def _token_logprob(self, choice: Choice) -> TokenLogprob:
        assert choice.logprob is not None
        top = tuple(self._spelled(token, logprob) for token, logprob in choice.top)
        return self._spelled(choice.token, choice.logprob, top)

    def _spelled(self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        assert self._speller is not None  # given whenever the request asks for logprobs
        text, token_bytes = self._speller.spell(token)
        return TokenLogprob(text, logprob, token_bytes, top)
