"""Per-request limits (`LimitsConfig`), checked once for the /v1 routes and the seed routes alike.

Each refusal names the limit and its config key, so a client knows what to change and an operator what to raise.
The body size is checked as the body arrives (`BodySizeLimit`); the rest by the services on parsed requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidRequest


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"The request body exceeds the limit of {limit} bytes (limits.max_body_bytes).",
        )


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` fails the route's read of it with a 413 (`RequestTooLarge`).

    A declared Content-Length over the limit fails the first read, before any byte is taken; a chunked body
    fails as soon as the bytes counted pass the limit. Either way no more than the limit is ever held. Raising
    from the read lets each route answer in its own error shape (OpenAI's envelope, or the seeds' `detail`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large_declared = declared.isdigit() and int(declared) > self.max_bytes
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if too_large_declared:
                raise RequestTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


def check_chat_messages(limits: LimitsConfig, texts: Sequence[str]) -> None:
    """The message count and each message's length (`texts`: the messages' contents, in order)."""
    _check_texts(
        texts, "message", "messages", limits.max_messages, limits.max_message_chars, "messages.{}.content"
    )


def check_prompt(limits: LimitsConfig, prompt: str | None) -> None:
    """A raw prompt (/tokenize) is held to the same length as one chat message."""
    if prompt is not None and len(prompt) > limits.max_message_chars:
        raise InvalidRequest(
            f"The prompt has {len(prompt)} characters; the limit is {limits.max_message_chars} "
            "(limits.max_message_chars).",
            param="prompt",
        )


def check_embedding_inputs(limits: LimitsConfig, texts: Sequence[str]) -> None:
    _check_texts(
        texts,
        "input",
        "embedding_inputs",
        limits.max_embedding_inputs,
        limits.max_embedding_input_chars,
        "input.{}",
    )


def _check_texts(
    texts: Sequence[str], noun: str, key: str, max_count: int, max_chars: int, item_param: str
) -> None:
    """How many texts and how long each: `limits.max_<key>` and `limits.max_<singular key>_chars`."""
    if len(texts) > max_count:
        raise InvalidRequest(
            f"This request has {len(texts)} {noun}s; the limit is {max_count} (limits.max_{key}).",
            param=item_param.split(".")[0],
        )
    for index, text in enumerate(texts):
        if len(text) > max_chars:
            raise InvalidRequest(
                f"{noun.capitalize()} {index} has {len(text)} characters; the limit is {max_chars} "
                f"(limits.max_{key.removesuffix('s')}_chars).",
                param=item_param.format(index),
            )


def cap_completion_tokens(
    limits: LimitsConfig, requested: int | None, param: str, fit_to_window: bool
) -> tuple[int | None, bool]:
    """The max_tokens to ask the window for, and whether it may be cut to fit the window.

    An omitted max_tokens means the cap (cut to the window if need be). Over the cap, a /v1 request is refused;
    a seed request (`fit_to_window`) is cut to the cap, as it is cut to the window.
    """
    cap = limits.max_completion_tokens
    if cap is None:
        return requested, fit_to_window
    if requested is None:
        return cap, True
    if requested > cap:
        if fit_to_window:
            return cap, True
        raise InvalidRequest(
            f"{param} is {requested}; the most a request may ask for is {cap} (limits.max_completion_tokens).",
            param=param,
        )
    return requested, fit_to_window
