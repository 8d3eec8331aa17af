"""deployments/packed_encoder.py in process, on the packaged all-MiniLM-L6-v2: the same vectors as
sentence-transformers' own `encode`, and a model it would not reproduce left padded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from deployments.packed_encoder import PackedEncoder

TEXTS = [
    "",
    "a",
    "The cat sits on the mat.",
    "深度学习改变了自然语言处理。" * 3,
    "Ray Serve scales deployments 🚀",
    "long " * 400,  # truncated to the model's 256 tokens
    *(f"sentence {i} " + "word " * i for i in range(12)),
]


@pytest.fixture(scope="module")
def minilm() -> Any:
    from sentence_transformers import SentenceTransformer

    from serve_app.profiles import minilm_path

    return SentenceTransformer(minilm_path(), device="cpu")


@pytest.mark.parametrize("group_size", [1, 5, 64])
def test_packed_vectors_are_encodes(minilm: Any, group_size: int) -> None:
    """Groups of 1 (no padding at all), 5 (the last one short) and 64 (one group for all): the rows come back in
    the order sent, equal to encode's, with each text's token count."""
    encoder = PackedEncoder.of(minilm, group_size)
    assert encoder is not None
    vectors, counts = encoder.encode(TEXTS)
    assert np.allclose(vectors, minilm.encode(TEXTS, convert_to_numpy=True), atol=1e-5)
    assert counts == [
        len(ids) for ids in minilm.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]
    ]
    assert counts[5] == 256


class _NeedsPaddedMask(torch.nn.Module):
    """A custom module of the kind a model folder may bring: it reads the padded batch's attention mask."""

    def forward(self, features: dict[str, Any]) -> dict[str, Any]:
        features["sentence_embedding"] = features["sentence_embedding"] * features["attention_mask"][:, :1]
        return features


def test_a_model_the_packed_path_would_change_stays_padded(minilm: Any) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(modules=[*minilm, _NeedsPaddedMask()], device="cpu")
    before = model.encode(TEXTS[:4], convert_to_numpy=True)
    assert PackedEncoder.of(model, 16) is None
    # Its own attention is still in place: encode gives what it gave.
    assert model[0].model.config._attn_implementation == "sdpa"
    assert np.array_equal(model.encode(TEXTS[:4], convert_to_numpy=True), before)
