"""Constrained field types shared by every request body: what the engine and the tokenizers can take.

A value outside these bounds is refused by the schema (a 400 or the seeds' 422 naming the field), so nothing a
schema accepts raises later inside a deployment, where one request's bad value could fail a whole batch: a seed
beyond 64 bits overflowed `torch.Generator.manual_seed` after the prefill, a lone surrogate cannot cross into a
Rust tokenizer (or back out as UTF-8 JSON), and NaN compares false with every bound.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _utf8_encodable(text: str) -> str:
    # JSON's \ud800 escapes parse into lone surrogates, which UTF-8 (tokenizers, response bodies) cannot hold.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"the text holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}, "
                "which is not a Unicode character"
            ) from None
    return text


# Any client string that may reach a tokenizer, a template or a response body.
Text = Annotated[str, AfterValidator(_utf8_encodable)]
NonEmptyText = Annotated[Text, Field(min_length=1)]

# OpenAI documents `seed` as a 64-bit integer; torch's generators take no more.
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

# Token counts and ids: Python ints are unbounded, the engine's tensors are int64.
MaxTokens = Annotated[int, Field(ge=1, le=INT64_MAX)]
MaxTokensOrZero = Annotated[int, Field(ge=0, le=INT64_MAX)]  # the seeds' "0 means the default"
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]  # the vocabulary bound is the tokenizer deployment's
TopK = Annotated[int, Field(ge=-1, le=INT64_MAX)]  # -1 and 0: no cut; above the vocabulary: no cut

# Sampling floats: finite, in the ranges OpenAI (and HF for repetition_penalty) document.
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # presence / frequency
