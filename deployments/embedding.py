"""The embedding deployment: one sentence-transformers model; concurrent requests share forward passes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from deployments.model_files import resolve_device
from deployments.model_health import poison_weights, require_finite
from deployments.packed_encoder import PackedEncoder
from deployments.queue_deadline import QueueDeadline
from serve_app.config import EmbeddingModelConfig
from serve_app.errors import ServiceUnavailable
from serve_app.metrics import EmbeddingMetrics
from serve_app.protocol.engine import Embeddings

logger = logging.getLogger("ray.serve")


@dataclass
class _Request:
    """What the parts of one request share: a request is refused whole, or served whole."""

    received_at: float  # at the ingress, time.time()
    decided: bool = False  # by the first batch that holds one of its parts
    refusal: ServiceUnavailable | None = None


@dataclass(frozen=True)
class _Part:
    """Texts of one request that go into one batch (a large request is split into several)."""

    texts: list[str]
    request: _Request


def _texts_in(parts: list[_Part]) -> int:
    return sum(len(part.texts) for part in parts)


@serve.deployment
class EmbeddingDeployment:
    def __init__(self, config: EmbeddingModelConfig) -> None:
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(
            config.path, device=resolve_device(config.device, config.cpu_threads)
        )
        self._max_batch_texts = config.max_batch_size
        self._forward_batch_size = config.forward_batch_size
        self._packed = PackedEncoder.of(self._model, config.forward_batch_size) if config.packed else None
        self._deadline = QueueDeadline.of(config)
        self._texts_waiting = 0  # in requests this replica holds that have not been answered
        self._metrics = EmbeddingMetrics(config.name)
        # The decorator's numbers are placeholders: the config's are set per replica here.
        self._embed_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.dimensions = int(self._model.get_embedding_dimension() or 0)
        # The first forward pass pays one-time costs (allocations, kernel choice: ~5x a warm pass here, more on a
        # busy machine). Paid now, not by the first client, and not learnt as the replica's pace: its deadline
        # would start several times too long and take dozens of batches to come back.
        self._encode(["warm-up"])
        logger.info("embedding model %s loaded from %s (%d-d)", config.name, config.path, self.dimensions)

    async def embed(
        self, texts: list[str], received_at: float | None = None
    ) -> Embeddings | ServiceUnavailable:
        """The texts' vectors, or the refusal of an overloaded replica as a value (see serve_app/errors.py)."""
        request = _Request(received_at if received_at is not None else time.time())
        # Refused at once when the work already waiting here would take it past the deadline (fast 503s under
        # overload, and a backlog no deeper than the deadline, so the server is itself again soon after).
        late = self._deadline.refusal(request.received_at, batches_ahead=self._batches_waiting())
        if late is not None:
            return late
        size = self._max_batch_texts
        parts = [_Part(texts[start : start + size], request) for start in range(0, len(texts), size)]
        served: list[Embeddings] = []
        self._texts_waiting += len(texts)
        try:
            answers = await asyncio.gather(*(self._embed_batch(part) for part in parts))
        finally:
            self._texts_waiting -= len(texts)
        for answer in answers:
            if not isinstance(answer, Embeddings):
                return answer  # the request is refused whole (one decision for all its parts)
            served.append(answer)
        if len(served) == 1:
            return served[0]
        return Embeddings(
            vectors=np.concatenate([answer.vectors for answer in served]),
            token_counts=[count for answer in served for count in answer.token_counts],
        )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=_texts_in)
    async def _embed_batch(self, parts: list[_Part]) -> list[Embeddings | ServiceUnavailable]:
        # A request that waited past the deadline before any of its parts ran is refused, not computed: under
        # overload the batch goes to those whose clients are still likely to want the answer.
        now = time.time()
        for part in parts:
            if not part.request.decided:
                part.request.refusal = self._deadline.refusal(part.request.received_at, now)
                part.request.decided = True
        live = [part for part in parts if part.request.refusal is None]
        texts = [text for part in live for text in part.texts]
        if texts:
            self._metrics.batch(requests=len(live), inputs=len(texts))
            # Computed on the replica's event loop on purpose. In a worker thread, the Python-heavy forward pass
            # holds the GIL so much that the loop admits requests one at a time and batches stay at 1-2 requests;
            # blocking here lets every request that arrived meanwhile join the next batch (32 clients x 8
            # sentences: 120 -> 169 sentences/s, bench/embeddings.py). Health checks wait at most one batch.
            queued_batches = self._batches_waiting() - len(texts) / self._max_batch_texts
            started = time.perf_counter()
            vectors, counts = self._encode(texts)
            # Per text, as a full batch would take: a few texts cost more each than a full batch's, so a quiet
            # replica's first deadline errs long, never short.
            self._deadline.observe(
                (time.perf_counter() - started) * self._max_batch_texts / len(texts), queued_batches
            )
        answers: list[Embeddings | ServiceUnavailable] = []
        start = 0
        for part in parts:
            if part.request.refusal is not None:
                answers.append(part.request.refusal)
                continue
            end = start + len(part.texts)
            answers.append(Embeddings(vectors=vectors[start:end], token_counts=counts[start:end]))
            start = end
        return answers

    def _batches_waiting(self) -> float:
        return self._texts_waiting / self._max_batch_texts

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        if self._packed is not None:
            return self._packed.encode(texts)
        model = self._model
        features = model.tokenizer(
            texts, truncation=True, max_length=model.max_seq_length, return_length=True
        )
        counts = list(features["length"])
        # Padded (config `packed: false`, or a model the packed path does not reproduce; deployments/packed_encoder.py).
        # Passes of forward_batch_size texts, longest first: each pass pads its texts to its longest, so texts of
        # near token counts go together. Sorted by token count here, where sentence-transformers' encode sorts by
        # characters: 13.0% of the tokens computed are padding instead of 15.6% (64 texts of 8-40 words, passes of
        # 16), 1-4% more sentences/s on one thread. Each pass is still its encode (prompts, pooling, dtype).
        order = sorted(range(len(texts)), key=counts.__getitem__, reverse=True)
        size = self._forward_batch_size
        passes = [
            model.encode(
                [texts[i] for i in order[start : start + size]],
                batch_size=size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            for start in range(0, len(order), size)
        ]
        vectors = np.empty((len(texts), passes[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(passes)
        return vectors, counts

    def dimension(self) -> int:
        return self.dimensions

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises: embedding one short text fails or gives non-finite numbers.
        Async so that it runs on the event loop like the batches (a few ms on CPU): it also fails if the loop is
        stuck, and never runs beside a batch. Serve runs a sync method on a worker thread, and there the two shared
        the tokenizer, whose padding and truncation settings are state that each call sets."""
        vectors, _ = self._encode(["health check"])
        require_finite(vectors, "the embedding model's forward pass")

    def break_model_for_tests(self) -> dict[str, Any]:
        """Fault injection, reachable only through a Serve handle (never over HTTP): NaN weights, as a corrupted
        model has; `check_health` then fails until Serve replaces the replica."""
        logger.warning("embedding model weights poisoned on purpose (break_model_for_tests)")
        return poison_weights(self._model)

    def status(self) -> dict[str, Any]:
        """Answered for /health: the vectors' size and the queue deadline as measured now (null before a batch)."""
        return {"dimensions": self.dimensions, **self._deadline.status()}
