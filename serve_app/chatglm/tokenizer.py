"""A fast tokenizer (tokenizer.json) from ChatGLM's SentencePiece model, with its control tokens registered.

The SentencePiece model is turned into a `tokenizers` BPE by transformers' own converter, which follows the
model's settings (byte fallback, dummy prefix, no whitespace collapsing), so ordinary text encodes exactly as
the original does. The control tokens come after the SentencePiece vocabulary, in the original's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from serve_app.chatglm.templates import CHATGLM2_TEMPLATE, CHATGLM3_TEMPLATE

Family = Literal["chatglm2", "chatglm3"]

# The original calls the start token "sop" and the end-of-piece token "eop": as added tokens under those
# surfaces, "philosophy" or "people" would contain a control token. GLM-4 names the same ids <sop>/<eop>;
# the model only knows the ids.
_SHARED_CONTROL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# SentencePiece's own control pieces (ids 0-2); never produced from text by the original.
_SENTENCEPIECE_CONTROLS = ("<unk>", "<s>", "</s>")


def control_tokens(family: Family) -> tuple[str, ...]:
    """The added tokens, in id order from the end of the SentencePiece vocabulary."""
    return _SHARED_CONTROL_TOKENS + (_ROLE_TOKENS if family == "chatglm3" else ())


def chat_template(family: Family) -> str:
    return CHATGLM3_TEMPLATE if family == "chatglm3" else CHATGLM2_TEMPLATE


def end_tokens(family: Family) -> tuple[str, ...]:
    """Tokens that end a reply: eos, and for ChatGLM3 the next turn's markers (it writes them instead of eos)."""
    return ("</s>", "<|user|>", "<|observation|>") if family == "chatglm3" else ("</s>",)


def build_tokenizer(sentencepiece_model: Path, family: Family, model_max_length: int) -> Any:
    """A `PreTrainedTokenizerFast` equivalent to the original ChatGLM2/ChatGLM3 tokenizer."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # legacy=True: the dummy prefix goes on every stretch of text between control tokens, as the original
    # encodes each part of a chat prompt separately.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise ValueError(f"{sentencepiece_model} is not a BPE or Unigram SentencePiece model")
    added = control_tokens(family)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    first = backend.token_to_id(added[0])
    if first != len(proto.pieces):
        raise ValueError(f"{sentencepiece_model}: {added[0]} got id {first}, expected {len(proto.pieces)}")
    # encode(text) with special tokens gives "[gMASK]<sop>" + text, as the original's does.
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[gMASK]", "<sop>")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=[t for t in _SENTENCEPIECE_CONTROLS if t not in ("<unk>", "</s>")]
        + list(added),
        chat_template=chat_template(family),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
