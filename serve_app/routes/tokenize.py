"""vLLM-style /tokenize and /detokenize for the chat models' tokenizers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from serve_app.protocol.engine import ChatPrompt
from serve_app.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from serve_app.registry import ModelRegistry
from serve_app.routes import deps

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    request: TokenizeRequest, registry: Annotated[ModelRegistry, Depends(deps.registry)]
) -> TokenizeResponse:
    model = registry.chat(request.model).name
    if request.messages is not None:
        messages = [m.for_template() for m in request.messages]
        prompt: ChatPrompt = await registry.tokenizer.render_chat.remote(
            model, messages, request.add_generation_prompt
        )
    else:
        prompt = await registry.tokenizer.encode.remote(model, request.prompt, request.add_special_tokens)
    return TokenizeResponse(
        tokens=prompt.token_ids, count=len(prompt.token_ids), max_model_len=prompt.max_model_len
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    request: DetokenizeRequest, registry: Annotated[ModelRegistry, Depends(deps.registry)]
) -> DetokenizeResponse:
    model = registry.chat(request.model).name
    return DetokenizeResponse(prompt=await registry.tokenizer.decode.remote(model, request.tokens))
