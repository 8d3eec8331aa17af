"""API keys and CORS of the ingress: who may call the model routes, and which other sites' pages may call them.

The keys are resolved once, when an ingress replica starts (`AccessPolicy.from_config`), from the config and from
the environment variable it names. Model routes then check `Authorization: Bearer <key>` through a FastAPI
dependency, so a refusal is answered in each route's own error shape (the OpenAI envelope, or the seeds'
`{"detail": ...}`). /health, the web page and /openapi.json stay open: the page asks for a key itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request, params
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve_app.config import API_KEY_RULE, SecurityConfig, is_valid_api_key
from serve_app.errors import Unauthorized


class MissingApiKeyError(RuntimeError):
    """The config requires an API key and none was given: the ingress must not start serving an open API."""


@dataclass(frozen=True)
class AccessPolicy:
    api_keys: tuple[bytes, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, security: SecurityConfig, environ: Mapping[str, str]) -> AccessPolicy:
        keys = [key.get_secret_value() for key in security.api_keys]
        variable = security.api_keys_env
        if variable:
            from_env = [key.strip() for key in environ.get(variable, "").split(",") if key.strip()]
            for index, key in enumerate(from_env):
                if not is_valid_api_key(key):  # the message never shows the key
                    raise MissingApiKeyError(f"key {index} in ${variable} must be {API_KEY_RULE}")
            keys += from_env
        if security.require_api_key and not keys:
            where = f"security.api_keys nor in ${variable}" if variable else "security.api_keys"
            raise MissingApiKeyError(
                f"security.require_api_key is set but no API key was found in {where}: "
                "refusing to serve the model routes without one"
            )
        return cls(tuple(key.encode() for key in keys), tuple(security.cors_origins))

    def accepts(self, key: str) -> bool:
        sent = key.encode()
        matched = False
        # Every key is compared, each in constant time, so the time taken tells nothing about which key or how
        # much of it matched.
        for known in self.api_keys:
            matched |= hmac.compare_digest(sent, known)
        return matched


# auto_error=False: a missing or non-Bearer header comes to `_check_api_key` as None, which answers 401 in the
# route's own error shape. Declaring it also puts the bearer scheme in /openapi.json.
_bearer = HTTPBearer(auto_error=False, description="One of the server's API keys (`security.api_keys`).")


async def _check_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    policy: AccessPolicy = request.app.state.access
    if credentials is None:
        raise Unauthorized("Missing API key: send it in the header `Authorization: Bearer <key>`.")
    if not policy.accepts(credentials.credentials):
        raise Unauthorized("Incorrect API key provided.")


def key_check(policy: AccessPolicy) -> list[params.Depends]:
    """The dependencies a model router is included with: the key check, or none when no key is configured."""
    return [Depends(_check_api_key)] if policy.api_keys else []


def install_cors(app: FastAPI, policy: AccessPolicy) -> None:
    """Lets the configured origins call the API from their pages; with none, no CORS header is ever sent.

    Install it last, so that it is the outermost middleware: a browser can then read the 401s and 413s too.
    """
    if not policy.cors_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(policy.cors_origins),
        allow_methods=["GET", "POST"],
        # Preflights are answered here, before any route: a browser sends them without the key.
        allow_headers=["Authorization", "Content-Type"],
        max_age=600,
    )
