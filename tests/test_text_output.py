"""Exact incremental text on the tiny GLM's real tokenizer, whose byte-level BPE splits emoji into byte tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deployments.chat_engine.text_output import StopStringMatcher, TextOutput
from deployments.chat_engine.token_bytes import TokenSpeller
from serve_app.chatglm.tokenizer import build_tokenizer
from tests.chatglm_fixtures import TOKENIZER_MODEL, require_fixtures

TRICKY = "Hi 😀🚀 你好，世界！ 👍🏽 ❤️ naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


@pytest.fixture(scope="module")
def tokenizer(tiny_glm_path: str):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_glm_path)


def test_tricky_text_really_splits_characters(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(TRICKY, add_special_tokens=False)]
    assert any("\ufffd" in piece for piece in pieces)


def test_one_token_at_a_time_never_emits_half_a_character(tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = tokenizer.encode("[gMASK]<sop><|user|>\nhi<|assistant|>\n", add_special_tokens=False)
    output = TextOutput(tokenizer, prompt, stops=())
    deltas = [output.add([i]) for i in tokenizer.encode(TRICKY, add_special_tokens=False)]
    deltas.append(output.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TRICKY


def test_every_prefix_ends_without_its_incomplete_character(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(TRICKY, add_special_tokens=False)
    cut_inside_a_character = 0
    for end in range(1, len(ids) + 1):
        output = TextOutput(tokenizer, [], stops=())
        text = "".join(output.add([i]) for i in ids[:end]) + output.finish()
        whole = tokenizer.decode(ids[:end])
        cut_inside_a_character += whole.endswith("\ufffd")
        assert text == whole.rstrip("\ufffd")
    assert cut_inside_a_character > 0


def test_stop_string_split_across_increments_is_never_sent() -> None:
    matcher = StopStringMatcher(["END"])
    sent = []
    for piece in ["Hello E", "N", "D and more"]:
        text, stopped = matcher.feed(piece)
        sent.append(text)
        if stopped:
            break
    assert "".join(sent) == "Hello " and stopped


def test_held_text_that_is_not_a_stop_is_released() -> None:
    matcher = StopStringMatcher(["END"])
    first, _ = matcher.feed("Hello E")
    second, stopped = matcher.feed("ggs")
    assert first == "Hello " and second == "Eggs" and not stopped


def test_token_bytes_join_into_the_texts_utf8_where_tokens_split_characters(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(TRICKY, add_special_tokens=False)
    speller = TokenSpeller(tokenizer)
    spelled = [speller.spell(i) for i in ids]
    assert any(text == "\ufffd" for text, _ in spelled)  # decoded alone, a part of a character says nothing
    assert b"".join(token_bytes for _, token_bytes in spelled) == TRICKY.encode()
    # A control token is its own text.
    assert speller.spell(tokenizer.convert_tokens_to_ids("<|user|>")) == ("<|user|>", b"<|user|>")


def test_sentencepiece_token_bytes_keep_spaces_and_byte_pieces() -> None:
    require_fixtures()
    chatglm3 = build_tokenizer(TOKENIZER_MODEL, "chatglm3", 8192)
    ids = chatglm3.encode(TRICKY, add_special_tokens=False)
    speller = TokenSpeller(chatglm3)
    assert any(
        piece.startswith("<0x") for piece in chatglm3.convert_ids_to_tokens(ids)
    )  # bytes without a piece
    # SentencePiece writes the text's leading space (its dummy prefix) as the first piece's `▁`.
    assert b"".join(speller.spell(i)[1] for i in ids) == b" " + TRICKY.encode()
