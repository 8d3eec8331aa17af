"""One error envelope, `{"error": {"message", "type", "param", "code"}}`, and the handlers that produce it.

Deployments answer with `APIError`s as values (`answers_errors` wraps a plain method; the chat stream sends one as
its last item), and the ingress raises them (`raised`), so a client error found deep in a replica still reaches
the client as its 4xx, and a refusal as its 503. Not raised in the replica: Serve logs whatever a replica raises
as a failed request, with its traceback, so a client sending bad token ids, or an overload's refusals, would
write an ERROR and a traceback per request.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("glm_serve")


class APIError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        # An instance attribute, never a class one: the copy Ray re-raises in the ingress reads its missing
        # attributes from the original error, and a class attribute would hide the original's headers.
        self.headers: dict[str, str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword fields across the pickling that carries the error from a replica to the ingress.
        return (type(self), (self.message, self.param, self.code))


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, param: str | None = "model", code: str | None = "model_not_found") -> None:
        super().__init__(model, param, code)
        self.message = f"The model '{model}' does not exist."


class Unauthorized(APIError):
    """No valid API key. The message never repeats the key that was sent."""

    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_api_key") -> None:
        super().__init__(message, param, code)
        self.headers = {"WWW-Authenticate": "Bearer"}


class ServiceUnavailable(APIError):
    """The request was not served and may be sent again after `Retry-After` seconds (OpenAI's own 503 shape)."""

    status_code = 503

    def __init__(self, message: str, code: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, None, code)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.code, self.retry_after_s))


def overloaded(retry_after_s: float) -> ServiceUnavailable:
    """Refused for load: a queue was full, or a request waited longer than its deployment's max_queue_wait_s."""
    return ServiceUnavailable(
        "The server is overloaded with other requests. Please retry after a short wait.",
        "overloaded",
        retry_after_s,
    )


_P = ParamSpec("_P")
_T = TypeVar("_T")


def answers_errors(method: Callable[_P, _T]) -> Callable[_P, _T | APIError]:
    """A replica's (sync) method that returns the `APIError` it would raise (see the module's docstring)."""

    @functools.wraps(method)
    def answering(*args: _P.args, **kwargs: _P.kwargs) -> _T | APIError:
        try:
            return method(*args, **kwargs)
        except APIError as error:
            return error

    return answering


def raised(answer: _T | APIError) -> _T:
    """A deployment's answer, in the ingress; an error it answered with, raised."""
    if isinstance(answer, APIError):
        raise answer
    return answer


def serving_failure(exc: BaseException) -> APIError | None:
    """What a client is told when Serve refused or lost a request to a deployment; None for any other error.

    Refused (a deployment's max_queued_requests is reached): 503 `overloaded`. Lost (the replica died under it, or
    the deployment has no replica yet): 503 `replica_unavailable`. Both are answered at once with Retry-After,
    while Serve sheds the load or replaces the replica.
    """
    if isinstance(exc, BackPressureError):
        return overloaded(exc.retry_after_s or 1.0)
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ServiceUnavailable(
            "The model replica serving this request became unavailable. Please retry after a short wait.",
            "replica_unavailable",
        )
    return None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer of the OpenAI-style routes (what `error_body` builds)."""

    error: ErrorInfo


class SeedErrorResponse(BaseModel):
    """The body of a seed route's error other than a malformed body (that is FastAPI's 422 list)."""

    detail: str


# The errors the OpenAPI document declares (router `responses=`), so that clients and the fuzz tests know them.
# "4XX" covers the rest (405, 401, 413, 429, ...) and keeps FastAPI from declaring a 422 these routes never send.
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request; `param` names the culprit"},
    404: {"model": ErrorResponse, "description": "Unknown model or route"},
    "4XX": {"model": ErrorResponse, "description": "Any other client error, in the same envelope"},
    503: {"model": ErrorResponse, "description": "Overloaded or replica lost; see `Retry-After`"},
}
SEED_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": SeedErrorResponse, "description": "Request refused, as the seed server refused it"},
    401: {"model": SeedErrorResponse, "description": "No valid API key (when keys are configured)"},
    404: {"model": SeedErrorResponse, "description": "Unknown model"},
    413: {"model": SeedErrorResponse, "description": "Body over `limits.max_body_bytes`"},
    503: {"model": SeedErrorResponse, "description": "Overloaded or replica lost; see `Retry-After`"},
}


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    # Pydantic names the member of a union that failed (`function-after[_utf8_encodable(), str]`, `list[...]`)
    # in the location: not a field the client sent.
    location = [str(part) for part in first.get("loc", ()) if part != "body" and "[" not in str(part)]
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    return (f"{param}: {message}" if param else message), param


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return error_response(InvalidRequest(message, param=param))


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None
    return JSONResponse(
        error_body(str(exc.detail), error_type, code=code), status_code=exc.status_code, headers=exc.headers
    )


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("The server had an error processing your request.", "server_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


class ServingRoute(APIRoute):
    """A route that calls deployments: Serve's refusals and lost replicas become `serving_failure`'s 503.

    Converted here, inside the route, because Serve installs its own plain-text handler for BackPressureError on
    the ingress app after the app is built, which would win over one registered with `install_error_handlers`.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[None, None, Response]]:
        handler = super().get_route_handler()

        async def answer_serving_failures(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                failure = serving_failure(exc)
                if failure is None:
                    raise
                raise failure from exc

        return answer_serving_failures


# How deep an echoed `input` may nest. Deeper, the answer would nest as deep as the JSON parser allows: encoding
# it ran past the recursion limit at some depths (a 500), and a client's own parser may give up on it.
_ECHO_DEPTH = 32


def seed_validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 list, as the seeds answered, less an `input` that JSON cannot carry back to the client (NaN,
    a lone surrogate) or that nests deeper than `_ECHO_DEPTH`: echoing it would make the answer itself fail."""
    detail = []
    for error in exc.errors():
        encoded = _encodable(error) if _depth_within(error.get("input"), _ECHO_DEPTH) else None
        if encoded is None:
            without_input = {k: v for k, v in error.items() if k != "input"}
            encoded = _encodable(without_input) or {"msg": str(error.get("msg"))}
        detail.append(encoded)
    return detail


def _depth_within(value: Any, limit: int) -> bool:
    """Does `value` nest (lists, dicts) at most `limit` deep? Walked without recursion, and only that deep."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            child
            for item in level
            if isinstance(item, (list, dict))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return True
    return False


def _encodable(value: dict[str, Any]) -> dict[str, Any] | None:
    try:
        encoded: dict[str, Any] = jsonable_encoder(value)
        # What JSONResponse does with it.
        json.dumps(encoded, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return encoded


class SeedRoute(ServingRoute):
    """Routes kept from the seed servers answer errors as those did: FastAPI's `{"detail": ...}` body, with 422
    for a malformed body, instead of the OpenAI envelope the /v1 routes use."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[None, None, Response]]:
        handler = super().get_route_handler()

        async def answer_like_the_seeds(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"detail": seed_validation_detail(exc)}, status_code=422)
            except APIError as exc:
                return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=exc.headers)
            except StarletteHTTPException as exc:  # e.g. a body that is not even text
                return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

        return answer_like_the_seeds
