"""POST /tokenize in two dialects, told apart by the body, and vLLM-style POST /detokenize.

vLLM's body is `{model, prompt | messages (+ tools, add_generation_prompt, continue_final_message),
add_special_tokens, return_token_strs}` → `{tokens, count, max_model_len, token_strs}`; GLM-API's
(seed 000) is `{prompt, max_tokens}` → `{tokenIds, tokens, model, object}`. A body with `max_tokens` and no
`messages` is GLM-API's; every other body is vLLM's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from pydantic import Discriminator, Tag

from serve_app.config import LimitsConfig
from serve_app.errors import OPENAI_ERROR_RESPONSES, ServingRoute, raised
from serve_app.limits import check_chat_messages, check_prompt
from serve_app.protocol.glm_api import GlmTokenizeRequest, GlmTokenizeResponse
from serve_app.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from serve_app.registry import ModelRegistry
from serve_app.routes import deps
from serve_app.tools.prompts import template_tools

router = APIRouter(tags=["tokenizer"], route_class=ServingRoute, responses=OPENAI_ERROR_RESPONSES)


# The tags are bracketed as pydantic's own union member names are: an error's `param` leaves them out.
_VLLM, _GLM_API = "[vllm]", "[glm_api]"


def _dialect(body: Any) -> str:
    return _GLM_API if isinstance(body, dict) and "max_tokens" in body and "messages" not in body else _VLLM


TokenizeBody = Annotated[
    Annotated[TokenizeRequest, Tag(_VLLM)] | Annotated[GlmTokenizeRequest, Tag(_GLM_API)],
    Discriminator(_dialect),
]


# An OpenAPI link: vLLM's token ids go back through /detokenize (schemathesis' stateful tests follow it).
_DETOKENIZE_LINK = {
    "description": "The token ids (vLLM's body) or ids and pieces (GLM-API's)",
    "links": {
        "Detokenize": {
            "operationRef": "#/paths/~1detokenize/post",
            "requestBody": {"tokens": "$response.body#/tokens"},
        }
    },
}


@router.post(
    "/tokenize", response_model=TokenizeResponse | GlmTokenizeResponse, responses={200: _DETOKENIZE_LINK}
)
async def tokenize(
    request: Annotated[TokenizeBody, Body()],
    registry: Annotated[ModelRegistry, Depends(deps.registry)],
    limits: Annotated[LimitsConfig, Depends(deps.limits)],
) -> TokenizeResponse | GlmTokenizeResponse:
    model = registry.chat(request.model).name
    if isinstance(request, GlmTokenizeRequest):
        check_prompt(limits, request.prompt)
        ids, pieces = raised(await registry.tokenizer.pieces.remote(model, request.prompt))
        return GlmTokenizeResponse(tokenIds=ids[: request.max_tokens], tokens=pieces, model=model)
    if request.messages is not None:
        messages = [m.for_template() for m in request.messages]
        check_chat_messages(limits, [m["content"] for m in messages])
        tools = template_tools(request.tools or [])
        prompt = await registry.prompts.render(
            model, messages, request.add_generation_prompt, tools, request.continue_final_message
        )
    else:
        check_prompt(limits, request.prompt)
        add_special_tokens = request.add_special_tokens is not False
        prompt = raised(await registry.tokenizer.encode.remote(model, request.prompt, add_special_tokens))
    strings = (
        raised(await registry.tokenizer.token_strings.remote(model, prompt.token_ids))
        if request.return_token_strs
        else None
    )
    return TokenizeResponse(
        tokens=prompt.token_ids,
        count=len(prompt.token_ids),
        max_model_len=prompt.max_model_len,
        token_strs=strings,
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    request: DetokenizeRequest, registry: Annotated[ModelRegistry, Depends(deps.registry)]
) -> DetokenizeResponse:
    model = registry.chat(request.model).name
    return DetokenizeResponse(prompt=raised(await registry.tokenizer.decode.remote(model, request.tokens)))
