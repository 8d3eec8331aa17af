"""/v1/embeddings through the openai SDK, against the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest

MODEL = "all-MiniLM-L6-v2"
SENTENCES = ["The cat sits on the mat.", "深度学习改变了自然语言处理。", "Ray Serve scales deployments 🚀"]


def _vectors(client: openai.OpenAI, texts: list[str] | str, **extra: object) -> np.ndarray:
    response = client.embeddings.create(model=MODEL, input=texts, **extra)
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_one_384d_unit_vector_per_input_in_order(client: openai.OpenAI) -> None:
    together = _vectors(client, SENTENCES)
    assert together.shape == (3, 384)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-4)
    one_by_one = np.vstack([_vectors(client, s) for s in SENTENCES])
    assert np.allclose(together, one_by_one, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_vectors_are_the_models_own_across_several_passes(client: openai.OpenAI) -> None:
    """The replica runs a batch packed, sorted by token count, with attention in groups of 16
    (deployments/packed_encoder.py): the rows come back where they were sent, as sentence-transformers computes
    them. Texts whose character and token orders disagree (CJK: a token per character, emoji: several), one past
    the model's 256 tokens, and more of them than one group holds."""
    from sentence_transformers import SentenceTransformer

    from serve_app.profiles import minilm_path

    texts = [f"{'深度学习' * (i % 5)} {'word ' * (i % 9)}{'🚀' * (i % 3)} item {i}" for i in range(40)]
    texts.append("truncated " * 300)
    expected = SentenceTransformer(minilm_path(), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.allclose(_vectors(client, texts), expected, atol=1e-5)


def test_base64_equals_float(client: openai.OpenAI, http: httpx.Client) -> None:
    def fetch(encoding_format: str) -> list[Any]:
        body = {"model": MODEL, "input": SENTENCES, "encoding_format": encoding_format}
        return [d["embedding"] for d in http.post("/v1/embeddings", json=body).json()["data"]]

    floats = np.array(fetch("float"), dtype=np.float32)
    decoded = np.vstack([np.frombuffer(base64.b64decode(e), dtype="<f4") for e in fetch("base64")])
    assert np.array_equal(decoded, floats)
    # The SDK asks for base64 unless told otherwise and decodes it itself: the same numbers again.
    assert np.array_equal(_vectors(client, SENTENCES), floats)


def test_usage_counts_the_real_tokens(client: openai.OpenAI) -> None:
    from transformers import AutoTokenizer

    from serve_app.profiles import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    expected = sum(len(ids) for ids in tokenizer(SENTENCES)["input_ids"])
    response = client.embeddings.create(model=MODEL, input=SENTENCES)
    assert response.usage.prompt_tokens == expected == response.usage.total_tokens
    assert response.model == MODEL


def test_concurrent_requests_are_batched_without_mixing_rows(client: openai.OpenAI) -> None:
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(32)]
    expected = _vectors(client, texts)
    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(lambda t: _vectors(client, [t])[0], texts))
    assert np.allclose(np.vstack(rows), expected, atol=1e-5)


def test_default_model_when_none_is_named(http: httpx.Client) -> None:
    body = http.post("/v1/embeddings", json={"input": "hello"}).json()
    assert body["model"] == MODEL and len(body["data"][0]["embedding"]) == 384


def test_unknown_embedding_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text2vec-nope", input="x")
