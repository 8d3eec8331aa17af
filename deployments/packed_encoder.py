"""Embedding forward passes without padding: a batch's texts run packed into one row.

A padded batch computes every layer on its padding too. In a BERT-family model only attention needs its texts
apart; the linear layers, layer norms and activations work token by token (60% of a MiniLM replica's time, and a
batch of 64 benchmark texts sorted by token count and padded in passes of 16 is 13% padding). So the whole batch
runs as one row of real tokens, with each text's own positions, and only attention pads: over groups of texts of
near token count, each group padded to its longest, through a function of transformers' attention interface.
sentence-transformers' pooling takes the packed row as it does for flash attention's unpadded batches
(`cu_seq_lens_q`). In process, one thread, batches of 64 benchmark texts: 139-144 sentences/s vs 122-127
padded in passes of 16; over HTTP, +18% (the README's "Embeddings: packed forward passes").

`PackedEncoder.of` checks that a model gives the same vectors this way as through `encode` (its tokenizer and
modules may differ from MiniLM's), and leaves any model that does not as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.functional import scaled_dot_product_attention

logger = logging.getLogger("ray.serve")

PACKED_ATTENTION = "glm_serve_packed_sdpa"
# The keyword that carries a packed batch's groups through the model's forward to its attention layers.
_GROUPS = "glm_serve_packed_groups"
# Texts of every length, case and script, so that a tokenizer or module that the packed path would not reproduce
# (lower-casing, prompts, another pooling) shows as different vectors.
_CHECK_TEXTS = [
    "A",
    "Packed batches: the same vectors as padded ones?",
    "向量 für Sätze, mixed CASE and punctuation... " * 6,
    "short one",
]


@dataclass(frozen=True)
class _Group:
    """Texts padded together for attention: tokens [start, end) of the packed row, `texts` of them."""

    start: int
    end: int
    texts: int
    longest: int
    slots: torch.Tensor  # each token's place in the group's texts x longest grid
    keys: torch.Tensor  # texts x 1 x 1 x longest: True where a key is a real token (sdpa's boolean mask)


def _padded(states: torch.Tensor, group: _Group) -> torch.Tensor:
    """A group's tokens of a packed 1 x heads x tokens x head size tensor, as texts x heads x longest x head size."""
    _, heads, _, head_size = states.shape
    grid = states.new_zeros(heads, group.texts * group.longest, head_size)
    grid[:, group.slots] = states[0, :, group.start : group.end]
    return grid.view(heads, group.texts, group.longest, head_size).transpose(0, 1)


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a packed row (batch 1, the batch's texts one after another): each group of texts padded to
    its longest, one scaled-dot-product call per group. transformers builds no mask for an implementation it
    does not know, so `attention_mask` is None here: the groups say which tokens attend to which."""
    groups: list[_Group] = kwargs[_GROUPS]
    outputs = []
    for group in groups:
        attended = scaled_dot_product_attention(
            _padded(query, group),
            _padded(key, group),
            _padded(value, group),
            attn_mask=group.keys,
            scale=scaling,
        )
        _, heads, _, head_size = attended.shape
        grid = attended.transpose(0, 1).reshape(heads, group.texts * group.longest, head_size)
        outputs.append(grid[:, group.slots])
    # Shaped as transformers' attention functions return it: batch x tokens x heads x head size.
    return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0), None


class PackedEncoder:
    """Encodes texts with a sentence-transformers model, its transformer run packed (see the module's docstring).

    The model keeps its own attention for everything else (its `encode`): the packed one is set for each packed
    forward pass only, so calls must not overlap with other uses of the model (a replica encodes on its event loop,
    one batch at a time)."""

    def __init__(self, model: Any, group_size: int) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        self._model = model
        self._transformer = model[0].model
        self._group_size = group_size
        padding_idx = getattr(getattr(self._transformer, "embeddings", None), "padding_idx", None)
        # RoBERTa-family models number positions from padding_idx + 1; BERT's from 0.
        self._first_position = padding_idx + 1 if isinstance(padding_idx, int) else 0

    @classmethod
    def of(cls, model: Any, group_size: int) -> PackedEncoder | None:
        """An encoder for `model` when its vectors come out the same packed as through `encode`; else None."""
        transformer = getattr(model[0], "model", None)
        if getattr(getattr(transformer, "config", None), "_attn_implementation", None) not in (
            "sdpa",
            "eager",
        ):
            return None
        expected = model.encode(_CHECK_TEXTS, convert_to_numpy=True, show_progress_bar=False)
        encoder = cls(model, group_size)
        try:
            vectors, _ = encoder.encode(_CHECK_TEXTS)
        except Exception as error:  # noqa: BLE001 - a model the packed path cannot run stays padded
            reason = f"{type(error).__name__}: {error}"
        else:
            if vectors.shape == expected.shape and np.allclose(vectors, expected, rtol=1e-3, atol=1e-4):
                return encoder
            reason = "its vectors differ from encode's"
        logger.warning("embedding model %s runs padded, not packed (%s)", type(transformer).__name__, reason)
        return None

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """The texts' vectors in their order, and each text's token count."""
        model = self._model
        features = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
        token_ids: list[list[int]] = features["input_ids"]
        counts = [len(ids) for ids in token_ids]
        # Longest first, so that each attention group holds texts of near token count.
        order = sorted(range(len(texts)), key=counts.__getitem__, reverse=True)
        lengths = [counts[i] for i in order]
        device = model.device

        def packed(column: list[list[int]]) -> torch.Tensor:
            return torch.tensor([[token for i in order for token in column[i]]], device=device)

        inputs = {"input_ids": packed(token_ids)}
        if "token_type_ids" in features:
            inputs["token_type_ids"] = packed(features["token_type_ids"])
        first = self._first_position
        inputs["position_ids"] = torch.tensor(
            [[first + position for length in lengths for position in range(length)]], device=device
        )
        ends = np.cumsum(lengths).tolist()
        starts = [0, *ends[:-1]]
        groups = self._groups(lengths, starts, ends, device)
        config = self._transformer.config
        own_attention = config._attn_implementation
        with torch.inference_mode():
            config._attn_implementation = PACKED_ATTENTION
            try:
                output = self._transformer(**inputs, **{_GROUPS: groups})
            finally:
                config._attn_implementation = own_attention
            pooled = {
                "input_ids": inputs["input_ids"],
                "token_embeddings": output.last_hidden_state,
                "cu_seq_lens_q": torch.tensor([0, *ends], dtype=torch.int32, device=device),
            }
            for module in list(model)[1:]:
                pooled = module(pooled)
            sentence_vectors = pooled["sentence_embedding"].float().cpu().numpy()
        vectors = np.empty_like(sentence_vectors)
        vectors[order] = sentence_vectors
        return vectors, counts

    def _groups(
        self, lengths: list[int], starts: list[int], ends: list[int], device: torch.device
    ) -> list[_Group]:
        groups = []
        for first in range(0, len(lengths), self._group_size):
            members = lengths[first : first + self._group_size]
            longest = members[0]
            slots = [
                text * longest + position for text, length in enumerate(members) for position in range(length)
            ]
            keys = torch.arange(longest, device=device) < torch.tensor(members, device=device).unsqueeze(1)
            groups.append(
                _Group(
                    start=starts[first],
                    end=ends[first + len(members) - 1],
                    texts=len(members),
                    longest=longest,
                    slots=torch.tensor(slots, device=device),
                    keys=keys.view(len(members), 1, 1, longest),
                )
            )
        return groups
